"""The one validated training config: an axolotl-compatible subset, with errors that name the key path."""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training import sharding
from training.sharding import FsdpConfig

# Axolotl keys that are accepted so a plain axolotl YAML imports, but that Trainyard does not use
# (the web app decides where outputs go and how runs are tracked).
IGNORED_AXOLOTL_KEYS = {
    "output_dir",
    "dataset_prepared_path",
    "strict",
    "wandb_project",
    "wandb_entity",
    "wandb_watch",
    "wandb_name",
    "wandb_log_model",
    "wandb_mode",
    "hub_model_id",
    "push_dataset_to_hub",
    "hf_use_auth_token",
    "base_model_config",
    "model_type",
    "tokenizer_type",
    "is_llama_derived_model",
    "debug",
    "early_stopping_patience",
    "local_rank",
    "logging_steps",
    "pad_to_sequence_len",
    "eval_sample_packing",
    "resume_from_checkpoint",
    "auto_resume_from_checkpoints",
    "save_total_limit",
    "group_by_length",
    "xformers_attention",
    "sdp_attention",
    "s2_attention",
    "evals_per_epoch",
    "saves_per_epoch",
    "special_tokens_check",
    "plugins",
    "eval_table_size",
    "eval_max_new_tokens",
    "loss_watchdog_threshold",
    "loss_watchdog_patience",
    "gradient_checkpointing_kwargs",
    "use_wandb",
    "wandb_run_id",
}
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
# Accepted when off (axolotl's examples spell them out); anything else is refused, named.
IGNORED_WHEN_OFF = {"lora_fan_in_fan_out", "lora_model_dir", "load_best_model_at_end", "torch_compile"}


@dataclass(frozen=True)
class AttentionBackend:
    """What an attention implementation can do; packing and flash-lib use are derived from it."""

    isolates_packed_samples: bool  # honours position_ids restarts, so packed samples don't attend to each other
    needs_cuda: bool
    needs_package: str | None


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend(isolates_packed_samples=True, needs_cuda=False, needs_package=None),
    "eager": AttentionBackend(isolates_packed_samples=True, needs_cuda=False, needs_package=None),
    "flex_attention": AttentionBackend(isolates_packed_samples=False, needs_cuda=False, needs_package=None),
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
    sample_packing: bool = False
    # model and adapter
    adapter: Literal["lora", "qlora"] | None = None
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | str | None = None
    lora_target_linear: bool = False
    lora_target_parameters: list[str] | None = None
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
    def _drop_ignored_axolotl_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # As in axolotl, a key left empty (`fp16:`) is unset.
            data = {
                k: v
                for k, v in data.items()
                if k not in IGNORED_AXOLOTL_KEYS and v is not None and not (k in IGNORED_WHEN_OFF and not v)
            }
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
    def _warmup_is_steps_or_ratio(self) -> TrainConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self

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
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key (not an axolotl option Trainyard supports)"
            errors.append(ConfigError(_key_path(loc), message))
        raise ConfigInvalid(errors) from None
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
    bf16_available = cuda_available  # a machine described by the caller (tests): GPUs with bf16
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
        bf16_available = _cuda_has_bf16()  # T4 / V100: CUDA without bf16
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
    if config.bf16 is True and not bf16_available:
        errors.append(ConfigError("bf16", "bf16: true needs a GPU with bf16 support here; use bf16: auto"))
    errors += [
        ConfigError(key, reason)
        for key, reason in sharding.environment_problems(config, devices=devices, cuda_available=cuda_available)
    ]
    return errors


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


def dump_config(config: TrainConfig) -> str:
    """Plain axolotl YAML (defaults left out), for export."""
    return yaml.safe_dump(config.model_dump(exclude_defaults=True, exclude_none=True), sort_keys=False)
