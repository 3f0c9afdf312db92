"""The reaper: ends the runs of workers that are gone, fenced: a run's devices are freed only once
its trainer is known to be stopped. Every worker process runs it (tasks.py: a thread, at start and
every TRAINYARD_REAP_SECONDS), so it runs on every host even while every worker thread trains.

A run's worker is gone when
- it lived on this host and its process is no more (pid + start time): seen at the next pass, at
  once by a worker that starts; no timeout to wait;
- it stopped beating for TRAINYARD_HEARTBEAT_TIMEOUT (paused, cut off). A reaper on another host
  waits twice that, so the run's own host, which can stop the trainer, goes first.
The reaper then (1) stops the run's trainer if it runs on this host (SIGKILL to its group, waiting
until it is gone); (2) takes the run over (a compare-and-set on `Run.holder`: of two reapers one
settles it, and the old worker, should it wake, finds its lease taken and writes nothing more);
(3) records what was left unread and ends the run as the trainer said it ended (succeeded with its
adapter, failed, cancelled) or else `interrupted`; (4) frees the run's devices of this host. A
device of another host is freed there: only there can its trainer be proven stopped.
"""

from __future__ import annotations

import logging
import socket

from django.conf import settings
from django.utils import timezone

from webapp.runs import lifecycle, recording
from webapp.runs.models import FINAL_STATES, DeviceLease, MergeState, Run, RunStatus
from webapp.runs.processes import ProcessName, this_process

log = logging.getLogger("trainyard.worker")
REMOTE_FACTOR = 2  # a reaper on another host than the run's waits this many heartbeat timeouts


def reap(max_age_seconds: float | None = None, trust_heartbeats: bool = True) -> int:
    """One pass: end the runs of gone workers, free this host's devices of ended runs; the number
    of runs ended. `max_age_seconds` overrides the heartbeat timeout (tests). Without
    `trust_heartbeats` only dead processes of this host count: a reaper that could not reach the
    database itself for a while can't tell a silent worker from one that could not write either
    (after a database outage every heartbeat is old, and no run must be killed for that)."""
    me = str(this_process())
    timeout = settings.TRAINYARD_HEARTBEAT_TIMEOUT if max_age_seconds is None else max_age_seconds
    now = timezone.now()
    ended = 0
    active = Run.objects.filter(status__in=[RunStatus.STARTING, RunStatus.RUNNING])
    for run in active.only("pk", "holder", "trainer", "heartbeat_at"):
        reason = _why_gone(run, now, timeout if trust_heartbeats else float("inf"))
        if reason and _settle(run, me, reason):
            ended += 1
    free_devices_of_ended_runs()
    fail_orphaned_merges()
    return ended


def _why_gone(run: Run, now, timeout: float) -> str | None:
    holder = ProcessName.parse(run.holder)
    if holder is not None and holder.alive() is False:
        return lifecycle.DEAD_WORKER_MESSAGE
    age = (now - run.heartbeat_at).total_seconds() if run.heartbeat_at else float("inf")
    if age > timeout * (REMOTE_FACTOR if holder is not None and not holder.here else 1):
        return lifecycle.STALE_MESSAGE
    return None


def _settle(run: Run, me: str, reason: str) -> bool:
    trainer = ProcessName.parse(run.trainer)
    if trainer is not None and trainer.here and not trainer.stop_group():
        log.warning("run %s: its trainer %s would not stop; trying again at the next pass", run.pk, trainer)
        return False
    try:
        if not lifecycle.take_over(run.pk, run.holder, me):
            return False  # another reaper has it, or its worker ended it meanwhile
    except lifecycle.RunLocked:
        # Its worker was paused in the middle of recording and holds the run's row (with SQLite, every
        # write of the site). On this host it is stopped; elsewhere PostgreSQL ends its session after
        # the heartbeat timeout (recording sets idle_in_transaction_session_timeout).
        holder = ProcessName.parse(run.holder)
        if holder is not None and holder.here and holder.alive():
            log.warning("run %s: its silent worker %s holds the run's row: stopping that worker", run.pk, holder)
            holder.stop()
        return False  # the next pass takes it over
    outcome = recording.catch_up_events(run.pk)
    if not recording.finish_as_trainer_said(run.pk, outcome, held_by=me):
        lifecycle.finish_run(run.pk, RunStatus.INTERRUPTED, reason, held_by=me)
    if trainer is None or trainer.here:
        _this_hosts_leases(run.pk).delete()
    log.info("run %s: its worker was gone (%s); ended", run.pk, reason)
    return True


def _this_hosts_leases(run_id: int):
    return DeviceLease.objects.filter(run_id=run_id, device__startswith=f"{socket.gethostname()}:")


def free_devices_of_ended_runs() -> int:
    """Leases of this host left by a worker that died or was fenced off: freed once the ended run's
    trainer is stopped (a trainer that trains on after its run was ended elsewhere is stopped here)."""
    freed = 0
    leases = DeviceLease.objects.filter(device__startswith=f"{socket.gethostname()}:", run__status__in=FINAL_STATES)
    for run_id, trainer_name in set(leases.values_list("run_id", "run__trainer")):
        trainer = ProcessName.parse(trainer_name)
        if trainer is None or trainer.stop_group():
            freed += _this_hosts_leases(run_id).delete()[0]
    return freed


ORPHANED_MERGE_MESSAGE = "the worker merging it stopped before the merge ended (killed or restarted): merge again"


def fail_orphaned_merges() -> int:
    """Merges whose worker process of this host is gone end `failed`, so the page stops waiting and
    offers the merge again (a merge of another host is judged there)."""
    failed = 0
    for run_id, holder in Run.objects.filter(merge_state=MergeState.MERGING).values_list("pk", "merge_holder"):
        name = ProcessName.parse(holder)
        if name is not None and name.alive() is False:
            failed += Run.objects.filter(pk=run_id, merge_state=MergeState.MERGING, merge_holder=holder).update(
                merge_state=MergeState.FAILED, merge_error=ORPHANED_MERGE_MESSAGE, merge_holder=""
            )
    return failed
