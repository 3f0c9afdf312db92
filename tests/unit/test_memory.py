"""The GPU memory estimate: sane magnitudes, and the knobs move it the right way."""

import json

import pytest

from training.config import parse_config
from training.memory import ModelShape, estimate

LLAMA_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}


@pytest.fixture
def shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    return ModelShape.from_config_json(tmp_path / "config.json")


def config(**keys):
    return parse_config({"base_model": "x/y", "datasets": [{"path": "d"}], **keys})


def test_parameter_count_of_llama_8b(shape):
    assert 7.9e9 < shape.params < 8.1e9


def test_qlora_8b_fits_a_consumer_gpu_and_full_bf16_does_not(shape):
    qlora = estimate(
        config(adapter="qlora", lora_r=16, lora_target_linear=True, sequence_len=2048, gradient_checkpointing=True),
        shape,
    )
    full = estimate(config(sequence_len=2048, gradient_checkpointing=True), shape)
    assert 6 < qlora.total_gib < 16
    assert full.total_gib > 100  # weights + grads + AdamW moments + master weights
    assert 30e6 < qlora.trainable_params < 60e6


def test_gradient_checkpointing_and_batch_move_activations(shape):
    base = dict(adapter="lora", sequence_len=2048, micro_batch_size=2)
    off = estimate(config(**base), shape)
    on = estimate(config(**base, gradient_checkpointing=True), shape)
    bigger = estimate(config(**{**base, "micro_batch_size": 4}), shape)
    assert on.activations_gib < off.activations_gib / 5
    assert bigger.activations_gib == pytest.approx(2 * off.activations_gib, rel=0.02)
