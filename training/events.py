"""Events a training process writes (JSON lines): the seam between `training/` and whatever watches it.

Events: `status` (state, total_steps, message), `metric` (step, values), `log` (message),
`data` (encoding stats), `artifact` (kind, path relative to the run directory).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Protocol


class EventSink(Protocol):
    def emit(self, event: str, **fields) -> None: ...


def _finite(value):
    # JSON has no NaN/inf; keep them readable so health checks can still see them.
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class JsonlEventSink:
    """Appends one JSON object per line and flushes, so a watcher can tail the file live."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def emit(self, event: str, **fields) -> None:
        if "values" in fields:
            fields["values"] = {k: _finite(v) for k, v in fields["values"].items()}
        self._file.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NullEventSink:
    """Drops events: the sink of every process but the first when several train together (DDP),
    so the run's events file holds one stream."""

    def emit(self, event: str, **fields) -> None:
        pass

    def close(self) -> None:
        pass


def process_rank() -> int:
    """This process's rank under accelerate / torchrun (0 when alone)."""
    import os

    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


class ListEventSink:
    """Keeps events in memory (tests, notebooks)."""

    def __init__(self):
        self.events: list[dict] = []

    def emit(self, event: str, **fields) -> None:
        self.events.append({"event": event, "time": time.time(), **fields})


def read_events(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete lines from byte `offset` on, and the offset after the last complete line."""
    path = Path(path)
    try:
        if path.stat().st_size <= offset:  # nothing new: one stat, so a watcher may poll often
            return [], offset
    except FileNotFoundError:
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                events.append({"event": "log", "message": f"unreadable event: {line[:200]!r}"})
    return events, offset + end
