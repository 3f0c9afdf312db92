"""The worker's single-writer path: a trainer's events -> metric rows, run fields and artifacts ->
health -> a publish to the run's pages after commit. Only the worker that holds a run (and the
reaper, once it has taken a dead worker's run over) calls it; pages and the API read what it wrote.

Recording is idempotent: a range of the events file is recorded in one transaction that moves the
run's stored offset from the range's start to its end (a compare-and-set), and each metric row
carries its event's byte offset (unique per run). A range read twice — a retry, a worker that wakes
after the reaper caught up, two reapers — is stored once. Publishing is best-effort and after the
commit: a failed publish loses nothing (pages also read the rows) and never causes a re-record.
"""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from training import events as ev
from training.events import Event, read_located_events
from webapp.runs import artifacts, lifecycle, realtime
from webapp.runs.models import MetricPoint, Run, RunStatus

log = logging.getLogger("trainyard.worker")


def record_events(
    run_id: int,
    events: list[Event],
    new_offset: int,
    *,
    from_offset: int | None = None,
    holder: str | None = None,
    offsets: list[int] | None = None,
) -> bool:
    """Record the events the trainer wrote from byte `from_offset` (default: where recording stands)
    to `new_offset` of its events file; `offsets`: where each event's line starts. With `holder`,
    only while that worker holds the run. False, with nothing written, when the range was recorded
    already or the holder lost the run."""
    if from_offset is None:
        from_offset = Run.objects.values_list("events_offset", flat=True).get(pk=run_id)
    offsets = offsets or [None] * len(events)
    with transaction.atomic():
        _bounded_idle(holder)
        claim = Run.objects.filter(pk=run_id, events_offset=from_offset)
        if holder is not None:
            claim = claim.filter(holder=holder, status__in=[RunStatus.STARTING, RunStatus.RUNNING])
        # The row is locked from here to the commit: a second recorder of the range waits, then finds
        # the offset moved and writes nothing.
        if not claim.update(events_offset=new_offset, heartbeat_at=timezone.now()):
            return False
        run = Run.objects.get(pk=run_id)
        points, fields = _apply(run, events, offsets)
        MetricPoint.objects.bulk_create(points)
        Run.objects.filter(pk=run_id).update(**fields)
        published = [realtime.Point(seq=p.seq, step=p.step, time=p.time, values=p.values) for p in points]
        transaction.on_commit(lambda: _publish(run_id, published))
    return True


def _bounded_idle(holder: str | None) -> None:
    """PostgreSQL: a holder paused in this transaction (it locks the run's row) has its session ended
    by the server after the heartbeat timeout, so a reaper on another host can take the run over."""
    if holder is not None and connection.vendor == "postgresql":
        ms = max(1000, int(settings.TRAINYARD_HEARTBEAT_TIMEOUT * 1000))
        with connection.cursor() as cursor:
            cursor.execute(f"SET LOCAL idle_in_transaction_session_timeout = {ms}")


def _apply(run: Run, events: list[Event], offsets: list) -> tuple[list[MetricPoint], dict]:
    """The rows and run fields a batch of events makes (checkpoints and `running` as they come)."""
    points, seq, fields = [], run.next_seq, {}
    for event, offset in zip(events, offsets):
        kind = event.get("event")
        if kind == ev.METRIC:
            step = int(event.get("step", 0))
            values = event.get("values", {})
            points.append(
                MetricPoint(run=run, seq=seq, step=step, time=float(event.get("time", 0)), values=values, offset=offset)
            )
            seq += 1
            fields["current_step"] = max(step, fields.get("current_step", run.current_step))
        elif kind == ev.STATUS and event.get("state") == ev.RUNNING:
            fields["total_steps"] = event.get("total_steps")
            if run.is_active:
                fields["message"] = ""  # the stage it was in is over: the page shows steps now
            lifecycle.transition(run.pk, [RunStatus.STARTING], RunStatus.RUNNING)
        elif kind == ev.STATUS and event.get("state") in (ev.PREPARING, ev.SAVING) and run.is_active:
            # What a starting run is doing (loading the model, tokenizing N rows), then saving: the
            # run's message, which its page shows live. An ended run's message is its outcome: kept.
            fields["message"] = str(event.get("message", ""))[:2000]
        elif kind == ev.DATA:
            fields["data_summary"] = {k: v for k, v in event.items() if k not in ("event", "time")}
        elif kind == ev.ARTIFACT and event.get("kind") == "checkpoint":
            artifacts.record_checkpoint(run, event["path"])
    final = final_status(events)
    if final is not None:
        fields["outcome"] = dict(final)  # how the trainer ended, kept for whoever ends the run
    if points or final is not None:
        fields["health"] = _updated_health(run, points, seq, final is not None)
    fields["next_seq"] = seq
    return points, fields


