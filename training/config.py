"""The one validated training config: an axolotl-compatible subset, with errors that name the key path."""

from __future__ import annotations

import difflib
import importlib.util
import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from training import contract, sharding
from training.sharding import FsdpConfig

# transformers' optimizer names (OptimizerNames), checked without importing it; a name not here is
# looked up in the installed transformers before it is refused.
KNOWN_OPTIMIZERS = frozenset(
    "adafactor adagrad adalomo adamw_8bit adamw_anyprecision adamw_bnb_8bit adamw_torch adamw_torch_4bit "
    "adamw_torch_8bit adamw_torch_fused adamw_torch_npu_fused adamw_torch_xla ademamix ademamix_8bit apollo_adamw "
    "apollo_adamw_layerwise galore_adafactor galore_adafactor_layerwise galore_adamw galore_adamw_8bit "
    "galore_adamw_8bit_layerwise galore_adamw_layerwise grokadamw lion_32bit lion_8bit lomo paged_adamw_32bit "
    "paged_adamw_8bit paged_ademamix_32bit paged_ademamix_8bit paged_lion_32bit paged_lion_8bit rmsprop "
    "rmsprop_bnb rmsprop_bnb_32bit rmsprop_bnb_8bit schedule_free_adamw schedule_free_radam schedule_free_sgd sgd "
    "stable_adamw".split()
)
KNOWN_SCHEDULERS = frozenset(
    "constant constant_with_warmup cosine cosine_warmup_with_min_lr cosine_with_min_lr cosine_with_restarts greedy "
    "inverse_sqrt linear polynomial reduce_lr_on_plateau warmup_stable_decay".split()
)
# Which axolotl keys are honoured, refused (and why) or harmless is decided in training/contract.py.
# BitsAndBytesConfig's options (bnb_config_kwargs), torch.utils.checkpoint's (gradient_checkpointing_kwargs).
BNB_OPTIONS = frozenset(
    "bnb_4bit_quant_type bnb_4bit_use_double_quant bnb_4bit_compute_dtype bnb_4bit_quant_storage llm_int8_threshold "
    "llm_int8_skip_modules llm_int8_enable_fp32_cpu_offload llm_int8_has_fp16_weight".split()
)
CHECKPOINT_OPTIONS = frozenset("use_reentrant preserve_rng_state determinism_check debug".split())
# transformers' built-in MoE expert implementations that run without CUDA kernels (measured on the CPU).
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
LIGER_FLAGS = (
    "liger_rope", "liger_rms_norm", "liger_rms_norm_gated", "liger_layer_norm", "liger_glu_activation",
    "liger_cross_entropy", "liger_fused_linear_cross_entropy",
)
# Low-bit AdamW from torchao (a dependency): measured to step on the CPU (tests/unit/test_honoured_keys.py).
TORCHAO_OPTIMIZERS = frozenset({"adamw_torch_8bit", "adamw_torch_4bit"})
# Measured to build and step on the CPU with the pinned packages; any other name is built once by
# check_environment so a missing package is refused before the model loads.
OPTIMIZERS_THAT_BUILD_HERE = TORCHAO_OPTIMIZERS | {
    "adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
    "sgd", "adafactor", "adagrad", "rmsprop",
}


@dataclass(frozen=True)
class AttentionBackend:
    """What an attention implementation can do; packing and flash-lib use are derived from it."""

    isolates_packed_samples: bool  # honours position_ids restarts, so packed samples don't attend to each other
    needs_cuda: bool
    needs_package: str | None


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend(isolates_packed_samples=True, needs_cuda=False, needs_package=None),
    "eager": AttentionBackend(isolates_packed_samples=True, needs_cuda=False, needs_package=None),
    # Measured (tests/unit/test_architectures.py): packed logits equal separate ones on every seed architecture
    # that has a flex path (transformers builds a block mask from position_ids restarts).
    # Training needs CUDA: torch 2.13 has no flex backward on the CPU (measured: NotImplementedError).
    "flex_attention": AttentionBackend(isolates_packed_samples=True, needs_cuda=True, needs_package=None),
    "flash_attention_2": AttentionBackend(isolates_packed_samples=True, needs_cuda=True, needs_package="flash_attn"),
}

TrainOnEos = Literal["all", "turn", "last", "none"]
# Axolotl module names that are another type with a prompt style.
TYPE_ALIASES = {"alpaca_chat": "alpaca:chat", "alpaca_instruct": "alpaca:instruct", "alpaca_chatml": "alpaca:chatml"}


