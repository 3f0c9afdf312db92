"""Loads the tokenizer and model named by a config (hub id or local folder), with PEFT adapters and quantization."""

from __future__ import annotations

import os
from pathlib import Path

from training.config import TrainConfig


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
    from transformers import AutoTokenizer

    source = _source(config.base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
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


def pick_dtype(config: TrainConfig):
    import torch

    if config.fp16:
        return torch.float16
    cuda = torch.cuda.is_available()
    if config.bf16 is True or (config.bf16 == "auto" and cuda and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def load_model(config: TrainConfig, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = pick_dtype(config)
    kwargs: dict = {
        "dtype": dtype,
        "attn_implementation": config.attn_implementation,
        "trust_remote_code": config.trust_remote_code,
    }
    if config.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float32,
        )
    elif config.load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    source = _source(config.base_model)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(
            f"base_model: can't load a model from {config.base_model!r}: {str(exc).splitlines()[0]}"
        ) from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.use_cache = False  # packed samples would attend to each other with the cache on
    if config.adapter:
        model = _add_adapter(model, config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.adapter:
            model.enable_input_require_grads()
    return model


def _add_adapter(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.load_in_4bit or config.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    if config.lora_target_linear:
        targets: list[str] | str | None = "all-linear"
    else:
        targets = config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        target_parameters=config.lora_target_parameters,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def merge_adapter_into_base(base_model: str, adapter_dir: Path, out_dir: Path) -> Path:
    """Base model + LoRA adapter -> one plain model folder (with the tokenizer), loadable without peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(_source(base_model))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tmp = Path(str(out_dir) + ".part")
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir
