"""A GPU memory estimate for a config, before anything is launched: weights by dtype/quantization,
adapter + gradients + optimizer state, activations by micro_batch_size x sequence_len (with and
without gradient checkpointing), and the logits. Rules of thumb, not a promise; the run page shows
the measured peak beside it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from training.config import TrainConfig

GIB = 1024**3
# Per token, per layer, activations kept for backward in 16-bit: ~34 x hidden bytes plus attention
# scores (Korthikanti et al. 2022, without sequence parallelism; flash/sdpa kernels don't keep scores).
ACTIVATION_BYTES_PER_HIDDEN = 34
CUDA_CONTEXT_GIB = 0.5


@dataclass
class ModelShape:
    params: int
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int

    @classmethod
    def from_config_json(cls, path: Path) -> ModelShape:
        c = json.loads(Path(path).read_text())
        c = c.get("text_config", c)
        hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
        inter = c.get("intermediate_size", 4 * hidden)
        heads = c.get("num_attention_heads", 1)
        kv = c.get("num_key_value_heads", heads)
        head_dim = c.get("head_dim", hidden // heads)
        attn = hidden * head_dim * heads * 2 + hidden * head_dim * kv * 2
        mlp = 3 * hidden * inter
        embed = vocab * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
        return cls(layers * (attn + mlp + 2 * hidden) + embed, hidden, layers, vocab, inter, heads, kv)

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each decoder linear layer: q, k, v, o, gate, up, down."""
        head_dim = self.hidden // self.heads
        per_layer = [
            (self.hidden, self.heads * head_dim),
            (self.hidden, self.kv_heads * head_dim),
            (self.hidden, self.kv_heads * head_dim),
            (self.heads * head_dim, self.hidden),
            (self.hidden, self.intermediate),
            (self.hidden, self.intermediate),
            (self.intermediate, self.hidden),
        ]
        return per_layer * self.layers


@dataclass
class MemoryEstimate:
    weights_gib: float
    trainable_params: int
    adapter_and_optimizer_gib: float
    activations_gib: float
    logits_gib: float
    overhead_gib: float

    @property
    def total_gib(self) -> float:
        return round(
            self.weights_gib
            + self.adapter_and_optimizer_gib
            + self.activations_gib
            + self.logits_gib
            + self.overhead_gib,
            2,
        )

    def rows(self) -> list[tuple[str, float]]:
        return [
            ("weights", self.weights_gib),
            ("adapter, gradients and optimizer", self.adapter_and_optimizer_gib),
            ("activations", self.activations_gib),
            ("logits", self.logits_gib),
            ("CUDA context", self.overhead_gib),
            ("total", self.total_gib),
        ]


def estimate(config: TrainConfig, shape: ModelShape, *, bf16: bool = True) -> MemoryEstimate:
    weight_bytes = 0.5 + 0.05 if config.load_in_4bit else (1.0 if config.load_in_8bit else (2.0 if bf16 else 4.0))
    weights = shape.params * weight_bytes
    if config.adapter:
        targets = (
            shape.linear_shapes()
            if (config.lora_target_linear or not config.lora_target_modules)
            else shape.linear_shapes()[: 2 * shape.layers]
        )  # named modules: assume q and v, axolotl's classic choice
        trainable = sum(config.lora_r * (i + o) for i, o in targets)
        # LoRA weights and grads in fp32, AdamW's two moments in fp32.
        training_state = trainable * (4 + 4 + 8)
    else:
        trainable = shape.params
        # bf16 weights' grads (2) + fp32 moments (8) + fp32 master copy when mixed precision (4).
        training_state = trainable * (2 + 8 + (4 if bf16 else 0))
    tokens = config.micro_batch_size * config.sequence_len
    act_dtype = 2 if bf16 else 4
    per_layer = tokens * shape.hidden * ACTIVATION_BYTES_PER_HIDDEN * act_dtype / 2
    if config.gradient_checkpointing:
        activations = tokens * shape.hidden * act_dtype * shape.layers + per_layer  # inputs kept + one layer live
    else:
        activations = per_layer * shape.layers
    logits = tokens * shape.vocab * 4 * 2  # fp32 logits and their gradient
    return MemoryEstimate(
        weights_gib=round(weights / GIB, 2),
        trainable_params=trainable,
        adapter_and_optimizer_gib=round(training_state / GIB, 2),
        activations_gib=round(activations / GIB, 2),
        logits_gib=round(logits / GIB, 2),
        overhead_gib=CUDA_CONTEXT_GIB,
    )