class DatasetSpec(BaseModel):
    """One entry of `datasets:`; option names and defaults are axolotl's."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="JSONL file (CLI) or dataset name in the workspace (web)")
    type: str = Field("chat_template", description="chat_template | alpaca[:style] | completion | input_output")
    split: str | None = Field(None, description="train, train[:10%], train[100:200] (datasets' slicing)")
    data_files: str | list[str] | None = None
    ds_type: str | None = Field(None, description="json | jsonl | parquet | csv | arrow (default: by extension)")
    # chat_template
    field_messages: str = "messages"
    message_property_mappings: dict[str, str] = Field(default_factory=lambda: {"role": "role", "content": "content"})
    message_field_role: str | None = Field(None, description="legacy alias of message_property_mappings.role")
    message_field_content: str | None = Field(None, description="legacy alias of message_property_mappings.content")
    roles: dict[str, list[str]] | None = Field(None, description="template role -> names used in the data")
    roles_to_train: list[str] = Field(default_factory=lambda: ["assistant"])
    train_on_eos: TrainOnEos = "turn"
    train_on_eot: TrainOnEos | None = Field(None, description="defaults to train_on_eos")
    message_field_training: str | None = Field(None, description="per-message key overriding the role (off unless set)")
    message_field_training_detail: str | None = Field(
        None, description="per-message key with character spans to train (off unless set)"
    )
    field_system: str = Field("system", description="row-level system prompt, prepended as the first turn")
    chat_template: str | None = None
    chat_template_jinja: str | None = Field(None, description="template text, or the path of a .jinja file")
    drop_system_message: bool = False
    # reasoning traces (axolotl's names)
    field_thinking: str = Field("reasoning_content", description="per-message key holding the reasoning trace")
    template_thinking_key: str = Field("reasoning_content", description="the key the chat template reads it from")
    split_thinking: bool = Field(False, description="move inline <think>...</think> of assistant turns to the trace")
    # completion
    field: str = "text"
    # alpaca
    field_instruction: str = "instruction"
    field_input: str = "input"
    field_output: str = "output"
    # input_output
    field_segments: str = "segments"

    @model_validator(mode="after")
    def _legacy_field_names(self) -> DatasetSpec:
        if self.message_field_role:
            self.message_property_mappings = {**self.message_property_mappings, "role": self.message_field_role}
        if self.message_field_content:
            self.message_property_mappings = {**self.message_property_mappings, "content": self.message_field_content}
        return self

    @field_validator("chat_template")
    @classmethod
    def _known_chat_template(cls, value: str | None) -> str | None:
        from training.formats.chat_template import check_template_name

        return check_template_name(value)

    @field_validator("split")
    @classmethod
    def _split_syntax(cls, value: str | None) -> str | None:
        from training.sources import validate_split

        return validate_split(value)

    @field_validator("ds_type")
    @classmethod
    def _known_ds_type(cls, value: str | None) -> str | None:
        from training.sources import validate_ds_type

        return validate_ds_type(value)

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        from training.formats import FORMATS

        value = TYPE_ALIASES.get(value, value)
        base = value.split(":", 1)[0]
        if base not in FORMATS:
            raise ValueError(f"unknown dataset type {value!r}; choose one of {', '.join(sorted(FORMATS))}")
        return value

    @property
    def format_name(self) -> str:
        return self.type.split(":", 1)[0]

    @property
    def prompt_style(self) -> str | None:
        return self.type.split(":", 1)[1] if ":" in self.type else None

    @property
    def eot_policy(self) -> TrainOnEos:
        return self.train_on_eot or self.train_on_eos


class TrainConfig(BaseModel):
    """A training run, as axolotl-style YAML describes it."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="hub id or local folder")
    trust_remote_code: bool = False
    datasets: list[DatasetSpec] = Field(min_length=1)
    val_set_size: float = Field(0.0, ge=0, description="fraction (<1) or number of rows held out for eval")
    # data engine
    sequence_len: int = Field(512, gt=8)
    excess_length_strategy: Literal["drop", "truncate", "raise"] = "drop"
    train_on_inputs: bool = False
    chat_template: str = "tokenizer_default"
    chat_template_jinja: str | None = None
    eot_tokens: list[str] | None = None
    special_tokens: dict[str, str] = Field(default_factory=dict)
    tokenizer_use_mistral_common: bool = Field(
        False, description="encode conversations with mistral-common (the model's tekken.json), not a chat template"
    )
    sample_packing: bool = False
    # model and adapter
    adapter: Literal["lora", "qlora"] | None = None
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | str | None = None
    lora_target_linear: bool = False
    lora_target_parameters: list[str] | None = None
    quantize_moe_experts: bool = Field(
        False, description="store routed MoE experts in 4-bit (load_in_4bit) or 8-bit (load_in_8bit) too"
    )
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    merge_lora: bool = Field(False, description="also save the base model with the adapter merged in")
    attn_implementation: str = "sdpa"
    flash_attention: bool | None = Field(None, description="legacy axolotl key; prefer attn_implementation")
    # optimisation
    micro_batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    num_epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    optimizer: str | None = Field(
        None, description="a transformers optim name; default: transformers' (fused AdamW where available)"
    )
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    bf16: bool | Literal["auto"] = "auto"
    fp16: bool = False
    tf32: bool = False
    gradient_checkpointing: bool = False
    eval_steps: int | None = Field(None, gt=0)
    save_steps: int | None = Field(None, gt=0)
    seed: int = 42
    # -- the contract's honoured keys (training/contract.py; each proven in tests/unit/test_honoured_keys.py)
    evals_per_epoch: int | None = Field(None, gt=0, description="evaluations per epoch (needs val_set_size)")
    saves_per_epoch: int | None = Field(None, gt=0, description="checkpoints per epoch, written to the run")
    eval_strategy: Literal["no", "steps", "epoch"] | None = None
    save_strategy: Literal["no", "steps", "epoch"] | None = None
    save_total_limit: int | None = Field(None, gt=0, description="checkpoints kept (the oldest are deleted)")
    save_only_model: bool = Field(False, description="checkpoints without optimizer state (can't resume)")
    early_stopping_patience: int | None = Field(None, gt=0, description="evaluations without improvement")
    loss_watchdog_threshold: float | None = Field(None, gt=0, description="stop when the loss stays above this")
    loss_watchdog_patience: int = Field(3, gt=0, description="steps above loss_watchdog_threshold before stopping")
    lr_scheduler_kwargs: dict[str, Any] | None = Field(None, description="passed to transformers' scheduler")
    cosine_min_lr_ratio: float | None = Field(None, ge=0, le=1, description="cosine ends at this share of the lr")
    adam_beta1: float | None = Field(None, ge=0, lt=1)
    adam_beta2: float | None = Field(None, ge=0, lt=1)
    adam_epsilon: float | None = Field(None, gt=0)
    eval_batch_size: int | None = Field(None, gt=0, description="default: micro_batch_size")
    group_by_length: bool = False
    dataloader_drop_last: bool = False
    neftune_noise_alpha: float | None = Field(None, gt=0)
    full_determinism: bool = False
    pad_to_sequence_len: bool = Field(False, description="pad every batch to sequence_len")
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        None, description="passed to gradient_checkpointing_enable (default: use_reentrant false)"
    )
    activation_offloading: bool = Field(False, description="keep saved activations in CPU memory")
    torch_compile: bool = False
    unfrozen_parameters: list[str] | None = Field(
        None, description="full fine-tune: only parameters matching one of these regexes train"
    )
    lora_modules_to_save: list[str] | None = Field(None, description="modules trained in full beside the adapter")
    peft_use_dora: bool = False
    peft_use_rslora: bool = False
    bnb_config_kwargs: dict[str, Any] | None = Field(None, description="merged into BitsAndBytesConfig")
    experts_implementation: str | None = Field(None, description="MoE experts: eager | batched_mm | grouped_mm")
    profiler_steps: int | None = Field(None, gt=0, description="steps traced by the torch profiler")
    profiler_steps_start: int = Field(0, ge=0, description="first step traced")
    # image + text rows for vision-language models (training/multimodal.py)
    processor_type: str | None = Field(
        None, description="the model's processor class (AutoProcessor): trains chats with images"
    )
    processor_kwargs: dict[str, Any] | None = Field(
        None, description="passed to the processor's from_pretrained (e.g. max_pixels)"
    )
    skip_prepare_dataset: bool = Field(
        False, description="image rows: pixels made a batch at a time by the collator, not before training"
    )
    # axolotl plugins: Liger is applied on a CUDA GPU (check_environment refuses it elsewhere); the others
    # are refused by the contract. The liger_* flags are the plugin's, axolotl's names.
    plugins: list[str] = Field(default_factory=list, description="axolotl.integrations.liger.LigerPlugin (CUDA)")
    liger_rope: bool = False
    liger_rms_norm: bool = False
    liger_rms_norm_gated: bool = False
    liger_layer_norm: bool = False
    liger_glu_activation: bool = False
    liger_swiglu: bool = Field(False, description="axolotl's old name of liger_glu_activation")
    liger_cross_entropy: bool = False
    liger_fused_linear_cross_entropy: bool = False
    cut_cross_entropy: bool = Field(True, description="with the Cut Cross Entropy plugin listed: use it (CUDA)")
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """Valid settings that do nothing in this config, or unknown keys under `strict: false`."""
        return self._warnings
    # -- sharding over several devices (FSDP2, DeepSpeed ZeRO): parsed and checked in training/sharding.py
    fsdp: list[str] | str | bool | None = Field(
        None, description="legacy axolotl switch ([full_shard, auto_wrap]); fsdp_config alone is enough"
    )
    fsdp_version: int | None = Field(None, description="axolotl's top-level spelling of fsdp_config.fsdp_version")
    fsdp_config: FsdpConfig | None = None
    deepspeed: str | None = Field(
        None, description="a preset name (zero1, zero2, zero3, zero3_bf16, ...) or a DeepSpeed JSON file"
    )

    @model_validator(mode="after")
    def _sharding_is_consistent(self) -> TrainConfig:
        sharding.check_keys(self)
        return self
    # -- end of sharding

    @model_validator(mode="before")
    @classmethod
    def _empty_keys_are_unset(cls, data: Any) -> Any:
        # As in axolotl, a key left empty (`fp16:`) is unset. (parse_config applies the contract first.)
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None}
            if isinstance(data.get("datasets"), list):
                data["datasets"] = [
                    {k: v for k, v in d.items() if v is not None} if isinstance(d, dict) else d
                    for d in data["datasets"]
                ]
            if data.get("flash_attention") and "attn_implementation" not in data:
                data["attn_implementation"] = "flash_attention_2"
        return data

    @field_validator("chat_template")
    @classmethod
    def _known_chat_template(cls, value: str) -> str:
        from training.formats.chat_template import check_template_name

        return check_template_name(value)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str | None) -> str | None:
        if value is None or value in KNOWN_OPTIMIZERS:
            return value

        def installed() -> set[str]:  # slow to import: only for names we don't know
            from transformers.training_args import OptimizerNames

            return {o.value for o in OptimizerNames}

        return _known_name("optimizer", value, installed, "transformers' names: adamw_torch, adamw_8bit, ...")

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value in KNOWN_SCHEDULERS:
            return value

        def installed() -> set[str]:
            from transformers.trainer_utils import SchedulerType

            return {s.value for s in SchedulerType}

        return _known_name("lr_scheduler", value, installed, f"one of {', '.join(sorted(KNOWN_SCHEDULERS))}")

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, value: str) -> str:
        if value not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {value!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        return value

    @model_validator(mode="after")
    def _quantization_matches_adapter(self) -> TrainConfig:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive: choose one")
        if self.adapter == "qlora":
            if self.load_in_8bit:
                raise ValueError("adapter: qlora uses 4-bit weights; remove load_in_8bit")
            self.load_in_4bit = True
        if self.adapter is None and (self.load_in_4bit or self.load_in_8bit):
            raise ValueError("quantized weights can't be fully fine-tuned; set adapter: qlora (4-bit) or lora (8-bit)")
        return self

    @model_validator(mode="after")
    def _packing_needs_isolating_attention(self) -> TrainConfig:
        if self.sample_packing and not ATTENTION_BACKENDS[self.attn_implementation].isolates_packed_samples:
            raise ValueError(
                f"sample_packing with attn_implementation {self.attn_implementation} would let packed samples "
                "attend to each other; use sdpa, eager or flash_attention_2"
            )
        return self

    @model_validator(mode="after")
    def _image_rows(self) -> TrainConfig:
        """processor_type trains chats with images (training/multimodal.py); skip_prepare_dataset and
        processor_kwargs are about those rows only."""
        if self.processor_type is None:
            if self.skip_prepare_dataset:
                raise ValueError(
                    "skip_prepare_dataset applies to image rows (processor_type); text rows are always encoded "
                    "before training: remove it"
                )
            if self.processor_kwargs:
                raise ValueError("processor_kwargs configures the processor of processor_type; set both or neither")
            return self
        if not re.fullmatch(r"[A-Z]\w*Processor", self.processor_type):
            raise ValueError(
                f"processor_type {self.processor_type!r} is not a transformers processor class; write AutoProcessor"
            )
        if self.sample_packing:
            raise ValueError(
                "sample_packing: rows with images aren't packed (axolotl refuses it too: each batch's pixels "
                "follow its rows); set sample_packing: false"
            )
        for i, d in enumerate(self.datasets):
            if d.format_name != "chat_template":
                raise ValueError(
                    f"processor_type: image rows are conversations; datasets[{i}] is type {d.type}: "
                    "use type: chat_template"
                )
        return self

    @model_validator(mode="after")
    def _warmup_is_steps_or_ratio(self) -> TrainConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self

    @model_validator(mode="after")
    def _checkpoint_and_eval_schedule(self) -> TrainConfig:
        if self.evals_per_epoch and self.eval_steps:
            raise ValueError("set evals_per_epoch or eval_steps, not both")
        if self.saves_per_epoch and self.save_steps:
            raise ValueError("set saves_per_epoch or save_steps, not both")
        if self.early_stopping_patience and not self.val_set_size:
            raise ValueError("early_stopping_patience needs an evaluation set: set val_set_size (e.g. 0.05)")
        return self

    @model_validator(mode="after")
    def _scheduler_options(self) -> TrainConfig:
        if self.cosine_min_lr_ratio is not None and self.lr_scheduler != "cosine":
            raise ValueError(
                f"cosine_min_lr_ratio applies to lr_scheduler: cosine (not {self.lr_scheduler}); "
                "use lr_scheduler_kwargs for other schedulers"
            )
        kwargs = self.lr_scheduler_kwargs or {}
        if self.lr_scheduler == "cosine_with_min_lr" and not {"min_lr", "min_lr_rate"} & set(kwargs):
            raise ValueError(
                "lr_scheduler cosine_with_min_lr needs lr_scheduler_kwargs min_lr or min_lr_rate "
                "(or write lr_scheduler: cosine with cosine_min_lr_ratio)"
            )
        if self.lr_scheduler == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
            raise ValueError("lr_scheduler warmup_stable_decay needs lr_scheduler_kwargs num_decay_steps")
        if kwargs:
            allowed = scheduler_options(self.lr_scheduler)
            unknown = sorted(set(kwargs) - allowed)
            if unknown:
                raise ValueError(
                    f"lr_scheduler_kwargs {', '.join(unknown)} not taken by the {self.lr_scheduler} scheduler; "
                    f"it takes {', '.join(sorted(allowed)) or 'no options'}"
                )
        return self

    @model_validator(mode="after")
    def _what_is_trained(self) -> TrainConfig:
        import re

        if self.unfrozen_parameters:
            if self.adapter:
                raise ValueError("unfrozen_parameters selects weights for a full fine-tune; remove adapter or it")
            for pattern in self.unfrozen_parameters:
                if re.match(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$", pattern):
                    raise ValueError(
                        f"unfrozen_parameters: {pattern!r} selects rows by index range, which Trainyard does not "
                        "support; unfreeze the whole parameter"
                    )
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"unfrozen_parameters: {pattern!r} is not a regex: {exc}") from None
        adapter_only = {
            "lora_modules_to_save": self.lora_modules_to_save,
            "peft_use_dora": self.peft_use_dora,
            "peft_use_rslora": self.peft_use_rslora,
        }
        for key, value in adapter_only.items():
            if value and not self.adapter:
                raise ValueError(f"{key} applies to an adapter: set adapter: lora (or qlora), or remove {key}")
        if self.bnb_config_kwargs:
            if not (self.load_in_4bit or self.load_in_8bit):
                raise ValueError(
                    "bnb_config_kwargs applies to quantized loading: set load_in_4bit/load_in_8bit or remove it"
                )
            unknown = sorted(set(self.bnb_config_kwargs) - BNB_OPTIONS)
            if unknown:
                raise ValueError(f"bnb_config_kwargs {', '.join(unknown)} unknown; BitsAndBytesConfig takes "
                                 f"{', '.join(sorted(BNB_OPTIONS))}")
        if self.gradient_checkpointing_kwargs:
            unknown = sorted(set(self.gradient_checkpointing_kwargs) - CHECKPOINT_OPTIONS)
            if unknown:
                raise ValueError(f"gradient_checkpointing_kwargs {', '.join(unknown)} unknown; torch's checkpoint "
                                 f"takes {', '.join(sorted(CHECKPOINT_OPTIONS))}")
        if self.experts_implementation is not None and self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(
                f"experts_implementation {self.experts_implementation!r} is not available in Trainyard (scattermoe "
                "is axolotl's own Triton kernel; transformers' sonicmoe and deepgemm need Hopper GPUs and Hub "
                f"kernels); choose one of {', '.join(EXPERTS_IMPLEMENTATIONS)}"
            )
        return self

    @model_validator(mode="after")
    def _mistral_common_encodes_conversations(self) -> TrainConfig:
        """mistral-common encodes a conversation in its own instruct format: no chat template, no other end-of-turn
        token than eos, no added tokens (axolotl refuses those too), and no rows other than conversations."""
        if not self.tokenizer_use_mistral_common:
            return self
        key = "tokenizer_use_mistral_common"
        for i, d in enumerate(self.datasets):
            if d.format_name != "chat_template":
                raise ValueError(f"{key} encodes conversations only; datasets[{i}] is type {d.type}: remove {key} "
                                 "to use the model's tokenizer.json")
            if d.chat_template or d.chat_template_jinja:
                raise ValueError(f"{key}: mistral-common's own format replaces the chat template; remove "
                                 f"datasets[{i}].chat_template/chat_template_jinja or {key}")
        others = {
            "chat_template": self.chat_template != "tokenizer_default" or self.chat_template_jinja,
            "eot_tokens": self.eot_tokens,
            "special_tokens": self.special_tokens,
        }
        for other, value in others.items():
            if value:
                why = {
                    "chat_template": "mistral-common's own format replaces the chat template",
                    "eot_tokens": "mistral-common ends a turn with the eos token only",
                    "special_tokens": "mistral-common's tokenizer takes no added or renamed tokens",
                }[other]
                raise ValueError(f"{key}: {why}; remove {other} or {key}")
        return self

    @model_validator(mode="after")
    def _liger_flags_need_the_plugin(self) -> TrainConfig:
        if self.liger_swiglu:
            self.liger_glu_activation = True
            self.liger_swiglu = False
        on = [k for k in LIGER_FLAGS if getattr(self, k)]
        if on and LIGER_PLUGIN not in self.plugins:
            raise ValueError(f"{', '.join(on)}: Liger flags need plugins: [{LIGER_PLUGIN}]")
        if self.cut_cross_entropy_on and (self.liger_fused_linear_cross_entropy or self.liger_cross_entropy):
            raise ValueError(
                "Cut Cross Entropy and Liger's cross-entropy both compute the loss: keep one "
                "(remove the CutCrossEntropyPlugin or set liger_*cross_entropy false)"
            )
        return self

    @property
    def liger(self) -> bool:
        return LIGER_PLUGIN in self.plugins

    @property
    def cut_cross_entropy_on(self) -> bool:
        return CCE_PLUGIN in self.plugins and self.cut_cross_entropy

    @property
    def attention(self) -> AttentionBackend:
        return ATTENTION_BACKENDS[self.attn_implementation]


@dataclass(frozen=True)
class ConfigError:
    path: str  # key path, e.g. "datasets[0].type"
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigInvalid(ValueError):
    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


def _named_key(message: str, model: type[BaseModel]) -> str:
    """A whole-config check's error names its key first ("experts_implementation 'x' is ..."): use it as the path,
    so every refusal is shown at a key."""
    match = re.match(r"([a-z_][a-z0-9_]*)\b", message)
    return match.group(1) if match and match.group(1) in model.model_fields else ""


def _key_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path


def parse_config(source: str | dict, *, allow_trust_remote_code: bool = False) -> TrainConfig:
    """YAML text or a dict -> TrainConfig, or ConfigInvalid listing every problem with its key path."""
    if isinstance(source, str):
        try:
            data = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise ConfigInvalid([ConfigError("", f"invalid YAML: {where}{getattr(exc, 'problem', exc)}")]) from None
    else:
        data = source
    if not isinstance(data, dict):
        raise ConfigInvalid([ConfigError("", "the config must be a YAML mapping of keys to values")])
    # The contract (training/contract.py) first: refused keys are errors at their path, harmless ones go.
    sorted_keys = contract.apply_contract(data, set(TrainConfig.model_fields), set(DatasetSpec.model_fields))
    errors = [ConfigError(path, message) for path, message in sorted_keys.errors]
    try:
        config = TrainConfig.model_validate(sorted_keys.data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key (not an axolotl option Trainyard supports)"
            path = _key_path(loc) or _named_key(message, TrainConfig)
            errors.append(ConfigError(path, message.removeprefix(f"{path}: ") if path else message))
        raise ConfigInvalid(errors) from None
    if errors:
        raise ConfigInvalid(errors)
    config._warnings = sorted_keys.warnings + _config_warnings(config)
    if config.trust_remote_code and not allow_trust_remote_code:
        raise ConfigInvalid(
            [
                ConfigError(
                    "trust_remote_code",
                    "running code shipped with a model is disabled on this server; an admin must allow it",
                )
            ]
        )
    return config


def check_environment(
    config: TrainConfig, *, cuda_available: bool | None = None, devices: int | None = None
) -> list[ConfigError]:
    """Problems that depend on this machine (GPU, optional packages), found before anything is queued.
    `devices`: how many the run gets (processes), when known."""
    bf16_available = tf32_available = cuda_available  # a machine described by the caller (tests): recent GPUs
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
        bf16_available = _cuda_has_bf16()  # T4 / V100: CUDA without bf16
        tf32_available = _cuda_has_bf16()  # the same GPUs (Ampere and newer) have tf32
    errors = []
    backend = config.attention
    if backend.needs_package and importlib.util.find_spec(backend.needs_package) is None:
        errors.append(
            ConfigError(
                "attn_implementation",
                (
                    f"{config.attn_implementation} needs the {backend.needs_package} package, which is not installed "
                    "(pip install 'trainyard[gpu]' on a CUDA machine); use sdpa instead"
                ),
            )
        )
    if backend.needs_cuda and not cuda_available:
        errors.append(ConfigError("attn_implementation", f"{config.attn_implementation} needs a CUDA GPU; use sdpa"))
    if config.fp16 and not cuda_available:
        errors.append(ConfigError("fp16", "fp16 training needs a CUDA GPU; remove fp16 (bf16: auto picks what works)"))
    if config.tf32 and cuda_available and not tf32_available:
        errors.append(
            ConfigError("tf32", "tf32: true needs an Ampere or newer GPU (this one has no tf32); set tf32: false")
        )
    # The CPU trains in bf16 (torch's CPU kernels); only a CUDA GPU without bf16 (T4, V100) can't.
    if config.bf16 is True and cuda_available and not bf16_available:
        errors.append(ConfigError("bf16", "bf16: true needs a GPU with bf16 support here; use bf16: auto"))
    if config.liger:
        errors += _liger_problems(config, cuda_available)
    if config.cut_cross_entropy_on:
        path = f"plugins[{config.plugins.index(CCE_PLUGIN)}]"
        if not cuda_available:
            errors.append(
                ConfigError(
                    path,
                    "Cut Cross Entropy is a Triton kernel that needs a CUDA GPU (measured: it fails on the CPU); "
                    "remove it from plugins (the standard cross-entropy is used)",
                )
            )
        elif importlib.util.find_spec("cut_cross_entropy") is None:
            errors.append(
                ConfigError(path, "the plugin needs the cut-cross-entropy package: pip install cut-cross-entropy")
            )
    if config.tokenizer_use_mistral_common and importlib.util.find_spec("mistral_common") is None:
        errors.append(
            ConfigError(
                "tokenizer_use_mistral_common", "needs the mistral-common package (pip install mistral-common)"
            )
        )
    if config.optimizer in TORCHAO_OPTIMIZERS and importlib.util.find_spec("torchao") is None:
        errors.append(ConfigError("optimizer", f"{config.optimizer} needs the torchao package (pip install torchao)"))
    elif config.optimizer and config.optimizer not in OPTIMIZERS_THAT_BUILD_HERE:
        problem = _optimizer_problem(config.optimizer)
        if problem:
            errors.append(
                ConfigError("optimizer", f"{config.optimizer} can't be built here: {problem}; use adamw_torch")
            )
    errors += [
        ConfigError(key, reason)
        for key, reason in sharding.environment_problems(config, devices=devices, cuda_available=cuda_available)
    ]
    return errors + check_model(config)


def check_model(config: TrainConfig) -> list[ConfigError]:
    """Problems with the model itself (names the config gives that it lacks, attention it can't use), read
    from its config.json alone: the same on every host, so a web host checks them even when the workers
    are elsewhere. Partly matching LoRA targets add a warning to `config.warnings` instead."""
    errors = []
    if config.unfrozen_parameters or config.lora_modules_to_save or (config.adapter and config.lora_target_modules):
        errors += _parameter_name_problems(config)
    from training.architectures import check_against_model  # reads the model's config.json only

    return errors + check_against_model(config)


def _parameter_name_problems(config: TrainConfig) -> list[ConfigError]:
    """unfrozen_parameters patterns and lora_modules_to_save names that match nothing in the model (read on the
    meta device: no weights), found before the model loads."""
    from training.modeling import parameter_names, unfrozen_regex

    names = parameter_names(config.base_model, config.trust_remote_code)
    if names is None:
        return []  # the model can't be read here: the loader says so before training
    errors = [
        ConfigError("unfrozen_parameters", f"{pattern!r} matches no parameter of the model (e.g. {names[0]})")
        for pattern in config.unfrozen_parameters or []
        if not any(unfrozen_regex(pattern).match(n) for n in names)
    ]
    modules = {n.rsplit(".", 1)[0] for n in names}
    errors += [
        ConfigError("lora_modules_to_save", f"{name!r} is no module of the model (e.g. {sorted(modules)[0]})")
        for name in config.lora_modules_to_save or []
        if not any(m == name or m.endswith("." + name) for m in modules)
    ]
    targets = config.lora_target_modules if config.adapter and not config.lora_target_linear else None
    if isinstance(targets, str):  # PEFT: a string is a regex matched against whole module names
        if not any(re.fullmatch(targets, m) for m in modules):
            errors.append(ConfigError("lora_target_modules", f"the regex {targets!r} matches no module of the model"))
    elif targets:
        missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
        if len(missing) == len(targets):
            errors.append(ConfigError("lora_target_modules", f"{', '.join(missing)}: no such module in the model"))
        elif missing:
            # As PEFT and axolotl do, the names that exist are adapted; said out loud, not skipped in silence
            # (GLM-4.7-Flash's guide config lists q/k/v_proj, which its attention doesn't have).
            siblings = sorted({m.rsplit(".", 1)[-1] for m in modules if m.rsplit(".", 1)[-1].endswith("_proj")})
            config._warnings.append(
                f"lora_target_modules: {', '.join(missing)} match no module of this model, so only "
                f"{', '.join(t for t in targets if t not in missing)} get LoRA (its projections: {', '.join(siblings)})"
            )
    return errors


def _liger_problems(config: TrainConfig, cuda_available: bool) -> list[ConfigError]:
    """Liger applies on a CUDA GPU with liger-kernel installed, to a model type it patches, with flags that
    model's patch takes; anything else is refused here rather than skipped when the model loads."""
    path = f"plugins[{config.plugins.index(LIGER_PLUGIN)}]"
    if not cuda_available:
        # The plugin and each flag it would apply, so removing exactly the refused keys leaves a valid config.
        return [
            ConfigError(
                path,
                "Liger kernels are Triton kernels that need a CUDA GPU (measured: they fail on the CPU); "
                "remove it from plugins and the liger_* flags",
            )
        ] + [
            ConfigError(flag, "a Liger kernel, which needs a CUDA GPU (Triton); set it false or remove it")
            for flag in LIGER_FLAGS
            if getattr(config, flag)
        ]
    if importlib.util.find_spec("liger_kernel") is None:
        return [ConfigError(path, "the Liger plugin needs the liger-kernel package: pip install liger-kernel")]
    from training.modeling import liger_arguments, model_type_of

    model_type = model_type_of(config.base_model)
    if model_type is None:
        return []  # a hub id not in the cache: the loader checks it (ModelNotFound before any training)
    try:
        liger_arguments(config, model_type)
    except ValueError as exc:
        return [ConfigError(path, str(exc))]
    return []


def _optimizer_problem(name: str) -> str | None:
    """Build `name` for a one-weight model as the Trainer will: an optimizer whose package is missing (GaLore,
    APOLLO, LOMO, schedule-free, ...) fails here, before a model is loaded, instead of after."""
    import tempfile

    import torch
    from transformers import Trainer, TrainingArguments

    try:
        args = TrainingArguments(output_dir=tempfile.gettempdir(), optim=name, report_to="none")
        Trainer.get_optimizer_cls_and_kwargs(args, torch.nn.Linear(1, 1))
    except (ImportError, ValueError, RuntimeError, NotImplementedError) as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


def _config_warnings(config: TrainConfig) -> list[str]:
    """Settings that are valid but do nothing in this config, said once at validation (never silently)."""
    warnings = []
    for key in ("evals_per_epoch", "eval_steps", "eval_strategy", "eval_batch_size"):
        if getattr(config, key) and not config.val_set_size:
            warnings.append(f"{key}: no evaluation set (val_set_size is 0), so no evaluation runs")
    if config.gradient_checkpointing_kwargs and not config.gradient_checkpointing:
        warnings.append("gradient_checkpointing_kwargs: gradient_checkpointing is off, so they are not used")
    if config.profiler_steps_start and not config.profiler_steps:
        warnings.append("profiler_steps_start: profiler_steps is not set, so nothing is traced")
    for key in config.fsdp_config.fsdp1_only if config.fsdp_config else []:
        warnings.append(f"fsdp_config.{key}: an FSDP1 setting; FSDP2 has no such knob, so it does nothing")
    return warnings


def scheduler_options(name: str) -> set[str]:
    """The keyword options transformers' `name` scheduler takes (lr_scheduler_kwargs)."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    # Set by the Trainer itself from the run's length and warmup.
    given = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
    return {p for p in inspect.signature(function).parameters if p not in given}


def _known_name(key: str, value: str, installed, choices: str) -> str:
    """`value` if the installed transformers knows it, else a ValueError with the closest names."""
    known = installed()
    if value not in known:
        close = difflib.get_close_matches(value, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown {key} {value!r}{hint}; {choices}")
    return value


def _cuda_has_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
