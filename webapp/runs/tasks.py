"""Huey tasks. The worker waits for the run's devices, supervises one training subprocess per run and
is the single writer of its rows: it tails the run's events file into the database, beats, and kills
the process on cancel. Devices are released however the run ends."""

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
from huey import crontab
from huey.contrib.djhuey import HUEY, db_periodic_task, db_task

from training import sharding
from training.events import read_events
from webapp.runs import gpus, services
from webapp.runs.models import Run, RunStatus

log = logging.getLogger("trainyard.worker")
POLL_SECONDS = 0.02  # how often the events file is looked at: one stat() when nothing is new
HEARTBEAT_SECONDS = 5
WAIT_FOR_DEVICES_SECONDS = 3


def execute_run(run_id: int) -> None:
    """Public entry: queue a run (called after the creating transaction commits). If the queue
    can't be reached, the run stays queued and the reaper hands it to a worker later."""
    try:
        _execute_run(run_id)
    except Exception:
        log.exception("run %s: could not reach the queue; the reaper will retry", run_id)


@db_task()
def _execute_run(run_id: int) -> None:
    run = Run.objects.filter(pk=run_id, status=RunStatus.QUEUED).first()
    if run is None:
        return  # deleted, cancelled, or another worker has it
    try:
        devices = gpus.claim_devices(run)  # all of a sharded run's devices at once, or none
    except ValueError as exc:
        services.finish_run(run_id, RunStatus.FAILED, str(exc))
        return
    if devices is None:  # not our turn or not enough free devices: look again shortly
        # A queued run's heartbeat says a task still looks after it (see requeue_orphaned_runs).
        Run.objects.filter(pk=run_id, status=RunStatus.QUEUED).update(heartbeat_at=timezone.now())
        _execute_run.schedule((run_id,), delay=WAIT_FOR_DEVICES_SECONDS)
        return
    try:
        supervise(run_id, devices)
    finally:
        gpus.release_gpus(run_id)


@db_periodic_task(crontab(minute="*"))
def _reap_stale_runs() -> None:
    services.mark_stale_runs_interrupted()
    gpus.release_leases_of_ended_runs()
    requeue_orphaned_runs()


ORPHAN_SECONDS = 60


def requeue_orphaned_runs() -> int:
    """Queued runs no task looks after (the enqueue failed, or a worker died holding the task)
    would block the queue forever: hand them to the queue again. A task that still exists beats
    every few seconds while it waits, so a live one is never doubled (and a doubled one is
    harmless: only one can move the run out of `queued`)."""
    cutoff = timezone.now() - timezone.timedelta(seconds=ORPHAN_SECONDS)
    orphans = list(
        Run.objects.filter(status=RunStatus.QUEUED, created_at__lt=cutoff)
        .exclude(heartbeat_at__gte=cutoff)
        .values_list("pk", flat=True)
    )
    for run_id in orphans:
        Run.objects.filter(pk=run_id).update(heartbeat_at=timezone.now())
        execute_run(run_id)
    return len(orphans)


@HUEY.on_startup()
def _reap_on_startup() -> None:
    # A worker that restarts after a crash ends the runs it left behind straight away.
    services.mark_stale_runs_interrupted()
    gpus.release_leases_of_ended_runs()


def command(run: Run, devices: list[str]) -> list[str]:
    args = ["-m", "training", "train", str(run.run_dir / "config.yaml"), "--run-dir", str(run.run_dir)]
    if run.resume_checkpoint:
        args += ["--resume", run.resume_checkpoint]
    if services.trust_remote_code_allowed():
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
    if not services.transition(
        run_id, [RunStatus.QUEUED], RunStatus.STARTING, started_at=now, heartbeat_at=now, devices=devices
    ):
        return  # cancelled meanwhile, or another worker has it
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


DATABASE_GRACE_SECONDS = 120  # how long the supervisor rides out a database it can't write to


def _watch(run_id: int, proc: subprocess.Popen, offset: int, events_path: Path):
    """Tail the events into rows, beat and obey cancel until the trainer exits. A database error
    (locked, restarting, Redis publish failing) is retried; if writes fail for longer than
    DATABASE_GRACE_SECONDS the trainer is stopped, since nothing it does could be recorded."""
    last_beat, cancelled, final, failing_since = 0.0, False, None, None
    while True:
        exited = proc.poll() is not None
        try:
            events, new_offset = read_events(events_path, offset)
            if events or new_offset != offset:
                services.record_events(run_id, events, new_offset)
                offset = new_offset
                final = next(
                    (
                        e
                        for e in reversed(events)
                        if e.get("event") == "status" and e.get("state") in ("succeeded", "failed", "cancelled")
                    ),
                    final,
                )
            now_s = time.monotonic()
            if now_s - last_beat >= HEARTBEAT_SECONDS:
                services.bump_heartbeat(run_id)
                last_beat = now_s
                if Run.objects.filter(pk=run_id, cancel_requested=True).exists():
                    cancelled = True
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


@contextmanager
def _beating(run_id: int):
    """Heartbeats from a thread while the block runs (packaging artifacts after training)."""
    done = threading.Event()

    def beat():
        while not done.wait(HEARTBEAT_SECONDS):
            try:
                services.bump_heartbeat(run_id)
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
        services.finish_run(
            run_id,
            RunStatus.INTERRUPTED,
            f"the training process was killed ({name}); logs, metrics and checkpoints are kept",
        )
        return
    services.finish_run(
        run_id, RunStatus.FAILED, f"the training process exited with code {returncode} without a result; see the log"
    )


def answer_prompt(generation_id: int) -> None:
    """Public entry: queue a playground generation (after commit)."""
    _answer_prompt(generation_id)


@db_task()
def _answer_prompt(generation_id: int) -> None:
    from training.generate import generate_pair
    from webapp.runs.models import Generation

    gen = Generation.objects.select_related("run").filter(pk=generation_id, status="pending").first()
    if gen is None:
        return
    try:
        base_text, tuned_text = generate_pair(services.run_base_model(gen.run), Path(gen.source), gen.prompt)
    except Exception as exc:  # the page shows why; the worker goes on
        Generation.objects.filter(pk=generation_id).update(status="failed", error=str(exc)[:2000])
        return
    Generation.objects.filter(pk=generation_id).update(status="done", base_text=base_text, tuned_text=tuned_text)


def merge_adapter(run_id: int) -> None:
    """Public entry: queue the merge of a run's adapter into its base model."""
    _merge_adapter(run_id)


@db_task()
def _merge_adapter(run_id: int) -> None:
    from training.modeling import merge_adapter_into_base

    run = Run.objects.filter(pk=run_id).first()
    if run is None or run.artifacts.filter(kind="merged").exists():
        return
    try:
        merge_adapter_into_base(services.run_base_model(run), run.run_dir / "adapter", run.run_dir / "merged")
    except Exception:
        log.exception("merging the adapter of run %s failed", run_id)
        return
    services.package_artifacts(run, kinds=("merged",))
