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


# -- every expert counted -------------------------------------------------------------------------------------
from tests.fixtures.seed_model_configs import SEED_MODEL_CONFIGS  # noqa: E402

# (total, active) parameters in billions, as the models' names say (GLM-4.7-Flash: 29.9 B, as counted on its
# card); active counts leave out the embeddings, so they are held within 1.5 B.
NAMED_SIZES = {
    "mistralai/Ministral-8B-Instruct-2410": (8, 8),
    "zai-org/GLM-4.7-Flash": (29.9, 3),
    "google/gemma-4-31B": (31, 31),
    "google/gemma-4-26B-A4B": (26, 4),
    "Qwen/Qwen3.5-9B": (9, 9),
    "Qwen/Qwen3.5-27B": (27, 27),
    "Qwen/Qwen3.5-35B-A3B": (35, 3),
    "Qwen/Qwen3.5-122B-A10B": (122, 10),
}


@pytest.mark.parametrize("model", sorted(NAMED_SIZES))
def test_parameter_count_counts_every_expert(model):
    shape = ModelShape.from_config(SEED_MODEL_CONFIGS[model])
    total, active = NAMED_SIZES[model]
    assert shape.params / 1e9 == pytest.approx(total, rel=0.05)
    assert shape.active_params / 1e9 == pytest.approx(active, abs=1.5)


@pytest.mark.parametrize("arch", ["ministral", "gemma4", "gemma4_moe", "glm4_moe_lite", "qwen3_5", "qwen3_5_moe"])
def test_parameter_count_matches_the_built_model(tiny_arch, arch):
    import transformers

    from training.architectures import ARCHITECTURES

    folder = tiny_arch(arch)
    model = getattr(transformers, ARCHITECTURES[arch][1]).from_pretrained(folder)
    real = sum(p.numel() for p in model.parameters())
    real_experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3)
    shape = ModelShape.from_config_json(folder / "config.json")
    assert shape.params == pytest.approx(real, rel=0.02)
    assert shape.expert_params == real_experts


def test_qlora_keeps_experts_16_bit_unless_quantize_moe_experts():
    shape = ModelShape.from_config(SEED_MODEL_CONFIGS["zai-org/GLM-4.7-Flash"])
    plain = estimate(config(adapter="qlora", sequence_len=2048, gradient_checkpointing=True), shape)
    quantized = estimate(
        config(adapter="qlora", quantize_moe_experts=True, sequence_len=2048, gradient_checkpointing=True), shape
    )
    assert plain.weights_gib > 50  # 27.8 B expert weights in bf16: bitsandbytes quantizes nn.Linear only
    assert 15 < quantized.weights_gib < 20  # ~29.9 B x 0.55 bytes
    with_experts = estimate(
        config(
            adapter="qlora",
            quantize_moe_experts=True,
            lora_target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            sequence_len=2048,
            gradient_checkpointing=True,
        ),
        shape,
    )
    assert with_experts.trainable_params > quantized.trainable_params + 100e6  # 64 experts x 46 layers of LoRA
