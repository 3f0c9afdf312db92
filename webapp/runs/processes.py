"""Who holds a run: the worker process that supervises it and the trainer that worker started, named
so that another process on the same host can tell whether they still live and stop the trainer
before its devices go to another run (fencing: see the reaper).

A name is `host:pid:start:boot`: the pid alone could be reused by an unrelated process, so the
process's start time (clock ticks after boot, /proc/<pid>/stat) and the boot id are part of it.
Only a process on the same host can look a name up; elsewhere its liveness is unknown (None).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass
from functools import lru_cache

TERM_SECONDS = 5  # how long a stopped trainer gets to go before the reaper stops waiting for it


@lru_cache(maxsize=1)
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:8]
    except OSError:
        return "-"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks) of a process of this host, None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[19])


@dataclass(frozen=True)
class ProcessName:
    host: str
    pid: int
    start: int
    boot: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.start}:{self.boot}"

    @classmethod
    def parse(cls, text: str) -> ProcessName | None:
        try:
            host, pid, start, boot = text.rsplit(":", 3)
            return cls(host, int(pid), int(start), boot)
        except (AttributeError, ValueError):
            return None

    @classmethod
    def of(cls, pid: int) -> ProcessName | None:
        """The name of a process of this host (None when it has already gone)."""
        stat = _stat(pid)
        return cls(socket.gethostname(), pid, stat[1], _boot_id()) if stat else None

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool | None:
        """True while it runs (a stopped process too: it may go on), False once it is gone or a
        zombie (nothing left to stop), None when it lives on another host (unknown from here)."""
        if not self.here:
            return None
        if self.boot != _boot_id():
            return False  # the host restarted since
        stat = _stat(self.pid)
        return stat is not None and stat[1] == self.start and stat[0] not in "ZX"

    def stop_group(self, timeout: float = TERM_SECONDS) -> bool:
        """SIGKILL its process group (a trainer leads its own: accelerate's ranks go with it) and
        wait until it is gone. True once nothing of it runs; False if it lives elsewhere or would
        not go in `timeout` (a process in uninterruptible sleep: try again later)."""
        return self.stop(timeout, group=True)

    def stop(self, timeout: float = TERM_SECONDS, group: bool = False) -> bool:
        """SIGKILL it (a stopped, SIGSTOP, process dies of it too) and wait until it is gone; as
        stop_group, without its group."""
        alive = self.alive()
        if alive is None:
            return False
        if alive:
            for kill in (os.killpg, os.kill) if group else (os.kill,):  # a group; itself, should it lead none
                try:
                    kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                except PermissionError:
                    return False
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


def this_process() -> ProcessName:
    """This worker's name (by pid: a forked child is another process)."""
    name = ProcessName.of(os.getpid())
    assert name is not None
    return name
