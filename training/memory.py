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
    params: int  # every weight, every expert included (what the GPU holds)
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int = 0
    expert_params: int = 0  # routed experts' weights (all of them), part of `params`
    active_params: int = 0  # weights one token uses (top-k experts); `params` for a dense model
    linear_attention_layers: int = 0
    experts: int = 0  # routed experts per MoE layer
    moe_layers: int = 0
    moe_intermediate: int = 0

    @classmethod
    def from_config_json(cls, path: Path) -> ModelShape:
        return cls.from_config(json.loads(Path(path).read_text()))

    @classmethod
    def from_config(cls, full: dict) -> ModelShape:
        """Parameter counts from a config.json: dense, MoE (GLM-4.7-Flash, Qwen3.5 MoE, Gemma 4 26B-A4B,
        every expert counted), multi-head latent attention, Gated DeltaNet layers, Gemma 4's global layers
        and the vision tower of a multimodal model."""
        c = full.get("text_config") or full
        hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
        inter = c.get("intermediate_size") or 4 * hidden
        heads = c.get("num_attention_heads", 1)
        kv = c.get("num_key_value_heads") or heads
        head_dim = c.get("head_dim") or hidden // heads
        layer_types = c.get("layer_types") or ["full_attention"] * layers
        experts = c.get("num_experts") or c.get("n_routed_experts") or c.get("num_local_experts") or 0
        top_k = c.get("num_experts_per_tok") or c.get("top_k_experts") or 0
        moe_inter = c.get("moe_intermediate_size") or inter
        mlp_types = c.get("mlp_layer_types") or (
            ["dense"] * c.get("first_k_dense_replace", 0) + ["sparse"] * (layers - c.get("first_k_dense_replace", 0))
            if experts and not c.get("enable_moe_block")
            else None
        )
        total = active = expert_total = moe_layers = 0
        for i in range(layers):
            kind = layer_types[i] if i < len(layer_types) else "full_attention"
            override = (c.get("per_layer_config") or {}).get(str(i)) or (c.get("per_layer_config") or {}).get(i) or {}
            attn = _attention_params(
                c,
                kind,
                hidden,
                heads,
                override.get("num_key_value_heads", kv),
                override.get("head_dim", head_dim),
                overridden=bool(override),
            )
            mlp_dense = 3 * hidden * inter
            moe_layer = experts and (c.get("enable_moe_block") or (mlp_types and mlp_types[i] == "sparse"))
            if moe_layer:
                per_expert = 3 * hidden * moe_inter  # gate, up, down
                shared_inter = c.get("shared_expert_intermediate_size") or moe_inter * c.get("n_shared_experts", 0)
                shared = 3 * hidden * shared_inter + (hidden if "shared_expert_intermediate_size" in c else 0)
                router = hidden * experts
                # Gemma 4 26B-A4B keeps a dense MLP beside its experts in every layer
                dense = mlp_dense if c.get("enable_moe_block") else 0
                expert_total += experts * per_expert
                moe_layers += 1
                mlp, mlp_active = (
                    experts * per_expert + shared + router + dense,
                    top_k * per_expert + shared + router + dense,
                )
            else:
                mlp = mlp_active = mlp_dense
            total += attn + mlp + 2 * hidden
            active += attn + mlp_active + 2 * hidden
        embed = vocab * hidden * (1 if (c.get("tie_word_embeddings", full.get("tie_word_embeddings", False))) else 2)
        vision = _vision_params(full.get("vision_config"))
        return cls(
            params=total + embed + vision,
            hidden=hidden,
            layers=layers,
            vocab=vocab,
            intermediate=inter,
            heads=heads,
            kv_heads=kv,
            head_dim=head_dim,
            expert_params=expert_total,
            active_params=active + embed + vision,
            linear_attention_layers=sum(1 for t in layer_types[:layers] if t == "linear_attention"),
            experts=experts if moe_layers else 0,
            moe_layers=moe_layers,
            moe_intermediate=moe_inter if moe_layers else 0,
        )

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each decoder linear layer: q, k, v, o, gate, up, down (LoRA sizes)."""
        head_dim = self.head_dim or self.hidden // self.heads
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


def _attention_params(c: dict, kind: str, hidden: int, heads: int, kv: int, head_dim: int, overridden=False) -> int:
    if kind == "linear_attention":  # Qwen3.5 Gated DeltaNet
        key_dim = c.get("linear_key_head_dim", 128) * c.get("linear_num_key_heads", 16)
        v_heads = c.get("linear_num_value_heads", 32)
        value_dim = c.get("linear_value_head_dim", 128) * v_heads
        conv = (2 * key_dim + value_dim) * c.get("linear_conv_kernel_dim", 4)
        return (
            hidden * (2 * key_dim + value_dim) + hidden * value_dim + 2 * hidden * v_heads + value_dim * hidden + conv
        )
    if c.get("kv_lora_rank"):  # multi-head latent attention (GLM-4.7-Flash)
        nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        q_rank = c.get("q_lora_rank")
        q = hidden * q_rank + q_rank * heads * (nope + rope) if q_rank else hidden * heads * (nope + rope)
        kv_rank = c["kv_lora_rank"]
        return q + hidden * (kv_rank + rope) + kv_rank * heads * (nope + v) + heads * v * hidden
    if kind == "full_attention" and (c.get("global_head_dim") or overridden) and "gemma4" in c.get("model_type", ""):
        # Gemma 4's global layers: head_dim 512, their own kv heads, k = v when attention_k_eq_v
        head_dim = head_dim if overridden else c["global_head_dim"]
        kv = kv if overridden else (c.get("num_global_key_value_heads") or kv)
        q = hidden * heads * head_dim
        kv_proj = hidden * kv * head_dim * (1 if c.get("attention_k_eq_v") else 2)
        return q + kv_proj + heads * head_dim * hidden
    gate = 2 if c.get("model_type", "").startswith("qwen3_5") else 1  # Qwen3.5's gated attention output
    return hidden * heads * head_dim * gate + 2 * hidden * kv * head_dim + heads * head_dim * hidden


def _vision_params(v: dict | None) -> int:
    """The vision tower's weights (patch embedding, encoder blocks, merger/projector), approximately."""
    if not v:
        return 0
    hidden = v.get("hidden_size", 0)
    inter = v.get("intermediate_size", 4 * hidden)
    depth = v.get("depth") or v.get("num_hidden_layers", 0)
    patch = v.get("patch_size", 16)
    patch = patch[0] if isinstance(patch, list | tuple) else patch
    kind = v.get("model_type", "")
    gated = kind.startswith(("gemma4", "pixtral"))
    blocks = depth * (4 * hidden * hidden + (3 if gated else 2) * hidden * inter)
    if kind.startswith("qwen3_5"):
        embed = 3 * 2 * patch * patch * hidden + v.get("num_position_embeddings", 0) * hidden
        merged = hidden * v.get("spatial_merge_size", 2) ** 2
        return embed + blocks + merged * merged + merged * v.get("out_hidden_size", hidden)
    if kind.startswith("gemma4"):
        return 3 * patch * patch * hidden + 2 * v.get("position_embedding_size", 0) * hidden + blocks
    return 3 * patch * patch * hidden + blocks


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


