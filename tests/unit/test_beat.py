"""The trainer's beat: at every step, micro-batch and evaluation batch it touches its events file
(its mtime moves, nothing is written, at most once per BEAT_SECONDS), and it says when its loop has
ended (`saving`), so the worker can tell a hung trainer from a slow one (webapp/runs/supervisor.py)."""

from __future__ import annotations

import os
from types import SimpleNamespace

from training import events as ev
from training.events import JsonlEventSink, ListEventSink


def test_a_beat_moves_the_events_files_mtime_and_writes_nothing(tmp_path):
    sink = JsonlEventSink(tmp_path / "events.jsonl")
    sink.emit(ev.LOG, message="hello")
    path, size = tmp_path / "events.jsonl", (tmp_path / "events.jsonl").stat().st_size
    os.utime(path, (1, 1))
    sink.beat()
    assert path.stat().st_mtime > 1 and path.stat().st_size == size
    os.utime(path, (1, 1))
    sink.beat()  # again within BEAT_SECONDS: no syscall (each is a round trip on shared storage)
    assert path.stat().st_mtime == 1


def test_the_training_loop_beats_and_says_when_it_ends():
    from training.train import Collator, _make_callback

    sink = ListEventSink()
    callback = _make_callback(sink, Collator(pad_id=0), should_stop=lambda: False)
    args, state, control = SimpleNamespace(), SimpleNamespace(global_step=7), SimpleNamespace()
    callback.on_substep_end(args, state, control)
    callback.on_step_end(args, state, control)
    callback.on_prediction_step(args, state, control)
    assert sink.beats == 3
    callback.on_train_end(args, state, control)
    assert sink.events[-1]["state"] == ev.SAVING and "step 7" in sink.events[-1]["message"]
