"""Real training on the tiny model, on the CPU: the loss falls, artifacts reload, events are written."""

from __future__ import annotations

import json

import pytest

from training.config import parse_config
from training.demo import write_datasets
from training.events import ListEventSink
from training.train import DataInvalid, train


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_datasets(tmp_path_factory.mktemp("data"), rows_per_file=200)[0].parent


def make_config(model_dir, data_dir, **extra):
    base = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data_dir / "chat.jsonl"), "type": "chat_template"}],
        "sequence_len": 128,
        "micro_batch_size": 4,
        "max_steps": 40,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "adapter": "lora",
        "lora_target_linear": True,
        "seed": 1,
    }
    return parse_config({**base, **extra})


def losses(sink):
    return [e["values"]["loss"] for e in sink.events if e["event"] == "metric" and "loss" in e["values"]]


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", None])
def test_loss_falls(tiny_model_dir, demo_data, tmp_path, adapter):
    sink = ListEventSink()
    summary = train(make_config(tiny_model_dir, demo_data, adapter=adapter), tmp_path, sink)
    curve = losses(sink)
    assert summary["steps"] == 40 and len(curve) == 40
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first * 0.8, curve
    metric = next(e for e in sink.events if e["event"] == "metric" and "loss" in e["values"])
    for key in ("learning_rate", "grad_norm", "tokens_per_second", "memory_mb"):
        assert key in metric["values"]
    assert (tmp_path / ("adapter" if adapter else "model") / "tokenizer.json").exists()
    # The headline is where the curve ends, not HF's mean over the run (which lags far above it).
    assert summary["final_loss"] == curve[-1] and summary["train_loss"] > summary["final_loss"]
    smoothed = curve[0]
    for loss in curve[1:]:
        smoothed = 0.9 * smoothed + 0.1 * loss
    assert summary["final_loss_smoothed"] == pytest.approx(smoothed)


@pytest.mark.slow
def test_lora_adapter_reloads_on_the_base_model(tiny_model_dir, demo_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(make_config(tiny_model_dir, demo_data, max_steps=5), tmp_path, ListEventSink())
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # Named as a person would find it elsewhere (the folder's name), not by this machine's absolute path.
    assert adapter_config["base_model_name_or_path"] == tiny_model_dir.name
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())


@pytest.mark.slow
def test_packed_training_reports_efficiency_and_eval_loss(tiny_model_dir, demo_data, tmp_path):
    sink = ListEventSink()
    config = make_config(tiny_model_dir, demo_data, sample_packing=True, max_steps=10, val_set_size=0.1, eval_steps=5)
    train(config, tmp_path, sink)
    data = next(e for e in sink.events if e["event"] == "data")
    assert 0.8 < data["packing_efficiency"] <= 1.0
    assert data["train_samples"] < 180  # samples were packed into fewer sequences
    assert any("eval_loss" in e.get("values", {}) for e in sink.events)


@pytest.mark.slow
def test_qlora_trains_on_the_cpu(tiny_model_dir, demo_data, tmp_path):
    sink = ListEventSink()
    train(make_config(tiny_model_dir, demo_data, adapter="qlora", max_steps=20), tmp_path, sink)
    curve = losses(sink)
    assert sum(curve[-5:]) < sum(curve[:5])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_invalid_lines_stop_training_with_their_line_numbers(tiny_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        "not json\n"
        '{"messages": []}\n'
    )
    config = parse_config({"base_model": str(tiny_model_dir), "datasets": [{"path": str(data)}]})
    with pytest.raises(DataInvalid) as info:
        train(config, tmp_path / "run", ListEventSink())
    message = str(info.value)
    assert "bad.jsonl:line 2: invalid JSON" in message and "line 3: messages: empty message list" in message


@pytest.mark.slow
def test_merge_lora_saves_a_merged_model_with_gradient_checkpointing(tiny_model_dir, demo_data, tmp_path):
    from transformers import AutoModelForCausalLM

    sink = ListEventSink()
    train(
        make_config(tiny_model_dir, demo_data, max_steps=4, merge_lora=True, gradient_checkpointing=True),
        tmp_path,
        sink,
    )
    assert {"adapter", "merged"} <= {e["kind"] for e in sink.events if e["event"] == "artifact"}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    metric = next(e for e in sink.events if e["event"] == "metric" and "loss" in e["values"])
    assert metric["values"]["samples_per_second"] > 0
