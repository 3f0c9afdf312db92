"""Warm trainers and the worker's start: trainer processes started ahead of their run, so a run does not
wait for torch/transformers/peft to import (training/warm.py is the other side), and the worker's own
import of those libraries, once, before any of its task threads runs.

A warm trainer is started with the environment a run on given devices gets (CUDA_VISIBLE_DEVICES
included: CUDA reads it once, before any run is known), and is handed only a run whose command is the
plain single-process `python -m training train ...` and whose environment is exactly that one;
anything else (accelerate launch across GPUs, another environment) starts fresh, as before. Once handed
over it is the run's trainer in every way the supervisor sees: a child in its own process group (cancel
kills the group), killed with its worker (PR_SET_PDEATHSIG, set for the keeper thread that started it,
which lives as long as the worker), waited on and reaped by the supervisor. When it exits, a new one is
started for the same environment: after the run, so its imports never compete with the run's own start.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from django.conf import settings
from django.db import connection
from huey.contrib.djhuey import HUEY

from training.warm import ENTRY, ROOM
from webapp.runs import gpus

log = logging.getLogger("trainyard.worker")


def trainer_env(devices: list[str]) -> dict:
    """The environment of a run's trainer on `devices` (the supervisor's own recipe, for pre-warming)."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": gpus.cuda_visible_devices(devices),
    }


def _die_with_parent() -> None:
    """In the child: SIGKILL when the thread that started it (the keeper) dies, i.e. with the worker."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class WarmTrainers:
    """At most `size` idle warm trainers, one per environment, started by one long-lived keeper thread."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._idle: list[tuple[dict, subprocess.Popen]] = []  # oldest first
        self._wanted: queue.Queue = queue.Queue()
        self._keeper: threading.Thread | None = None
        self._closed = False  # the worker is stopping: start no more

    def prewarm(self, env: dict) -> None:
        """Have a warm trainer ready for runs with this environment (started in the background)."""
        if self.size <= 0:
            return
        with self._lock:
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep, name="warm-trainers", daemon=True)
                self._keeper.start()
        self._wanted.put(dict(env))

    def take(self, command: list[str], env: dict, cwd: Path, log_path: Path) -> subprocess.Popen | None:
        """A warm trainer running `command` for the run, or None (the caller starts a fresh one)."""
        if command[:1] != [sys.executable] or command[1:3] != ENTRY:
            return None  # accelerate launch (several processes), or something else: never warm
        with self._lock:
            found = next((i for i, (e, p) in enumerate(self._idle) if e == env and p.poll() is None), None)
            if found is None:
                for other, _ in self._idle:  # say why: a warm trainer nobody can use is wasted memory
                    keys = sorted(k for k in set(other) | set(env) if other.get(k) != env.get(k))
                    log.info("warm trainer not used: the run's environment differs in %s", ", ".join(keys))
                return None
            _, proc = self._idle.pop(found)
        request = {"argv": command[3:], "cwd": str(cwd), "log": str(log_path)}
        try:
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.close()
        except OSError:  # it died since we looked: a fresh trainer then
            self._stop(proc)
            return None
        threading.Thread(target=self._refill_after, args=(proc.pid, env), daemon=True).start()
        log.info("run %s: handed to warm trainer %s", cwd, proc.pid)
        return proc

    def stop_all(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _, proc in idle:
            self._stop(proc)

    def idle_count(self) -> int:
        with self._lock:
            return sum(1 for _, p in self._idle if p.poll() is None)

    # -- keeper ------------------------------------------------------------------------------------
    def _keep(self) -> None:
        while True:
            env = self._wanted.get()
            with self._lock:
                self._idle = [(e, p) for e, p in self._idle if p.poll() is None]
                if self._closed or any(e == env for e, _ in self._idle):
                    continue
            try:
                proc = self._start(env)
            except OSError:
                log.exception("could not start a warm trainer")
                continue
            with self._lock:
                self._idle.append((env, proc))
                cut = max(0, len(self._idle) - (0 if self._closed else self.size))  # the oldest go
                evicted, self._idle = self._idle[:cut], self._idle[cut:]
            for _, old in evicted:
                self._stop(old)

    def _start(self, env: dict) -> subprocess.Popen:
        # What the imports print goes to an unlinked file, copied to the run's log at the hand-off.
        with tempfile.TemporaryFile(prefix="trainyard-warm-") as output:
            return subprocess.Popen(
                [sys.executable, "-m", "training.warm", ROOM],
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=settings.DATA_DIR,
                start_new_session=True,  # its own process group, as a fresh trainer's
                preexec_fn=_die_with_parent,
            )

    def _refill_after(self, pid: int, env: dict) -> None:
        """Wait (without reaping: the supervisor does) until the handed-over trainer exits, then ask for
        a new warm trainer for the same environment."""
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            fd = None
        try:
            if fd is not None:
                select.select([fd], [], [])
            else:
                while _alive(pid):
                    time.sleep(1)
        finally:
            if fd is not None:
                os.close(fd)
        self._wanted.put(env)

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# TRAINYARD_WARM_TRAINERS: idle warm trainers a worker keeps (0: none). Each holds the imported libraries,
# ~0.6 GB of memory, and no device memory (CUDA is first touched by the run).
POOL = WarmTrainers(int(os.environ.get("TRAINYARD_WARM_TRAINERS", "1")))


def take(command: list[str], env: dict, cwd: Path, log_path: Path) -> subprocess.Popen | None:
    """The supervisor's hook: a warm trainer for this run, or None to start a fresh one."""
    return POOL.take(command, env, cwd, log_path)


# -- the worker's start ------------------------------------------------------------------------------
_started = threading.Lock()
_done = False


def preload_libraries() -> None:
    """torch, transformers and peft imported once: transformers' lazy module is not safe to import from
    several threads at once (three tasks importing it together got "cannot import name 'AutoTokenizer'")."""
    from training.warm import preload

    environ = dict(os.environ)
    preload()
    # Imports set variables (TOKENIZERS_PARALLELISM, TORCHINDUCTOR_CACHE_DIR): a trainer's environment
    # stays what it was (the trainer's own imports set them the same way), equal to the warm trainers'.
    os.environ.clear()
    os.environ.update(environ)


def warm_web_process() -> None:
    """In the web server (embedded mode): import torch in the background, as checking a config against this
    machine does (is CUDA there?), so the first "Start run" or config check after a start doesn't wait the
    ~6 s import. Scaled out, the web host checks no machine (each worker checks its own): nothing to do."""
    if settings.REDIS_URL:
        return

    def work():
        try:
            import torch

            torch.cuda.is_available()
        except Exception:  # the config check meets the same problem, and reports it
            pass

    threading.Thread(target=work, name="warm-imports", daemon=True).start()


@HUEY.on_startup()
def start_worker() -> None:
    """Every worker thread calls this before taking tasks; the first one does the work, the others wait
    for it, so no task runs before the heavy imports are done. The warm trainer is asked for first: it
    imports in its own process while this one does."""
    global _done
    with _started:
        if _done:
            return
        try:
            devices = gpus.inventory()[:1]  # the device a lone run gets first
            POOL.prewarm(trainer_env(devices))
        except Exception:
            log.exception("could not pre-warm a trainer")
        finally:
            connection.close()
        preload_libraries()
        _done = True


@HUEY.on_shutdown()
def _stop_warm_trainers() -> None:
    POOL.stop_all()
