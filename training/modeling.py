"""Loads the tokenizer and model named by a config (hub id or local folder), with PEFT adapters and quantization."""

from __future__ import annotations

import os
import shutil
import threading
from contextlib import nullcontext
from pathlib import Path

from training.config import TrainConfig

# Building a model patches process-wide state until it is built: transformers' from_pretrained sets torch's default
# dtype, turns PreTrainedModel.tie_weights into a no-op and patches torch.linspace; accelerate's init_empty_weights
# patches nn.Module.register_parameter. A model that finishes loading in one thread while another loads is never
# tied (its lm_head stays on the meta device: "Cannot copy out of meta tensor"), and interleaved patch/restore
# pairs can leave a patch in place for good. So a process (the worker's threads: merges, playground answers;
# the web server's config checks) builds and uses one model at a time. Training runs are processes of their own.
MODEL_LOCK = threading.RLock()


class ModelNotFound(ValueError):
    pass


def _source(base_model: str) -> str:
    path = Path(base_model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if base_model.startswith(("/", "./", "../", "~")):
        raise ModelNotFound(f"base_model: folder {base_model!r} does not exist")
    return base_model  # a hub id, resolved from the local cache when HF_HUB_OFFLINE=1


def load_tokenizer(config: TrainConfig):
    source = _source(config.base_model)
    try:
        if config.tokenizer_use_mistral_common:
            return load_mistral_common_tokenizer(source)
        tokenizer = load_hf_tokenizer(source, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        offline = " (offline: HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ModelNotFound(
            f"base_model: can't load a tokenizer from {config.base_model!r}{offline}: {str(exc).splitlines()[0]}"
        ) from None
    if config.special_tokens:
        tokenizer.add_special_tokens({k: v for k, v in config.special_tokens.items()})
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss; reusing eos for them is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_hf_tokenizer(source: str | Path, **kwargs):
    """The folder's transformers tokenizer (tokenizer.json and its config). With mistral-common installed,
    AutoTokenizer picks mistral-common's for any Mistral folder that ships a tekken.json; that one is used
    only when the config asks for it (tokenizer_use_mistral_common), as in axolotl."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, mistral_format=False, **kwargs)


def load_mistral_common_tokenizer(source: str | Path):
    """mistral-common's tokenizer (the folder's tekken.json) in fine-tuning mode, as axolotl's HFMistralTokenizer
    loads it: conversations are encoded by mistral-common's own instruct format, not a chat template.
    training/mistral_chat.py turns its encodings into labels."""
    from transformers.tokenization_mistral_common import MistralCommonBackend

    class MistralCommonTokenizer(MistralCommonBackend):
        def save_pretrained(self, save_directory, *args, **kwargs):
            """tekken.json, and the folder's transformers tokenizer beside it: the playground, merges and other
            tools read tokenizer.json and its chat template (the same ids for conversations)."""
            saved = super().save_pretrained(save_directory, *args, **kwargs)
            if Path(source).is_dir() and (Path(source) / "tokenizer.json").is_file():
                saved += tuple(load_hf_tokenizer(source).save_pretrained(save_directory))
            return saved

    return MistralCommonTokenizer.from_pretrained(str(source), mode="finetuning")


def pick_dtype(config: TrainConfig):
    import torch

    if config.fp16:
        return torch.float16
    cuda = torch.cuda.is_available()
    # bf16: true trains in bf16 on the CPU too (torch's CPU kernels). bf16: auto picks it only on a GPU
    # that has it: on the CPU, fp32 is exact and bf16 is only faster with AMX/AVX512-BF16 units.
    if config.bf16 is True or (config.bf16 == "auto" and cuda and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def load_model(config: TrainConfig, tokenizer):
    from training.architectures import auto_model_class

    dtype = pick_dtype(config)
    kwargs: dict = {
        "dtype": dtype,
        "attn_implementation": config.attn_implementation,
        "trust_remote_code": config.trust_remote_code,
    }
    if config.experts_implementation:
        kwargs["experts_implementation"] = config.experts_implementation
    if config.load_in_4bit or config.load_in_8bit:
        kwargs["quantization_config"] = quantization_config(config, dtype)
    source = _source(config.base_model)
    model_class = auto_model_class(source)
    if config.processor_type:  # image rows: the model with its vision tower, whatever its type
        from transformers import AutoModelForImageTextToText as model_class
    from training.architectures import experts_quantized_on_load

    quantizing = (
        experts_quantized_on_load(4 if config.load_in_4bit else 8) if config.quantize_moe_experts else nullcontext([])
    )
    try:
        with MODEL_LOCK, quantizing as quantized:
            model = model_class.from_pretrained(source, **kwargs)  # VLM checkpoints: the whole model
    except (OSError, ValueError) as exc:
        raise ModelNotFound(
            f"base_model: can't load a model from {config.base_model!r}: {str(exc).splitlines()[0]}"
        ) from None
    model.trainyard_experts_quantized_on_load = len(quantized)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False  # packed samples would attend to each other with the cache on
    from training.architectures import prepare_model

    prepare_model(model, config)  # packed-sample boundaries in Gated DeltaNet layers, quantize_moe_experts
    from training import sharding

    if config.load_in_8bit and sharding.kind_of(config) == "fsdp":
        sharding.keep_int8_weights_through_fsdp2(model)
    if config.adapter:
        model = _add_adapter(model, config)
    if config.liger:
        apply_liger(model, config)
    if config.unfrozen_parameters:
        unfreeze_only(model, config.unfrozen_parameters)
    if config.gradient_checkpointing:
        # Non-reentrant unless the config says otherwise: it works with frozen inputs (LoRA) and packing.
        model.activation_checkpointing_enable(  # transformers 5's name for gradient_checkpointing_enable
            activation_checkpointing_kwargs={"use_reentrant": False, **(config.gradient_checkpointing_kwargs or {})}
        )
        if config.adapter or config.unfrozen_parameters:
            model.enable_input_require_grads()
    return model


def quantization_config(config: TrainConfig, dtype):
    """bitsandbytes settings: Trainyard's defaults (nf4, double quantization), then bnb_config_kwargs."""
    import torch
    from transformers import BitsAndBytesConfig

    from training import sharding

    options = dict(config.bnb_config_kwargs or {})
    if isinstance(options.get("bnb_4bit_compute_dtype"), str):
        options["bnb_4bit_compute_dtype"] = getattr(torch, options["bnb_4bit_compute_dtype"])
    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, **options)
    defaults = {
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": dtype,
        **sharding.qlora_quantization_kwargs(config, dtype),  # FSDP2: 4-bit weights stored in the model's dtype
    }
    if not torch.cuda.is_available() and "llm_int8_skip_modules" not in options:
        skip = cpu_unpackable_linears(config.base_model, config.trust_remote_code)
        if skip:
            defaults["llm_int8_skip_modules"] = skip
    return BitsAndBytesConfig(load_in_4bit=True, **{**defaults, **options})