_publish_failed_at: dict[int, float] = {}  # run -> when a failed publish was last logged
PUBLISH_WARNING_SECONDS = 60


def _publish(run_id: int, points: list[realtime.Point]) -> None:
    """Best-effort: a Redis outage must not look like a failed write (the rows are committed, and the
    pages' database tail delivers them). Logged once a minute per run, not once a batch."""
    try:
        realtime.publish_points(run_id, points)
    except Exception as exc:
        now = time.monotonic()
        if now - _publish_failed_at.get(run_id, -PUBLISH_WARNING_SECONDS) >= PUBLISH_WARNING_SECONDS:
            _publish_failed_at[run_id] = now
            log.warning("run %s: publishing points failed (%s); pages read them from the rows", run_id, exc)
    else:
        _publish_failed_at.pop(run_id, None)


def final_status(events: list[Event]) -> ev.StatusEvent | None:
    """The last status event that ends the training (succeeded, failed, cancelled), if any."""
    return next(
        (e for e in reversed(events) if e.get("event") == ev.STATUS and e.get("state") in ev.TERMINAL_STATES), None
    )


TREND_EVERY = 50  # metric points between re-assessments of the loss trend
POINT_CONTEXT = 5  # earlier points looked at with each batch (zero-grad streaks span batches)
TREND_CODES = ("flat_loss", "collapse", "overfit")


def _updated_health(run: Run, new_points: list[MetricPoint], seq: int, ending: bool = False) -> list[dict]:
    """Point alerts (NaN, spikes, a run of zero grad norms) from the new points and the few before
    them, so a streak split across two batches still counts; trend alerts every TREND_EVERY points
    and when the run ends, from a strided view of the history (a bounded read, however long the run)."""
    from training.health import assess

    alerts = {a["code"]: a for a in run.health}
    before = reversed(
        MetricPoint.objects.filter(run=run).order_by("-seq").values_list("step", "values")[:POINT_CONTEXT]
    )
    recent = [{"step": s, "values": v} for s, v in before] + [{"step": p.step, "values": p.values} for p in new_points]
    for alert in assess(recent):
        if alert.code not in TREND_CODES:
            alerts.setdefault(alert.code, alert.as_dict())
    if ending or seq // TREND_EVERY != run.next_seq // TREND_EVERY:
        stride = max(1, seq // 2000)
        history = MetricPoint.objects.filter(run=run).order_by("seq").values_list("seq", "step", "values")
        series = [{"step": s, "values": v} for q, s, v in history.iterator() if q % stride == 0]
        series += [{"step": p.step, "values": p.values} for p in new_points]
        trends = {a.code: a.as_dict() for a in assess(series) if a.code in TREND_CODES}
        alerts = {k: v for k, v in alerts.items() if k not in TREND_CODES} | trends
    return list(alerts.values())


def catch_up_events(run_id: int) -> dict:
    """Record what a gone worker had not read yet (from where recording stands) and return the
    trainer's own final status (`outcome`), if it wrote one, however much the gone worker recorded."""
    for _ in range(3):  # another recorder moved the offset meanwhile: read again from where it stands
        run = Run.objects.get(pk=run_id)
        located, end = read_located_events(run.run_dir / "events.jsonl", run.events_offset)
        if end == run.events_offset:
            break
        events, offsets = [e for _, e in located], [o for o, _ in located]
        if record_events(run_id, events, end, from_offset=run.events_offset, offsets=offsets):
            break
    return Run.objects.values_list("outcome", flat=True).get(pk=run_id) or {}


ENDINGS = {ev.SUCCEEDED: RunStatus.SUCCEEDED, ev.FAILED: RunStatus.FAILED, ev.CANCELLED: RunStatus.CANCELLED}


def finish_as_trainer_said(run_id: int, outcome: dict, held_by: str | None = None) -> bool:
    """End the run as its trainer said it ended: succeeded (its result zipped for download first),
    failed or cancelled. False when the trainer said nothing final: the caller says why it ended."""
    state = ENDINGS.get(outcome.get("state"))
    if state is None:
        return False
    if state == RunStatus.SUCCEEDED:
        with lifecycle.beating(run_id, held_by):  # zipping a big model takes minutes: not abandoned
            artifacts.package_artifacts(Run.objects.get(pk=run_id))
    lifecycle.finish_run(run_id, state, outcome.get("message") or f"the trainer ended {state}", held_by=held_by)
    return True
