"""A run's status: the only code that changes it, always by a conditional UPDATE (see RunStatus).

Also the rules that read status (which runs may be resumed) and the holder's lease: a worker writes
only while `Run.holder` names it (`held_by`), beats while it holds a run, and a reaper takes a gone
worker's run over (`take_over`).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.utils import timezone

from webapp.runs.artifacts import resumable_checkpoint
from webapp.runs.models import ACTIVE_STATES, FINAL_STATES, Run, RunStatus

log = logging.getLogger("trainyard.runs")

RESUMABLE_STATES = (RunStatus.INTERRUPTED, RunStatus.FAILED, RunStatus.CANCELLED)
KEPT = "logs, metrics and checkpoints up to then are kept: resume it"
STALE_MESSAGE = f"the worker stopped reporting (killed, paused or lost); its trainer was stopped; {KEPT}"
DEAD_WORKER_MESSAGE = f"the worker process died (killed or crashed) and its trainer with it; {KEPT}"


def transition(run_id: int, from_states, to_state: str, *, held_by: str | None = None, **fields) -> bool:
    """Move a run only if it is still in one of `from_states` (a conditional UPDATE: no lost race)
    and, with `held_by`, only while that worker still holds it (a fenced-off worker changes nothing)."""
    if to_state in FINAL_STATES:
        fields.setdefault("finished_at", timezone.now())
    runs = Run.objects.filter(pk=run_id, status__in=list(from_states))
    if held_by is not None:
        runs = runs.filter(holder=held_by)
    return runs.update(status=to_state, **fields) == 1


def finish_run(run_id: int, state: str, message: str, held_by: str | None = None) -> bool:
    ok = transition(run_id, ACTIVE_STATES, state, held_by=held_by, message=message[:2000])
    if ok:
        log.info("run %s ended %s: %s", run_id, state, message)
    return ok


def held(run_id: int, holder: str) -> dict | None:
    """The run's cancel flag while `holder` still holds it (starting or running); None once it does
    not: the reaper took it over or ended it, and the holder must stop writing."""
    return (
        Run.objects.filter(pk=run_id, holder=holder, status__in=[RunStatus.STARTING, RunStatus.RUNNING])
        .values("cancel_requested")
        .first()
    )


class RunLocked(Exception):
    """The run's row stayed locked: its holder was paused in the middle of recording (a transaction)."""


def take_over(run_id: int, holder: str, new_holder: str, lock_wait: float = 2.0) -> bool:
    """The reaper becomes the holder of a run whose worker is gone (compare-and-set on the holder:
    of two reapers, one settles the run; the old worker, should it wake, finds its lease taken).
    RunLocked after `lock_wait` s on a locked row (SQLite: the whole database)."""
    runs = Run.objects.filter(pk=run_id, holder=holder, status__in=[RunStatus.STARTING, RunStatus.RUNNING])
    try:
        with _atomic_waiting_at_most(lock_wait):
            return runs.update(holder=new_holder, heartbeat_at=timezone.now()) == 1
    except OperationalError as exc:
        if "lock" in str(exc).lower():  # SQLite "database is locked"; PostgreSQL "lock timeout"
            raise RunLocked(str(exc)) from exc
        raise


@contextmanager
def _atomic_waiting_at_most(seconds: float):
    """A transaction that waits at most `seconds` for a lock (the default is 30 s on SQLite, forever
    on PostgreSQL). On SQLite the wait is set before BEGIN: our transactions are IMMEDIATE (settings),
    so BEGIN itself takes the write lock, under whatever busy timeout is then in force (a wait set
    inside the transaction came too late: the reaper waited 30 s behind a paused worker, seen in CI)."""
    ms = max(1, int(seconds * 1000))
    if connection.vendor != "sqlite":
        with transaction.atomic():
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute(f"SET LOCAL lock_timeout = {ms}")
            yield
        return
    default_ms = int(connection.settings_dict["OPTIONS"].get("timeout", 5) * 1000)
    with connection.cursor() as cursor:
        cursor.execute(f"PRAGMA busy_timeout = {ms}")
    try:
        with transaction.atomic():
            yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"PRAGMA busy_timeout = {default_ms}")


def request_cancel(run_id: int) -> bool:
    """Queued runs end at once; starting/running ones are flagged and their worker stops the trainer."""
    if transition(run_id, [RunStatus.QUEUED], RunStatus.CANCELLED, message="cancelled before it started"):
        return True
    active = Run.objects.filter(pk=run_id, status__in=[RunStatus.STARTING, RunStatus.RUNNING])
    return active.update(cancel_requested=True) == 1


def bump_heartbeat(run_id: int, holder: str | None = None) -> bool:
    """False when `holder` no longer holds the run (nothing is written then)."""
    runs = Run.objects.filter(pk=run_id)
    if holder is not None:
        runs = runs.filter(holder=holder, status__in=[RunStatus.STARTING, RunStatus.RUNNING])
    return runs.update(heartbeat_at=timezone.now()) == 1


def heartbeat_seconds() -> float:
    """How often a holder beats: well inside the timeout after which a reaper takes its runs."""
    return max(0.05, min(5.0, settings.TRAINYARD_HEARTBEAT_TIMEOUT / 4))


@contextmanager
def beating(run_id: int, holder: str | None = None):
    """Heartbeats from a thread while the block runs (packaging artifacts after training)."""
    done = threading.Event()

    def beat():
        while not done.wait(heartbeat_seconds()):
            try:
                bump_heartbeat(run_id, holder)
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


class CannotResume(ValueError):
    pass


def resume_point(run: Run) -> Path:
    """The checkpoint a new attempt of `run` starts from; CannotResume says why there is none."""
    if run.status not in RESUMABLE_STATES:
        raise CannotResume(f"only an interrupted, failed or cancelled run can be resumed (this one is {run.status})")
    checkpoint = resumable_checkpoint(run)  # its own newest, else the one this attempt started from
    if checkpoint is None:
        raise CannotResume("this run saved no checkpoint (set save_steps in the config): start a new run instead")
    return checkpoint
