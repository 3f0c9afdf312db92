"""One training subprocess per run, supervised by the worker thread that holds the run: start it,
tail its events file into rows (recording), beat, obey cancel, and end the run from how it exited.

The worker holds the run under its process name (`Run.holder`) and writes only while it still
does: a worker that was paused long enough for a reaper to take the run over finds its lease taken,
stops its trainer and writes nothing more (fencing; see reaper.py). Every CHECK_SECONDS it looks at
the run (cancel, lease), its own stop (SIGTERM of the worker) and the trainer's beat. Cancel is
graceful first: the STOP file (training/events.py) stops the trainer at the next step boundary;
one that does not within STOP_GRACE_SECONDS (or has not begun its loop) gets SIGTERM, then SIGKILL.
A trainer in its loop that stops beating for the progress timeout is killed as hung.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from training import events as ev
from training import sharding
from training.events import STOP_FILE, read_located_events
from webapp.runs import disk, gpus, lifecycle, processes, recording, warm
from webapp.runs.configs import trust_remote_code_allowed
from webapp.runs.models import Run, RunStatus

log = logging.getLogger("trainyard.worker")
POLL_SECONDS = 0.02  # how often the events file is looked at: one stat() when nothing is new
CHECK_SECONDS = 0.5  # how often the run (cancel, lease), the worker's own stop and the trainer's beat are looked at
STOP_GRACE_SECONDS = 10  # a cancelled trainer's time to reach a step boundary before SIGTERM
DATABASE_GRACE_SECONDS = 120  # how long the supervisor rides out a database it can't write to
SLOW_STEP_FACTOR = 2  # a trainer is hung after this many times its slowest step seen (or the setting)

_stopping = threading.Event()  # the worker is stopping (SIGTERM): every run it holds ends interrupted
_active: set[int] = set()
_active_changed = threading.Condition()


class LeaseLost(Exception):
    """The run was taken over (this worker was paused or cut off for longer than the heartbeat
    timeout): stop its trainer and write nothing more."""


def command(run: Run, devices: list[str]) -> list[str]:
    args = ["-m", "training", "train", str(run.run_dir / "config.yaml"), "--run-dir", str(run.run_dir)]
    if run.resume_checkpoint:
        args += ["--resume", run.resume_checkpoint]
    if trust_remote_code_allowed():
        args.append("--allow-trust-remote-code")
    gpu_count = len(gpus.cuda_visible_devices(devices).split(",")) if gpus.cuda_visible_devices(devices) else 0
    if gpu_count > 1:
        # One process per GPU through accelerate, with a config generated from the run's (DDP, FSDP2
        # or DeepSpeed: training/sharding.py) and a port of its own, so runs go side by side.
        launch = sharding.multi_process_launch(_run_config(run), run.run_dir, gpu_count, _free_port())
        return [sys.executable, *launch, *args]
    return [sys.executable, *args]


def _run_config(run: Run):
    """The run's frozen config, or None when it can't be read here (the trainer says why)."""
    from training.config import parse_config

    try:
        return parse_config((run.run_dir / "config.yaml").read_text(), allow_trust_remote_code=True)
    except Exception:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the worker thread that started us dies (Linux), so a killed
    worker never leaves a trainer running that nobody records."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn_trainer(run: Run, devices: list[str]) -> subprocess.Popen:
    """The one place a trainer process starts: its own process group (cancel and the reaper stop it
    and anything it spawned, never the worker), its output in the run's log, dying with the worker."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": gpus.cuda_visible_devices(devices),
    }
    argv = command(run, devices)
    # A trainer started ahead, its imports done (webapp/runs/warm.py), when one fits this run.
    warm_trainer = warm.take(argv, env, run.run_dir, run.log_path)
    if warm_trainer is not None:
        return warm_trainer
    with run.log_path.open("ab") as log_file:
        return subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=run.run_dir,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def supervise(run_id: int, devices: list[str]) -> None:
    run = Run.objects.filter(pk=run_id).first()
    if run is None:
        return
    holder, now = str(processes.this_process()), timezone.now()
    if not lifecycle.transition(
        run_id,
        [RunStatus.QUEUED],
        RunStatus.STARTING,
        started_at=now,
        heartbeat_at=now,
        devices=devices,
        holder=holder,
    ):
        return  # cancelled meanwhile, or another worker has it
    if problem := disk.problem_before_start(run):  # a full data dir, a run folder that can't be written
        lifecycle.finish_run(run_id, RunStatus.FAILED, problem, held_by=holder)
        return
    proc = spawn_trainer(run, devices)
    trainer = processes.ProcessName.of(proc.pid)  # for the reaper, should this worker be cut off
    Run.objects.filter(pk=run_id, holder=holder).update(trainer=str(trainer or ""))
    watch = _Watch(run_id, holder, proc, run.events_offset, run.run_dir / "events.jsonl")
    try:
        watch.run()
    except LeaseLost:
        log.warning("run %s: taken over while this worker was away; stopping its trainer, writing nothing", run_id)
        return
    finally:
        if proc.poll() is None:  # we are leaving (lease lost, database gone): never leave it orphaned
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
    _finish(run_id, holder, proc.returncode, watch)


