"""Huey tasks: the public functions queue (called after commit), the private tasks take only ids,
re-fetch the row and return quietly if it is gone. A run's task waits for its devices, then the
supervisor runs its trainer; devices are released however the run ends. The reaper, every
REAP_SECONDS in every worker, ends the runs of dead workers and hands orphaned queued runs on."""

from __future__ import annotations

import logging
from pathlib import Path

from django.utils import timezone
from huey.consumer import Scheduler
from huey.contrib.djhuey import HUEY, db_periodic_task, db_task

from webapp.runs import artifacts, gpus, lifecycle, recording, supervisor
from webapp.runs.configs import run_base_model
from webapp.runs.models import Generation, Run, RunStatus

log = logging.getLogger("trainyard.worker")
WAIT_FOR_DEVICES_SECONDS = 3
REAP_SECONDS = 5  # a dead worker's run turns `interrupted` this long after its heartbeat times out
ORPHAN_SECONDS = 60

# Huey looks for due periodic tasks once a minute; the reaper is the only periodic task and must
# notice a dead worker within seconds, with no page open (pages only read).
Scheduler.periodic_task_seconds = REAP_SECONDS


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
        lifecycle.finish_run(run_id, RunStatus.FAILED, str(exc))
        return
    if devices is None:  # not our turn or not enough free devices: look again shortly
        # A queued run's heartbeat says a task still looks after it (see requeue_orphaned_runs).
        Run.objects.filter(pk=run_id, status=RunStatus.QUEUED).update(heartbeat_at=timezone.now())
        _execute_run.schedule((run_id,), delay=WAIT_FOR_DEVICES_SECONDS)
        return
    try:
        supervisor.supervise(run_id, devices)
    finally:
        gpus.release_gpus(run_id)


def every_reap_period(now) -> bool:
    """Due at every look of the scheduler (every REAP_SECONDS, set above)."""
    return True


@db_periodic_task(every_reap_period)
def _reap_stale_runs() -> None:
    recording.mark_stale_runs_interrupted()
    gpus.release_leases_of_ended_runs()
    requeue_orphaned_runs()


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
    recording.mark_stale_runs_interrupted()
    gpus.release_leases_of_ended_runs()


def answer_prompt(generation_id: int) -> None:
    """Public entry: queue a playground generation (after commit)."""
    _answer_prompt(generation_id)


@db_task()
def _answer_prompt(generation_id: int) -> None:
    from training.generate import generate_pair

    gen = Generation.objects.select_related("run").filter(pk=generation_id, status="pending").first()
    if gen is None:
        return
    try:
        base_text, tuned_text = generate_pair(run_base_model(gen.run), Path(gen.source), gen.prompt)
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
        merge_adapter_into_base(run_base_model(run), run.run_dir / "adapter", run.run_dir / "merged")
    except Exception:
        log.exception("merging the adapter of run %s failed", run_id)
        return
    artifacts.package_artifacts(run, kinds=("merged",))
