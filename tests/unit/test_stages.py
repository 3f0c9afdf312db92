"""A starting trainer says what it is doing: typed `preparing` stages, in order, before `running`."""

from __future__ import annotations

from itertools import groupby

import pytest

from training import events as ev
from training.config import parse_config
from training.demo import write_datasets
from training.events import ListEventSink
from training.train import train


@pytest.mark.slow
def test_a_starting_trainer_names_each_stage_before_it_runs(tiny_model_dir, tmp_path):
    data = write_datasets(tmp_path / "data", rows_per_file=40)[0]
    config = parse_config(
        {
            "base_model": str(tiny_model_dir),
            "datasets": [{"path": str(data), "type": "chat_template"}],
            "sequence_len": 128,
            "micro_batch_size": 4,
            "max_steps": 1,
            "adapter": "lora",
            "lora_target_linear": True,
        }
    )
    sink = ListEventSink()
    train(config, tmp_path / "run", sink)
    statuses = [e for e in sink.events if e["event"] == ev.STATUS]
    preparing = [e for e in statuses if e["state"] == ev.PREPARING]
    stages = [stage for stage, _ in groupby(e["stage"] for e in preparing)]  # tokenizing says how far it got
    assert stages == [ev.IMPORTING, ev.TOKENIZING, ev.LOADING_MODEL, ev.BUILDING_TRAINER]
    assert statuses[len(preparing)]["state"] == ev.RUNNING  # every stage comes before the loop
    assert all(e["message"] for e in preparing)
    assert preparing[1]["message"] == "tokenizing 1 dataset"
    assert preparing[2]["message"] == f"tokenizing {data.name}"
    loading = next(e for e in preparing if e["stage"] == ev.LOADING_MODEL)
    assert loading["message"] == "loading the model (40 rows tokenized into 40 samples)"


def test_a_long_encoding_says_how_many_rows_it_has_tokenized_so_far(tiny_model_dir, tmp_path, monkeypatch):
    from training import train as train_module
    from training.modeling import load_tokenizer

    data = write_datasets(tmp_path / "data", rows_per_file=30)[0]
    config = parse_config(
        {
            "base_model": str(tiny_model_dir),
            "datasets": [{"path": str(data), "type": "chat_template"}, {"path": str(data), "type": "chat_template"}],
            "sequence_len": 128,
        }
    )
    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", 0.0)  # every row says so: the counts are checkable
    heard: list[str] = []
    train_module.prepare_data(config, load_tokenizer(config), progress=heard.append)
    assert heard[0] == f"tokenizing datasets[0] ({data.name})"
    counts = [int(m.rsplit(": ", 1)[1].split()[0]) for m in heard if m.endswith("rows so far")]
    assert counts and counts == sorted(counts) and max(counts) <= 30
    assert f"tokenizing datasets[1] ({data.name})" in heard
