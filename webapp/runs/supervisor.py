"""One training subprocess per run, supervised by the worker thread that holds the run: start it,
watch it (watch.py: tail its events file into rows, beat, obey cancel, kill it if hung), and end the
run from how it exited.

The worker holds the run under its process name (`Run.holder`) and writes only while it still
does: a worker that was paused long enough for a reaper to take the run over finds its lease taken,
stops its trainer and writes nothing more (fencing; see reaper.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys

from django.utils import timezone

from training import sharding
from webapp.runs import disk, gpus, lifecycle, processes, recording, warm
from webapp.runs.configs import trust_remote_code_allowed
from webapp.runs.models import Run, RunStatus
from webapp.runs.watch import LeaseLost, Watch, kill_group

log = logging.getLogger("trainyard.worker")


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
    watch = Watch(run_id, holder, proc, run.events_offset, run.run_dir / "events.jsonl")
    try:
        watch.run()
    except LeaseLost:
        log.warning("run %s: taken over while this worker was away; stopping its trainer, writing nothing", run_id)
        return
    finally:
        if proc.poll() is None:  # we are leaving (lease lost, database gone): never leave it orphaned
            kill_group(proc, signal.SIGKILL)
            proc.wait()
    _finish(run_id, holder, proc.returncode, watch)


def _finish(run_id: int, holder: str, returncode: int, watch: Watch) -> None:
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
