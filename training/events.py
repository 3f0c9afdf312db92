"""Events a training process writes (JSON lines): the seam between `training/` and whatever watches it.

The vocabulary is typed here, once, for both sides: the trainer writes these kinds and states
(`training/train.py`, `training/cli.py`), the web worker reads them (`webapp/runs/recording.py`).
A watcher asks a trainer to stop by creating `STOP_FILE` in the run directory: the trainer stops at
the next step boundary (its `should_stop` callable) and ends `cancelled`. A trainer in its loop
*beats* (`EventSink.beat`: the events file's mtime moves, at most every BEAT_SECONDS, with no line
written), so a watcher tells a hung trainer (stopped, deadlocked, a stuck collective) from a slow one.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Final, Literal, Protocol, TypedDict

# -- kinds ----------------------------------------------------------------------------------------
STATUS: Final = "status"  # the trainer's state changed
METRIC: Final = "metric"  # one logged step's values
LOG: Final = "log"  # a line for the run's log
DATA: Final = "data"  # what encoding the datasets gave (rows, tokens, drops)
ARTIFACT: Final = "artifact"  # a file or folder written in the run directory
RANKS: Final = "ranks"  # several processes: what each rank holds
EventKind = Literal["status", "metric", "log", "data", "artifact", "ranks"]

# -- states a `status` event carries ------------------------------------------------------------------
PREPARING: Final = "preparing"  # loading the tokenizer, encoding the data, loading the model
RUNNING: Final = "running"  # the training loop has begun (total_steps known); the trainer beats from now
SAVING: Final = "saving"  # the loop has ended, the result is being written (no steps: no beats)
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"  # asked to stop (STOP_FILE, Ctrl-C)
TrainingState = Literal["preparing", "running", "saving", "succeeded", "failed", "cancelled"]
TERMINAL_STATES: Final = frozenset({SUCCEEDED, FAILED, CANCELLED})  # the trainer writes nothing after these

# -- stages of `preparing`: what a starting run is doing, said on its page (`stage` + `message`) ----
IMPORTING: Final = "importing"  # torch, transformers, peft (a warm trainer has imported them already)
TOKENIZING: Final = "tokenizing"  # loading the tokenizer, reading and encoding the datasets
LOADING_MODEL: Final = "loading_model"  # the base model and its adapter
BUILDING_TRAINER: Final = "building_trainer"  # optimizer, data loader (and, resuming, the checkpoint)
Stage = Literal["importing", "tokenizing", "loading_model", "building_trainer"]

STOP_FILE: Final = "STOP"  # created in the run directory to ask the trainer to stop at the next step
BEAT_SECONDS: Final = 1.0  # the most often a trainer touches its events file to say it progresses


class StatusEvent(TypedDict, total=False):
    event: Literal["status"]
    time: float
    state: TrainingState
    message: str
    stage: Stage  # with `preparing`
    total_steps: int  # with `running`
    num_epochs: float  # with `running`
    summary: dict  # with `succeeded`: train_loss, steps, seconds, peak_memory_mb


class MetricEvent(TypedDict):
    event: Literal["metric"]
    time: float
    step: int
    values: dict[str, float | str]  # non-finite floats as "nan" / "inf" / "-inf"


class LogEvent(TypedDict):
    event: Literal["log"]
    time: float
    message: str


class DataEvent(TypedDict, total=False):
    event: Literal["data"]
    time: float  # the rest: encoding statistics, shown on the run page as they are


class ArtifactEvent(TypedDict, total=False):
    event: Literal["artifact"]
    time: float
    kind: Literal["checkpoint", "adapter", "model", "merged", "profile"]
    path: str  # relative to the run directory
    step: int  # with `checkpoint`


class RanksEvent(TypedDict):
    event: Literal["ranks"]
    time: float
    ranks: list[dict]  # rank, local_params, total_params, memory_mb, param_share


Event = StatusEvent | MetricEvent | LogEvent | DataEvent | ArtifactEvent | RanksEvent


class StopRequested(Exception):
    """Raised by the trainer when `should_stop` stopped the loop: the run ends `cancelled`, with the
    checkpoints it saved and no final artifact."""


class EventSink(Protocol):
    def emit(self, event: EventKind, **fields) -> None: ...

    def beat(self) -> None:
        """Say the trainer progresses (called at every step and eval batch); cheap, may do nothing."""


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
        self._last_beat = 0.0

    def emit(self, event: str, **fields) -> None:
        if "values" in fields:
            fields["values"] = {k: _finite(v) for k, v in fields["values"].items()}
        self._file.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
        self._file.flush()

    def beat(self) -> None:
        # The file's mtime, not a line: no rows to record, one syscall at most every BEAT_SECONDS
        # (on shared storage each is a round trip).
        now = time.monotonic()
        if now - self._last_beat >= BEAT_SECONDS:
            self._last_beat = now
            os.utime(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class NullEventSink:
    """Drops events: the sink of every process but the first when several train together (DDP),
    so the run's events file holds one stream."""

    def emit(self, event: str, **fields) -> None:
        pass

    def beat(self) -> None:
        pass

    def close(self) -> None:
        pass


def process_rank() -> int:
    """This process's rank under accelerate / torchrun (0 when alone)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


class ListEventSink:
    """Keeps events in memory (tests, notebooks)."""

    def __init__(self):
        self.events: list[dict] = []
        self.beats = 0

    def emit(self, event: str, **fields) -> None:
        self.events.append({"event": event, "time": time.time(), **fields})

    def beat(self) -> None:
        self.beats += 1


def read_events(path: Path, offset: int = 0) -> tuple[list[Event], int]:
    """Complete lines from byte `offset` on, and the offset after the last complete line."""
    located, end = read_located_events(path, offset)
    return [event for _, event in located], end


def read_located_events(path: Path, offset: int = 0) -> tuple[list[tuple[int, Event]], int]:
    """As read_events, each event with the byte offset its line starts at (its identity in the file:
    a watcher that reads a line twice can tell)."""
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
    located, start = [], offset
    for line in data[:end].split(b"\n")[:-1]:
        if line.strip():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = LogEvent(event=LOG, time=time.time(), message=f"unreadable event: {line[:200]!r}")
            located.append((start, event))
        start += len(line) + 1
    return located, offset + end