def _moment_bytes(optimizer: str | None) -> float:
    """Bytes of AdamW state per trainable parameter: two fp32 moments, or quantized ones."""
    name = optimizer or ""
    if "4bit" in name:
        return 1.0
    if "8bit" in name:
        return 2.0
    return 8.0


def estimate(config: TrainConfig, shape: ModelShape, *, bf16: bool = True) -> MemoryEstimate:
    full_bytes = 2.0 if bf16 else 4.0
    weight_bytes = 0.5 + 0.05 if config.load_in_4bit else (1.0 if config.load_in_8bit else full_bytes)
    # bitsandbytes quantizes nn.Linear only: fused MoE experts stay 16-bit unless quantize_moe_experts.
    expert_bytes = weight_bytes if getattr(config, "quantize_moe_experts", False) else max(weight_bytes, full_bytes)
    weights = (shape.params - shape.expert_params) * weight_bytes + shape.expert_params * expert_bytes
    if config.adapter:
        targets = (
            shape.linear_shapes()
            if (config.lora_target_linear or not config.lora_target_modules)
            else shape.linear_shapes()[: 2 * shape.layers]
        )  # named modules: assume q and v, axolotl's classic choice
        trainable = sum(config.lora_r * (i + o) for i, o in targets)
        if config.lora_target_parameters and shape.moe_layers:
            # LoRA on the expert stacks (gate_up: hidden -> 2 x moe_intermediate, down: back), one pair per expert
            per_stack = {
                "gate_up_proj": shape.hidden + 2 * shape.moe_intermediate,
                "down_proj": shape.moe_intermediate + shape.hidden,
            }
            stacks = sum(v for k, v in per_stack.items() if any(t.endswith(k) for t in config.lora_target_parameters))
            trainable += config.lora_r * stacks * shape.experts * shape.moe_layers
        # LoRA weights and grads in fp32, AdamW's two moments (fp32, or 8-/4-bit optimizers).
        training_state = trainable * (4 + 4 + _moment_bytes(config.optimizer))
    else:
        trainable = shape.params
        # bf16 weights' grads (2) + fp32 moments (8) + fp32 master copy when mixed precision (4).
        training_state = trainable * (2 + _moment_bytes(config.optimizer) + (4 if bf16 else 0))
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
