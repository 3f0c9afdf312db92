"""Huey tasks. The worker supervises one training subprocess per run and is the single writer of its
rows: it tails the run's events file into the database, beats, and kills the process on cancel."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from huey import crontab
from huey.contrib.djhuey import db_periodic_task, db_task

from training.events import read_events
from webapp.runs import services
from webapp.runs.models import Run, RunStatus

log = logging.getLogger("trainyard.worker")
POLL_SECONDS = 0.25
HEARTBEAT_SECONDS = 5


def execute_run(run_id: int) -> None:
    """Public entry: queue a run (called after the creating transaction commits)."""
    _execute_run(run_id)


@db_task()
def _execute_run(run_id: int) -> None:
    supervise(run_id)


@db_periodic_task(crontab(minute="*"))
def _reap_stale_runs() -> None:
    services.mark_stale_runs_interrupted()


def _command(run: Run) -> list[str]:
    command = [sys.executable, "-m", "training", "train", str(run.run_dir / "config.yaml"),
               "--run-dir", str(run.run_dir)]
    if settings.TRAINYARD_ALLOW_TRUST_REMOTE_CODE:
        command.append("--allow-trust-remote-code")
    return command


def supervise(run_id: int) -> None:
    from django.utils import timezone

    run = Run.objects.filter(pk=run_id).first()
    if run is None:
        return  # deleted while queued
    if not services.transition(run_id, [RunStatus.QUEUED], RunStatus.STARTING,
                               started_at=timezone.now(), heartbeat_at=timezone.now()):
        return  # cancelled, or another worker has it
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1"}
    with run.log_path.open("ab") as log_file:
        # Own process group: cancel kills the trainer and anything it spawned, never the worker.
        proc = subprocess.Popen(_command(run), stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                cwd=run.run_dir, start_new_session=True)
    offset, last_beat, cancelled, final = run.events_offset, 0.0, False, None
    events_path = run.run_dir / "events.jsonl"
    while True:
        exited = proc.poll() is not None
        events, new_offset = read_events(events_path, offset)
        if events or new_offset != offset:
            services.record_events(run_id, events, new_offset)
            offset = new_offset
            final = next((e for e in reversed(events) if e.get("event") == "status"
                          and e.get("state") in ("succeeded", "failed", "cancelled")), final)
        if exited:
            break
        now = time.monotonic()
        if now - last_beat >= HEARTBEAT_SECONDS:
            services.bump_heartbeat(run_id)
            last_beat = now
            if Run.objects.filter(pk=run_id, cancel_requested=True).exists():
                cancelled = True
                _kill_group(proc)
        time.sleep(POLL_SECONDS)
    _finish(run_id, proc.returncode, cancelled, final)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _finish(run_id: int, returncode: int, cancelled: bool, final: dict | None) -> None:
    if cancelled:
        services.finish_run(run_id, RunStatus.CANCELLED, "cancelled by a user")
        return
    if final and final.get("state") == "succeeded" and returncode == 0:
        run = Run.objects.get(pk=run_id)
        services.package_artifacts(run)
        services.finish_run(run_id, RunStatus.SUCCEEDED, final.get("message", ""))
        return
    if final and final.get("state") == "failed":
        services.finish_run(run_id, RunStatus.FAILED, final.get("message") or f"exit code {returncode}")
        return
    if returncode < 0:
        name = signal.Signals(-returncode).name
        services.finish_run(run_id, RunStatus.INTERRUPTED,
                            f"the training process was killed ({name}); logs and metrics up to then are kept")
        return
    services.finish_run(run_id, RunStatus.FAILED,
                        f"the training process exited with code {returncode} without a result; see the log")
