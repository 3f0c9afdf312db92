"""Typed payloads a run page receives over its websocket, and the queries that feed them.

Embedded mode needs no server between the worker and the web process: the consumer reads what the
worker wrote (metric rows by `seq`, the log file by byte offset), so every process sees the same history.
"""

from __future__ import annotations

from typing import TypedDict

from webapp.runs.models import MetricPoint, Run

MAX_LOG_CHUNK = 64 * 1024


class Point(TypedDict):
    seq: int
    step: int
    time: float
    values: dict


class PointsPayload(TypedDict):
    type: str  # "points"
    history: bool  # true for the first batch after connecting
    points: list[Point]


class StatusPayload(TypedDict):
    type: str  # "status"
    status: str
    message: str
    current_step: int
    total_steps: int | None
    final: bool


class LogPayload(TypedDict):
    type: str  # "log"
    text: str
    offset: int  # byte offset after this text: reconnect with it to resume


def points_after(run_id: int, after_seq: int, limit: int = 5000) -> list[Point]:
    rows = MetricPoint.objects.filter(run_id=run_id, seq__gt=after_seq).order_by("seq")[:limit]
    return [Point(seq=p.seq, step=p.step, time=p.time, values=p.values) for p in rows]


def status_of(run: Run) -> StatusPayload:
    return StatusPayload(
        type="status",
        status=run.status,
        message=run.message,
        current_step=run.current_step,
        total_steps=run.total_steps,
        final=not run.is_active,
    )


def log_after(run: Run, offset: int) -> LogPayload | None:
    try:
        with run.log_path.open("rb") as f:
            f.seek(offset)
            data = f.read(MAX_LOG_CHUNK)
    except FileNotFoundError:
        return None
    if not data:
        return None
    return LogPayload(type="log", text=data.decode("utf-8", errors="replace"), offset=offset + len(data))
