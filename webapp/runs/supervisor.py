"""One training subprocess per run, supervised by the worker thread that holds the run: start it,
tail its events file into rows (recording), beat, obey cancel, and end the run from how it exited.

Cancel is graceful first: the worker creates the run's STOP file (training/events.py), the trainer
stops at the next step boundary and ends `cancelled`; one that does not within STOP_GRACE_SECONDS
(or has not begun its loop yet) gets SIGTERM, then SIGKILL.
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

from django.db import connection
from django.utils import timezone

from training import events as ev
from training import sharding
from training.events import STOP_FILE, StatusEvent, read_events
from webapp.runs import artifacts, disk, gpus, lifecycle, recording
from webapp.runs.configs import trust_remote_code_allowed
from webapp.runs.models import Run, RunStatus

log = logging.getLogger("trainyard.worker")
POLL_SECONDS = 0.02  # how often the events file is looked at: one stat() when nothing is new
HEARTBEAT_SECONDS = 5
STOP_GRACE_SECONDS = 10  # a cancelled trainer's time to reach a step boundary before SIGTERM
DATABASE_GRACE_SECONDS = 120  # how long the supervisor rides out a database it can't write to


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


def supervise(run_id: int, devices: list[str]) -> None:
    run = Run.objects.filter(pk=run_id).first()
    if run is None:
        return
    now = timezone.now()
    if not lifecycle.transition(
        run_id, [RunStatus.QUEUED], RunStatus.STARTING, started_at=now, heartbeat_at=now, devices=devices
    ):
        return  # cancelled meanwhile, or another worker has it
    if problem := disk.problem_before_start(run):  # a full data dir, a run folder that can't be written
        lifecycle.finish_run(run_id, RunStatus.FAILED, problem)
        return
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": gpus.cuda_visible_devices(devices),
    }
    with run.log_path.open("ab") as log_file:
        # Own process group: cancel kills the trainer and anything it spawned, never the worker.
        proc = subprocess.Popen(
            command(run, devices),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=run.run_dir,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        returncode, cancelled, final = _watch(run_id, proc, run.events_offset, run.run_dir / "events.jsonl")
    finally:
        if proc.poll() is None:  # we are leaving (worker stopping, database gone): never leave it orphaned
            _kill_group(proc)
            proc.wait()
    with _beating(run_id):  # zipping a big model takes minutes: the run must not look abandoned
        _finish(run_id, returncode, cancelled, final)


def _watch(run_id: int, proc: subprocess.Popen, offset: int, events_path: Path):
    """Tail the events into rows, beat and obey cancel until the trainer exits. A database error
    (locked, restarting, Redis publish failing) is retried; if writes fail for longer than
    DATABASE_GRACE_SECONDS the trainer is stopped, since nothing it does could be recorded."""
    last_beat, cancelled, final, failing_since = 0.0, False, None, None
    stop_deadline = None  # once cancelled: when the trainer gets SIGTERM if it is still there
    while True:
        exited = proc.poll() is not None
        try:
            events, new_offset = read_events(events_path, offset)
            if events or new_offset != offset:
                recording.record_events(run_id, events, new_offset)
                offset = new_offset
                final = recording.final_status(events) or final
            now_s = time.monotonic()
            if now_s - last_beat >= HEARTBEAT_SECONDS:
                lifecycle.bump_heartbeat(run_id)
                last_beat = now_s
                if not cancelled and Run.objects.filter(pk=run_id, cancel_requested=True).exists():
                    cancelled = True
                    stop_deadline = now_s + _ask_to_stop(run_id, events_path.parent)
            if cancelled and not exited and now_s >= stop_deadline:
                _kill_group(proc)
            failing_since = None
        except Exception:
            log.exception("run %s: recording failed; retrying", run_id)
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > DATABASE_GRACE_SECONDS:
                raise
            exited = False  # what the trainer wrote last is still to be recorded
            if proc.poll() is None:
                time.sleep(1)
                continue
        if exited:
            return proc.returncode, cancelled, final
        time.sleep(POLL_SECONDS)


def _ask_to_stop(run_id: int, run_dir: Path) -> float:
    """Create the STOP file; the seconds the trainer gets to stop at a step boundary (none before its
    training loop runs: loading data or a model has no step boundary to stop at)."""
    try:
        (run_dir / STOP_FILE).touch()
    except OSError:
        return 0.0
    in_loop = Run.objects.filter(pk=run_id, status=RunStatus.RUNNING).exists()
    return STOP_GRACE_SECONDS if in_loop else 0.0


@contextmanager
def _beating(run_id: int):
    """Heartbeats from a thread while the block runs (packaging artifacts after training)."""
    done = threading.Event()

    def beat():
        while not done.wait(HEARTBEAT_SECONDS):
            try:
                lifecycle.bump_heartbeat(run_id)
            except Exception:
                log.exception("run %s: heartbeat failed", run_id)
            finally:
                connection.close()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _finish(run_id: int, returncode: int, cancelled: bool, final: StatusEvent | None) -> None:
    if cancelled:
        lifecycle.finish_run(run_id, RunStatus.CANCELLED, "cancelled by a user")
        return
    if final and final.get("state") == ev.SUCCEEDED and returncode == 0:
        run = Run.objects.get(pk=run_id)
        artifacts.package_artifacts(run)
        lifecycle.finish_run(run_id, RunStatus.SUCCEEDED, final.get("message", ""))
        return
    if final and final.get("state") == ev.FAILED:
        lifecycle.finish_run(run_id, RunStatus.FAILED, final.get("message") or f"exit code {returncode}")
        return
    if returncode < 0:
        name = signal.Signals(-returncode).name
        lifecycle.finish_run(
            run_id,
            RunStatus.INTERRUPTED,
            f"the training process was killed ({name}); logs, metrics and checkpoints are kept",
        )
        return
    message = (  # a full or read-only disk said so (disk.py), else the exit code
        disk.why_exited(run_id) or f"the training process exited with code {returncode} without a result; see the log"
    )
    lifecycle.finish_run(run_id, RunStatus.FAILED, message)