def cpu_unpackable_linears(base_model: str, trust_remote_code: bool = False) -> list[str] | None:
    """bitsandbytes' CPU 4-bit kernel packs weights in blocks of 32 output rows: a Linear of another width (an
    MoE router over 4 experts, say) fails at its first forward, after the model loaded. On the CPU such layers
    stay unquantized; transformers' own skips (the output embedding) are kept. None: nothing to skip."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert

    model = _meta_model(base_model, trust_remote_code)
    if model is None:
        return None
    odd = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features % 32]
    return sorted(set(get_keys_to_not_convert(model)) | set(odd)) if odd else None


def unfreeze_only(model, patterns: list[str]) -> None:
    """Full fine-tune of the parameters whose name matches one of the patterns, read as axolotl reads them
    (utils/freeze.py): a regex matched from the start of the name, where a `.` is a literal dot."""
    compiled = [unfrozen_regex(p) for p in patterns]
    matched = 0
    for name, param in model.named_parameters():
        param.requires_grad = any(c.match(name) for c in compiled)
        matched += param.requires_grad
    if not matched:
        raise ModelNotFound(f"unfrozen_parameters: no parameter of the model matches {patterns}")


def _add_adapter(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.load_in_4bit or config.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    from training.architectures import lora_targets

    # lora_target_linear on a multimodal model: its language model only; expert parameters by full name
    targets, target_parameters = lora_targets(model, config)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        target_parameters=target_parameters,
        modules_to_save=config.lora_modules_to_save,
        use_dora=config.peft_use_dora,
        use_rslora=config.peft_use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


# Liger's apply function argument <- the config's flag (axolotl's liger plugin maps them the same way).
LIGER_ARGUMENTS = {
    "rope": "liger_rope",
    "rms_norm": "liger_rms_norm",
    "rms_norm_gated": "liger_rms_norm_gated",
    "layer_norm": "liger_layer_norm",
    "swiglu": "liger_glu_activation",
    "geglu": "liger_glu_activation",
    "cross_entropy": "liger_cross_entropy",
    "fused_linear_cross_entropy": "liger_fused_linear_cross_entropy",
}


def model_type_of(base_model: str) -> str | None:
    """config.json's model_type of a local folder or a cached hub model, None when it can't be read here."""
    from training.architectures import read_model_config

    return (read_model_config(base_model) or {}).get("model_type")


def liger_arguments(config: TrainConfig, model_type: str) -> tuple:
    """(Liger's apply function for this model type, its keywords): every kernel it takes is set, off unless
    its flag is on (its defaults turn several on). A flag the model's patch does not take is a ValueError."""
    import inspect

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise ValueError(f"liger-kernel has no kernels for model type {model_type}; remove the Liger plugin")
    params = set(inspect.signature(apply).parameters) - {"model"}
    kwargs = {p: bool(getattr(config, LIGER_ARGUMENTS[p], False)) for p in params if p in LIGER_ARGUMENTS}
    taken = {LIGER_ARGUMENTS[p] for p in kwargs}
    unsupported = [flag for flag in LIGER_ARGUMENTS.values() if getattr(config, flag) and flag not in taken]
    if unsupported:
        raise ValueError(
            f"{', '.join(sorted(set(unsupported)))}: liger-kernel's {model_type} patch has no such kernel; set it false"
        )
    return apply, kwargs


def apply_liger(model, config: TrainConfig) -> None:
    """Swap the model's layers for Liger's kernels, as the config's liger_* flags say (CUDA only)."""
    apply, kwargs = liger_arguments(config, model.config.model_type)
    apply(model=model, **kwargs)


def _meta_model(base_model: str, trust_remote_code: bool = False):
    """The model built from its config alone on the meta device (no weights); None if it can't be read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    # a local folder or the hub cache: never the network
    from training.architectures import auto_model_class, read_model_config

    raw = read_model_config(base_model)
    if raw is None or "model_type" not in raw:
        return None
    try:
        raw = dict(raw)
        model_config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        with MODEL_LOCK, init_empty_weights():
            return auto_model_class(base_model).from_config(model_config, trust_remote_code=trust_remote_code)
    except Exception:  # not local, not cached, or not a causal LM the Auto class builds from its config
        return None


def parameter_names(base_model: str, trust_remote_code: bool = False) -> list[str] | None:
    """The model's parameter names, from its config alone (built on the meta device); None if it can't be read."""
    model = _meta_model(base_model, trust_remote_code)
    if model is None:
        return None
    model_config = model.config
    names = [name for name, _ in model.named_parameters()]
    if getattr(model_config.get_text_config(), "tie_word_embeddings", False) and model.get_output_embeddings():
        # Tied on load: the loaded model lists the output embedding under the input embedding's name only.
        head = model.get_output_embeddings().weight
        names = [name for name, p in model.named_parameters() if p is not head]
    return names


def unfrozen_regex(pattern: str):
    import re

    return re.compile(re.sub(r"\.(?!\+)", "\\\\.", pattern))


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def merge_adapter_into_base(base_model: str, adapter_dir: Path, out_dir: Path) -> Path:
    """Base model + LoRA adapter -> one plain model folder (with the tokenizer), loadable without peft."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from training.architectures import auto_model_class

    with MODEL_LOCK:  # one model at a time in this process (see MODEL_LOCK)
        if out_dir.is_dir():  # merged by a request that held the lock before this one
            return out_dir
        base = auto_model_class(_source(base_model)).from_pretrained(_source(base_model))
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        tmp = Path(str(out_dir) + ".part")
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(adapter_dir, mistral_format=False).save_pretrained(tmp)
        if (adapter_dir / "tekken.json").is_file():  # a tokenizer_use_mistral_common run: keep its tokenizer too
            shutil.copy(adapter_dir / "tekken.json", tmp / "tekken.json")
        tmp.rename(out_dir)
    return out_dir