class _Watch:
    """The holder's loop until its trainer exits: record new events, beat, obey cancel and the
    worker's own stop, kill a hung trainer. A database error (locked, restarting) is retried; if
    writes fail for longer than DATABASE_GRACE_SECONDS the trainer is stopped, since nothing it does
    could be recorded."""

    def __init__(self, run_id: int, holder: str, proc: subprocess.Popen, offset: int, events_path: Path):
        self.run_id, self.holder, self.proc, self.offset, self.events_path = run_id, holder, proc, offset, events_path
        self.cancelled = False
        self.stop_reason: str | None = None  # why the worker stopped the trainer itself (hung, worker stopping)
        self.term_at: float | None = None  # when a trainer asked to stop gets SIGTERM (then SIGKILL)
        self.progress = _Progress(events_path)
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
            self.term_at = now + _ask_to_stop(self.run_id, self.events_path.parent)
        if _stopping.is_set() and self.stop_reason is None:
            self.stop_reason = f"the worker was stopped (SIGTERM) and stopped its trainer; {lifecycle.KEPT}"
            self.term_at = now
        hung = self.progress.hung(now) if self.stop_reason is None else None
        if hung:
            self.stop_reason = hung
            log.warning("run %s: %s", self.run_id, hung)
            _kill_group(self.proc, signal.SIGKILL)  # a stopped process never handles SIGTERM
        elif self.term_at is not None and now >= self.term_at:
            _kill_group(self.proc)


class _Progress:
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
        return (
            f"the trainer made no progress for {silent:.0f} s (no step; its slowest step took {self.slowest:.1f} s): "
            f"hung or stopped, so it was killed; {lifecycle.KEPT}"
        )


def _ask_to_stop(run_id: int, run_dir: Path) -> float:
    """Create the STOP file; the seconds the trainer gets to stop at a step boundary (none before its
    training loop runs: loading data or a model has no step boundary to stop at)."""
    try:
        (run_dir / STOP_FILE).touch()
    except OSError:
        return 0.0
    in_loop = Run.objects.filter(pk=run_id, status=RunStatus.RUNNING).exists()
    return STOP_GRACE_SECONDS if in_loop else 0.0


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _finish(run_id: int, holder: str, returncode: int, watch: _Watch) -> None:
    if watch.cancelled:
        lifecycle.finish_run(run_id, RunStatus.CANCELLED, "cancelled by a user", held_by=holder)
        return
    outcome = Run.objects.values_list("outcome", flat=True).get(pk=run_id) or {}
    if recording.finish_as_trainer_said(run_id, outcome, held_by=holder):
        return  # it ended by itself (succeeded, failed) just as the worker stopped it: as it said
    if watch.stop_reason:
        lifecycle.finish_run(run_id, RunStatus.INTERRUPTED, watch.stop_reason, held_by=holder)
    elif returncode < 0:
        name = signal.Signals(-returncode).name
        message = f"the training process was killed ({name}); logs, metrics and checkpoints are kept"
        lifecycle.finish_run(run_id, RunStatus.INTERRUPTED, message, held_by=holder)
    else:
        message = (  # a full or read-only disk said so (disk.py), else the exit code
            disk.why_exited(run_id)
            or f"the training process exited with code {returncode} without a result; see the log"
        )
        lifecycle.finish_run(run_id, RunStatus.FAILED, message, held_by=holder)


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


def stop_all() -> None:
    """The worker is stopping: each run it holds stops its trainer and ends `interrupted`."""
    _stopping.set()


def wait_until_idle(timeout: float) -> bool:
    """After stop_all: True once no run is supervised here any more."""
    with _active_changed:
        return _active_changed.wait_for(lambda: not _active, timeout=timeout)
