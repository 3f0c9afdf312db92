"""Huey tasks: the public functions queue (called after commit), the private tasks take only ids,
re-fetch the row and return quietly if it is gone. A run's task waits for its devices, then the
supervisor runs its trainer; devices are released however the run ends. Each worker process runs
the reaper in a thread of its own, at start and every TRAINYARD_REAP_SECONDS: it ends the runs of
gone workers (reaper.py) and hands orphaned queued runs on."""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from pathlib import Path

from django.conf import settings
from django.db import connection
from django.utils import timezone
from huey.contrib.djhuey import HUEY, db_task

from webapp.runs import artifacts, gpus, lifecycle, processes, reaper, supervisor, watch
from webapp.runs.configs import run_base_model
from webapp.runs.models import Generation, MergeState, Run, RunStatus

log = logging.getLogger("trainyard.worker")
WAIT_FOR_DEVICES_SECONDS = 3
ORPHAN_SECONDS = 60


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
    with watch.holding(run_id):
        try:
            supervisor.supervise(run_id, devices)
        finally:
            gpus.release_gpus(run_id)


def reap_once(trust_heartbeats: bool = True) -> None:
    """One pass of this worker's reaper: gone workers' runs end (fenced), orphaned queued runs go
    back to the queue."""
    reaper.reap(trust_heartbeats=trust_heartbeats)
    requeue_orphaned_runs()


_reaper_started = threading.Event()
_reaper_lock = threading.Lock()


def start_reaper() -> None:
    """This worker process's reaper (once), whose first pass runs at once: a worker that restarts
    after a crash ends the runs it left behind (its dead predecessor's pid tells: no heartbeat
    timeout to wait). A thread rather than a periodic task: a queued task could wait behind busy
    worker threads, or run on another host. `manage.py worker` starts it before anything else."""
    with _reaper_lock:
        if _reaper_started.is_set():
            return
        _reaper_started.set()
    threading.Thread(target=_reap_forever, name="reaper", daemon=True).start()


@HUEY.on_startup()
def _start_reaper() -> None:
    start_reaper()  # plain `run_huey`: once its worker threads start (after the heavy imports)


def _reap_forever() -> None:
    log.info("reaper started: a pass every %s s", settings.TRAINYARD_REAP_SECONDS)
    reachable_since = None  # since when this reaper's passes reach the database
    while True:
        now = time.monotonic()
        reachable_since = reachable_since or now
        try:
            # Old heartbeats count only once the database has been reachable for a whole timeout:
            # after an outage the holders need that long to beat again (a restart ends no run).
            reap_once(trust_heartbeats=now - reachable_since >= settings.TRAINYARD_HEARTBEAT_TIMEOUT)
        except Exception:
            reachable_since = None
            log.exception("reaping failed; trying again")
        finally:
            connection.close()
        time.sleep(settings.TRAINYARD_REAP_SECONDS)


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
    try:
        _merge_adapter(run_id)
    except Exception as exc:  # the queue can't be reached: say so on the page rather than stay "queued"
        log.exception("run %s: could not queue the merge", run_id)
        Run.objects.filter(pk=run_id, merge_state=MergeState.QUEUED).update(
            merge_state=MergeState.FAILED, merge_error=f"the worker queue could not be reached ({exc}); merge again"
        )


@db_task()
def _merge_adapter(run_id: int) -> None:
    from training.modeling import merge_adapter_into_base

    run = Run.objects.filter(pk=run_id).first()
    if run is None:
        return
    merging = Run.objects.filter(pk=run_id)
    if run.artifacts.filter(kind="merged").exists():
        merging.update(merge_state=MergeState.NONE, merge_holder="")
        return
    merging.update(merge_state=MergeState.MERGING, merge_holder=str(processes.this_process()))
    try:
        merge_adapter_into_base(run_base_model(run), run.run_dir / "adapter", run.run_dir / "merged")
        artifacts.package_artifacts(run, kinds=("merged",))
    except Exception as exc:  # the run page says why, and offers to try again
        log.exception("merging the adapter of run %s failed", run_id)
        shutil.rmtree(run.run_dir / "merged", ignore_errors=True)  # a half-written model is no use, and big
        merging.update(merge_state=MergeState.FAILED, merge_error=merge_failure(exc), merge_holder="")
        return
    merging.update(merge_state=MergeState.NONE, merge_error="", merge_holder="")


def merge_failure(exc: BaseException) -> str:
    """What the run page says of a failed merge: the error's own words, with the usual fix."""
    text = f"{type(exc).__name__}: {exc}".strip()[:1500]
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        text += " (the merged model needs about as much disk as the base model: free some and merge again)"
    elif isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        text += " (the base model is loaded whole to merge: a host with more memory can do it)"
    return text
