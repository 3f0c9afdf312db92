"""The worker's single-writer path: a trainer's events -> metric rows, run fields and artifacts ->
health -> a publish to the run's pages after commit. Only the worker (and the reaper, for a dead
worker's runs) calls it; pages and the API read what it wrote."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from training import events as ev
from training.events import Event, read_events
from webapp.runs import artifacts, lifecycle, realtime
from webapp.runs.models import MetricPoint, Run, RunStatus


def record_events(run_id: int, events: list[Event], new_offset: int) -> None:
    """Turn training events into rows (worker only). Idempotent per byte offset of events.jsonl."""
    run = Run.objects.get(pk=run_id)
    points, seq, fields = [], run.next_seq, {}
    for event in events:
        kind = event.get("event")
        if kind == ev.METRIC:
            points.append(
                MetricPoint(
                    run=run,
                    seq=seq,
                    step=int(event.get("step", 0)),
                    time=float(event.get("time", 0)),
                    values=event.get("values", {}),
                )
            )
            seq += 1
            fields["current_step"] = max(int(event.get("step", 0)), fields.get("current_step", run.current_step))
        elif kind == ev.STATUS and event.get("state") == ev.RUNNING:
            fields["total_steps"] = event.get("total_steps")
            lifecycle.transition(run_id, [RunStatus.STARTING], RunStatus.RUNNING)
        elif kind == ev.DATA:
            fields["data_summary"] = {k: v for k, v in event.items() if k not in ("event", "time")}
        elif kind == ev.ARTIFACT and event.get("kind") == "checkpoint":
            artifacts.record_checkpoint(run, event["path"])
    ending = final_status(events) is not None
    if points or ending:
        fields["health"] = _updated_health(run, points, seq, ending)
    with transaction.atomic():
        MetricPoint.objects.bulk_create(points)
        Run.objects.filter(pk=run_id).update(
            events_offset=new_offset, next_seq=seq, heartbeat_at=timezone.now(), **fields
        )
        published = [realtime.Point(seq=p.seq, step=p.step, time=p.time, values=p.values) for p in points]
        transaction.on_commit(lambda: realtime.publish_points(run_id, published))


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


def catch_up_events(run_id: int) -> None:
    """Record what a dead worker had not read yet from the run's events file (idempotent by offset)."""
    run = Run.objects.get(pk=run_id)
    events, offset = read_events(run.run_dir / "events.jsonl", run.events_offset)
    if events:
        record_events(run_id, [e for e in events if e.get("event") != ev.STATUS], offset)


def mark_stale_runs_interrupted(max_age_seconds: int | None = None) -> int:
    """Runs whose worker stopped beating (killed, host lost) end `interrupted`, logs and metrics kept:
    what the dead worker had not read is recorded first. The reaper's job (tasks.py), never a page's."""
    count = 0
    for run_id in lifecycle.stale_run_ids(max_age_seconds):
        catch_up_events(run_id)
        count += lifecycle.finish_run(run_id, RunStatus.INTERRUPTED, lifecycle.STALE_MESSAGE)
    return count
