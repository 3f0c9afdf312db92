"""The loop of the worker thread that holds a run, until its trainer exits: record new events
(recording), beat, obey cancel and the worker's own stop, and kill a hung trainer.

Every CHECK_SECONDS it looks at the run (cancel flag, lease: a worker that finds its run taken over
stops at once, LeaseLost), at the worker's own stop (stop_all: SIGTERM of the worker) and at the
trainer's beat. Cancel is graceful first: the STOP file (training/events.py) stops the trainer at the
next step boundary; one that does not within STOP_GRACE_SECONDS (or has not begun its loop) gets
SIGTERM, then SIGKILL. A trainer that stops beating between its `running` and `saving` statuses for
the progress timeout (or twice its slowest step seen) is killed as hung.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings

from training import events as ev
from training.events import STOP_FILE, read_located_events
from webapp.runs import lifecycle, recording
from webapp.runs.models import Run, RunStatus

log = logging.getLogger("trainyard.worker")
POLL_SECONDS = 0.02  # how often the events file is looked at: one stat() when nothing is new
CHECK_SECONDS = 0.5  # how often the run (cancel, lease), the worker's own stop and the trainer's beat are looked at
STOP_GRACE_SECONDS = 10  # a cancelled trainer's time to reach a step boundary before SIGTERM
DATABASE_GRACE_SECONDS = 120  # how long the watch rides out a database it can't write to
SLOW_STEP_FACTOR = 2  # a trainer is hung after this many times its slowest step seen (or the setting)

_stopping = threading.Event()  # the worker is stopping (SIGTERM): every run it holds ends interrupted
_stopping_because = ["stopped"]
_active: set[int] = set()
_active_changed = threading.Condition()


class LeaseLost(Exception):
    """The run was taken over (this worker was paused or cut off for longer than the heartbeat
    timeout): stop its trainer and write nothing more."""


class Watch:
    """The holder's loop until its trainer exits: record new events, beat, obey cancel and the
    worker's own stop, kill a hung trainer. A database error (locked, restarting) is retried; if
    writes fail for longer than DATABASE_GRACE_SECONDS the trainer is stopped, since nothing it does
    could be recorded."""

    def __init__(self, run_id: int, holder: str, proc: subprocess.Popen, offset: int, events_path: Path):
        self.run_id, self.holder, self.proc, self.offset, self.events_path = run_id, holder, proc, offset, events_path
        self.cancelled = False
        self.stop_reason: str | None = None  # why the worker stopped the trainer itself (hung, worker stopping)
        self.term_at: float | None = None  # when a trainer asked to stop gets SIGTERM (then SIGKILL)
        self.progress = Progress(events_path)
        self.last_beat = time.monotonic()

    def run(self) -> None:
        next_check, failing_since = 0.0, None
        while True:
            exited = self.proc.poll() is not None
            try:
                self._record()
                now = time.monotonic()
                if now >= next_check:
                    self._check(now, exited)
                    next_check = now + CHECK_SECONDS
                failing_since = None
            except LeaseLost:
                raise
            except Exception:
                log.exception("run %s: recording failed; retrying", self.run_id)
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > DATABASE_GRACE_SECONDS:
                    raise
                exited = False  # what the trainer wrote last is still to be recorded
                if self.proc.poll() is None:
                    time.sleep(1)
                    continue
            if exited:
                return
            time.sleep(POLL_SECONDS)

    def _record(self) -> None:
        located, end = read_located_events(self.events_path, self.offset)
        if end == self.offset:
            return
        events = [e for _, e in located]
        offsets = [o for o, _ in located]
        if not recording.record_events(
            self.run_id, events, end, from_offset=self.offset, holder=self.holder, offsets=offsets
        ):
            if lifecycle.held(self.run_id, self.holder) is None:
                raise LeaseLost()
            # Still ours, but recording stands elsewhere (never expected): go on from there.
            end = Run.objects.values_list("events_offset", flat=True).get(pk=self.run_id)
            log.warning("run %s: recording stood at byte %s, not %s", self.run_id, end, self.offset)
        self.offset = end
        self.progress.see(events)

    def _check(self, now: float, exited: bool) -> None:
        state = lifecycle.held(self.run_id, self.holder)
        if state is None:
            raise LeaseLost()
        if now - self.last_beat >= lifecycle.heartbeat_seconds():
            if not lifecycle.bump_heartbeat(self.run_id, self.holder):
                raise LeaseLost()
            self.last_beat = now
        if exited:
            return
        if state["cancel_requested"] and not self.cancelled:
            self.cancelled = True
            self.term_at = now + ask_to_stop(self.run_id, self.events_path.parent)
        if _stopping.is_set() and self.stop_reason is None:
            self.stop_reason = f"the worker was {_stopping_because[0]} and stopped its trainer; {lifecycle.KEPT}"
            self.term_at = now
        hung = self.progress.hung(now) if self.stop_reason is None else None
        if hung:
            self.stop_reason = hung
            log.warning("run %s: %s", self.run_id, hung)
            kill_group(self.proc, signal.SIGKILL)  # a stopped process never handles SIGTERM
        elif self.term_at is not None and now >= self.term_at:
            kill_group(self.proc)


class Progress:
    """The trainer's beat: its events file's mtime (each event, and a touch every step), watched
    between the `running` and `saving` states, the loop, where steps come one after another."""

    def __init__(self, events_path: Path):
        self.path, self.armed, self.mtime, self.changed_at, self.slowest = events_path, False, None, 0.0, 0.0

    def see(self, events: list) -> None:
        for event in events:
            if event.get("event") == ev.STATUS:
                self.armed = event.get("state") == ev.RUNNING
                self.changed_at, self.slowest = time.monotonic(), 0.0

    def hung(self, now: float) -> str | None:
        if not self.armed:
            return None
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return None
        if mtime != self.mtime:
            if self.mtime is not None:
                self.slowest = max(self.slowest, now - self.changed_at)
            self.mtime, self.changed_at = mtime, now
            return None
        timeout = max(settings.TRAINYARD_PROGRESS_TIMEOUT, SLOW_STEP_FACTOR * self.slowest)
        silent = now - self.changed_at
        if silent <= timeout:
            return None
        slowest = f"; its slowest step before took {self.slowest:.1f} s" if self.slowest >= 1 else ""
        return (
            f"the trainer made no progress for {silent:.0f} s (no step{slowest}): hung or stopped, so it was "
            f"killed; {lifecycle.KEPT}"
        )


def ask_to_stop(run_id: int, run_dir: Path) -> float:
    """Create the STOP file; the seconds the trainer gets to stop at a step boundary (none before its
    training loop runs: loading data or a model has no step boundary to stop at)."""
    try:
        (run_dir / STOP_FILE).touch()
    except OSError:
        return 0.0
    in_loop = Run.objects.filter(pk=run_id, status=RunStatus.RUNNING).exists()
    return STOP_GRACE_SECONDS if in_loop else 0.0


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


# -- the worker's own stop (webapp/runs/management/commands/worker.py) ---------------------------


@contextmanager
def holding(run_id: int):
    """Around all a worker does for a run it holds (supervise, then free its devices): a stopping
    worker waits for it (wait_until_idle)."""
    with _active_changed:
        _active.add(run_id)
    try:
        yield
    finally:
        with _active_changed:
            _active.discard(run_id)
            _active_changed.notify_all()


def stop_all(how: str = "stopped") -> None:
    """The worker is stopping (`how`: "stopped (SIGTERM)"): each run it holds stops its trainer and
    ends `interrupted`, saying so."""
    if not _stopping.is_set():
        _stopping_because[0] = how
        _stopping.set()


def wait_until_idle(timeout: float) -> bool:
    """After stop_all: True once no run is supervised here any more."""
    with _active_changed:
        return _active_changed.wait_for(lambda: not _active, timeout=timeout)
