"""A run's status: the only code that changes it, always by a conditional UPDATE (see RunStatus).

Also the rules that read status: which runs may be resumed, which have a dead worker (stale).
"""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from webapp.runs.artifacts import resumable_checkpoint
from webapp.runs.models import ACTIVE_STATES, FINAL_STATES, Run, RunStatus

log = logging.getLogger("trainyard.runs")

RESUMABLE_STATES = (RunStatus.INTERRUPTED, RunStatus.FAILED, RunStatus.CANCELLED)
STALE_MESSAGE = (
    "the worker stopped reporting (killed or lost); logs, metrics and checkpoints up to then are kept: resume it"
)


def transition(run_id: int, from_states, to_state: str, **fields) -> bool:
    """Move a run only if it is still in one of `from_states` (a conditional UPDATE: no lost race)."""
    if to_state in FINAL_STATES:
        fields.setdefault("finished_at", timezone.now())
    return Run.objects.filter(pk=run_id, status__in=list(from_states)).update(status=to_state, **fields) == 1


def finish_run(run_id: int, state: str, message: str) -> bool:
    ok = transition(run_id, ACTIVE_STATES, state, message=message[:2000])
    if ok:
        log.info("run %s ended %s: %s", run_id, state, message)
    return ok


def request_cancel(run_id: int) -> bool:
    """Queued runs end at once; starting/running ones are flagged and their worker stops the trainer."""
    if transition(run_id, [RunStatus.QUEUED], RunStatus.CANCELLED, message="cancelled before it started"):
        return True
    active = Run.objects.filter(pk=run_id, status__in=[RunStatus.STARTING, RunStatus.RUNNING])
    return active.update(cancel_requested=True) == 1


def bump_heartbeat(run_id: int) -> None:
    Run.objects.filter(pk=run_id).update(heartbeat_at=timezone.now())


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


def stale_run_ids(max_age_seconds: int | None = None) -> list[int]:
    """Starting/running runs whose worker stopped beating for longer than the heartbeat timeout."""
    age = settings.TRAINYARD_HEARTBEAT_TIMEOUT if max_age_seconds is None else max_age_seconds
    cutoff = timezone.now() - timezone.timedelta(seconds=age)
    stale = Run.objects.filter(status__in=[RunStatus.STARTING, RunStatus.RUNNING], heartbeat_at__lt=cutoff)
    return list(stale.values_list("pk", flat=True))
