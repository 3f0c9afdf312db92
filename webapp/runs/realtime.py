"""Typed payloads a run page receives over its websocket, the one place that publishes points to a
run's group (after the worker's commit), and the queries that feed them. Fan-out: tail.py.

Embedded mode needs no server between the worker and the web process: the consumer reads what the
worker wrote (metric rows by `seq`, the log file by byte offset), so every process sees the same history.
"""

from __future__ import annotations

from typing import Literal, TypedDict

from webapp.runs.gpus import queue_position
from webapp.runs.models import MetricPoint, Run

MAX_LOG_CHUNK = 64 * 1024
HISTORY_POINTS = 4000


class Point(TypedDict):
    seq: int
    step: int
    time: float
    values: dict


class PointsPayload(TypedDict):
    type: Literal["points"]
    history: bool  # true for the first batch after connecting
    points: list[Point]


class StatusPayload(TypedDict):
    type: Literal["status"]
    status: Literal["queued", "starting", "running", "succeeded", "failed", "cancelled", "interrupted"]
    message: str
    current_step: int
    total_steps: int | None
    final: bool
    health: list[dict]  # training.health alerts: code, level, step, message, fix
    started_at: float | None  # epoch seconds: the page shows elapsed time and ETA from it
    finished_at: float | None
    queue_position: int | None  # 1 = next to start; None unless queued


class LogPayload(TypedDict):
    type: Literal["log"]
    text: str
    offset: int  # byte offset after this text: reconnect with it to resume


class PointsMessage(TypedDict):
    """What the worker sends to a run's channel-layer group (Redis mode), read by its RunTail."""

    type: Literal["run.points"]
    points: list[Point]


def group_name(run_id: int) -> str:
    return f"run-{run_id}"


def publish_points(run_id: int, points: list[Point]) -> None:
    """Send new points to the run's pages through the channel layer (Redis mode: across hosts).
    Without Redis the pages' tail reads them from the database instead."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer
    from django.conf import settings

    if not settings.REDIS_URL or not points:
        return
    message = PointsMessage(type="run.points", points=points)
    async_to_sync(get_channel_layer().group_send)(group_name(run_id), message)


def points_after(run_id: int, after_seq: int, limit: int = 5000) -> list[Point]:
    rows = MetricPoint.objects.filter(run_id=run_id, seq__gt=after_seq).order_by("seq")[:limit]
    return [Point(seq=p.seq, step=p.step, time=p.time, values=p.values) for p in rows]


def history(run_id: int, after_seq: int, max_points: int = HISTORY_POINTS) -> list[Point]:
    """Everything after `after_seq`, downsampled when long (min/max of loss per bucket, every eval
    point kept): a 100k-step run loads as a few thousand points that still show its spikes."""
    from training.health import downsample

    rows = MetricPoint.objects.filter(run_id=run_id, seq__gt=after_seq).order_by("seq")
    if rows.count() <= max_points:
        return points_after(run_id, after_seq, limit=max_points)
    points = [
        Point(seq=s, step=st, time=t, values=v) for s, st, t, v in rows.values_list("seq", "step", "time", "values")
    ]
    return downsample(points, limit=max_points)


def status_of(run: Run) -> StatusPayload:
    return StatusPayload(
        type="status",
        status=run.status,
        message=run.message,
        current_step=run.current_step,
        total_steps=run.total_steps,
        final=not run.is_active,
        health=run.health,
        started_at=run.started_at.timestamp() if run.started_at else None,
        finished_at=run.finished_at.timestamp() if run.finished_at else None,
        queue_position=queue_position(run) if run.status == "queued" else None,
    )


def log_tail(run: Run, max_bytes: int = 256 * 1024) -> LogPayload | None:
    """The end of the log for a page load (the full file is a download away)."""
    try:
        size = run.log_path.stat().st_size
    except FileNotFoundError:
        return None
    start = max(0, size - max_bytes)
    payload = log_after(run, start, max_bytes)
    if payload and start:
        payload["text"] = "…(earlier lines in the full log)\n" + payload["text"].split("\n", 1)[-1]
    return payload


def log_after(run: Run, offset: int, max_bytes: int = MAX_LOG_CHUNK) -> LogPayload | None:
    try:
        with run.log_path.open("rb") as f:
            f.seek(offset)
            data = f.read(max_bytes)
    except FileNotFoundError:
        return None
    if not data:
        return None
    return LogPayload(type="log", text=data.decode("utf-8", errors="replace"), offset=offset + len(data))
