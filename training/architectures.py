"""What Trainyard knows about the seed model architectures: tiny offline builds of them, checks of a
config against a model's own config.json, and the model-side fixes (packed-sample boundaries for
Gated DeltaNet layers, language-model-only LoRA targets, 4-bit experts).

Framework-free and import-light: torch/transformers are imported inside the functions that need them,
so validation (which only reads config.json) stays cheap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.config import ConfigError, TrainConfig

# The named chat templates (axolotl's, as training/formats ships them); GLM-4.7's own is not among them.
_NAMED_TEMPLATES = Path(__file__).parent / "formats" / "templates"
_TEMPLATES = Path(__file__).parent / "tiny_templates"

# FA2 kernels (flash-attn 2) support head dims up to 256; Gemma 4's global layers use 512.
FLASH_ATTENTION_2_MAX_HEAD_DIM = 256

# model_type -> the attribute under which its text model lives, for the multimodal ones
MULTIMODAL_TYPES = {"gemma4", "mistral3", "qwen3_5", "qwen3_5_moe", "llava", "gemma3"}
# model_types with Gated DeltaNet (linear attention) layers
LINEAR_ATTENTION_TYPES = {"qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"}


# --------------------------------------------------------------------------------------------- #
# Tiny random-weight models of the seed architectures
# --------------------------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Family:
    """A model family's tokenizer side: its special tokens, eos and real chat template."""

    special_tokens: tuple[str, ...]
    eos: str
    pad: str
    template: str  # file in formats/templates/ (or tiny_templates/)
    bos: str | None = None


FAMILIES = {
    "mistral": Family(
        (
            "<s>",
            "</s>",
            "<unk>",
            "[INST]",
            "[/INST]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_CALLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
            "[IMG]",
            "<pad>",
        ),
        eos="</s>",
        pad="<pad>",
        bos="<s>",
        template="mistral_v3_tekken.jinja",
    ),
    "gemma4": Family(
        (
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<|turn>",
            "<turn|>",
            "<|channel>",
            "<channel|>",
            "<|think|>",
            "<|tool>",
            "<tool|>",
            "<|tool_call>",
            "<tool_call|>",
            "<|tool_response>",
            "<tool_response|>",
            '<|"|>',
            "<|image|>",
            "<|audio|>",
            "<|video|>",
            "<|image>",
            "<image|>",
        ),
        eos="<turn|>",
        pad="<pad>",
        bos="<bos>",
        template="gemma4.jinja",
    ),
    "glm4": Family(
        (
            "<|endoftext|>",
            "[MASK]",
            "[gMASK]",
            "[sMASK]",
            "<sop>",
            "<eop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
            "<think>",
            "</think>",
            "<tool_call>",
            "</tool_call>",
        ),
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        template="glm4_7.jinja",
    ),
    "qwen3_5": Family(
        (
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<think>",
            "</think>",
            "<tool_call>",
            "</tool_call>",
            "<tool_response>",
            "</tool_response>",
        ),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        template="qwen3_5.jinja",
    ),
}

# arch name -> (family, transformers class name of the saved model)
ARCHITECTURES = {
    "ministral": ("mistral", "MistralForCausalLM"),  # Ministral-8B-Instruct-2410 is a plain Mistral
    "mistral3": ("mistral", "Mistral3ForConditionalGeneration"),  # Ministral 3 / Mistral Small 3.x (vision)
    "gemma4": ("gemma4", "Gemma4ForConditionalGeneration"),  # gemma-4-31B
    "gemma4_moe": ("gemma4", "Gemma4ForConditionalGeneration"),  # gemma-4-26B-A4B
    "glm4_moe_lite": ("glm4", "Glm4MoeLiteForCausalLM"),  # GLM-4.7-Flash
    "qwen3_5": ("qwen3_5", "Qwen3_5ForConditionalGeneration"),  # Qwen3.5-9B / 27B
    "qwen3_5_moe": ("qwen3_5", "Qwen3_5MoeForConditionalGeneration"),  # Qwen3.5-35B-A3B / 122B-A10B
}

# Seed hub ids -> the tiny architecture that stands in for them
SEED_MODELS = {
    "mistralai/Ministral-8B-Instruct-2410": "ministral",
    "google/gemma-4-31B": "gemma4",
    "google/gemma-4-26B-A4B": "gemma4_moe",
    "zai-org/GLM-4.7-Flash": "glm4_moe_lite",
    "Qwen/Qwen3.5-9B": "qwen3_5",
    "Qwen/Qwen3.5-27B": "qwen3_5",
    "Qwen/Qwen3.5-35B-A3B": "qwen3_5_moe",
    "Qwen/Qwen3.5-35B-A3B-Base": "qwen3_5_moe",
    "Qwen/Qwen3.5-122B-A10B": "qwen3_5_moe",
}

_H = 64  # hidden size of every tiny model


def _save_image_processor(arch: str, folder: Path) -> None:
    """The image side of the model's processor (preprocessor_config.json), as the real checkpoint ships it, sized
    for the tiny vision tower: Qwen3.5's patches of 8 pixels merged 2x2, images of 16x16 to 64x64 pixels (1 to
    16 image tokens). The PIL image processor (torchvision does not import beside torch 2.13 here) saves the
    same file as the fast one."""
    if arch not in ("qwen3_5", "qwen3_5_moe"):
        return
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    sizes = {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}  # min and max pixels
    Qwen2VLImageProcessorPil(patch_size=8, temporal_patch_size=2, merge_size=2, size=sizes).save_pretrained(folder)


def _tiny_vision_pixtral():
    return {
        "model_type": "pixtral",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "head_dim": 16,
        "image_size": 64,
        "patch_size": 16,
    }


def _model_config(arch: str, tokenizer):
    """A transformers config object of `arch`, tiny, with the real model's structure."""
    import transformers as tf

    vocab = len(tokenizer)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if arch == "ministral":
        return tf.MistralConfig(
            vocab_size=vocab,
            hidden_size=_H,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            initializer_range=0.1,
            **ids,
        )
    if arch == "mistral3":
        text = {
            "model_type": "mistral",
            "vocab_size": vocab,
            "hidden_size": _H,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "initializer_range": 0.1,
            **ids,
        }
        return tf.Mistral3Config(
            text_config=text,
            vision_config=_tiny_vision_pixtral(),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        )
    if arch in ("gemma4", "gemma4_moe"):
        text = {
            "vocab_size": vocab,
            "hidden_size": _H,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            # The real values that matter for attention checks: global layers use head_dim 512.
            "global_head_dim": 512,
            "num_global_key_value_heads": 1,
            "attention_k_eq_v": True,
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 16,
            "final_logit_softcapping": 30.0,
            "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": vocab,
            "initializer_range": 0.1,
            "max_position_embeddings": 4096,
            **ids,
        }
        if arch == "gemma4_moe":
            text.update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
        vision = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "patch_size": 8,
            "position_embedding_size": 64,
        }
        return tf.Gemma4Config(
            text_config=text,
            vision_config=vision,
            audio_config=None,
            image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
            boi_token_id=tokenizer.convert_tokens_to_ids("<|image>"),
            eoi_token_id=tokenizer.convert_tokens_to_ids("<image|>"),
            audio_token_id=tokenizer.convert_tokens_to_ids("<|audio|>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
        )
    if arch == "glm4_moe_lite":
        return tf.Glm4MoeLiteConfig(
            # bitsandbytes' CPU 4-bit kernels want in-features a multiple of 64 and out-features of 32
            vocab_size=vocab,
            hidden_size=_H,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_shared_experts=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            kv_lora_rank=64,
            q_lora_rank=64,
            qk_rope_head_dim=32,
            v_head_dim=16,
            qk_nope_head_dim=32,
            mlp_layer_types=["dense", "sparse"],
            max_position_embeddings=4096,
            initializer_range=0.1,
            **ids,
        )
    if arch in ("qwen3_5", "qwen3_5_moe"):
        text = {
            "vocab_size": vocab,
            "hidden_size": _H,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 8,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 32,
            # one Gated DeltaNet layer, one full-attention layer (the real models: 3 linear, then 1 full)
            "layer_types": ["linear_attention", "full_attention"],
            "initializer_range": 0.1,
            "max_position_embeddings": 4096,
            **ids,
        }
        vision = {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 8,
            "out_hidden_size": _H,
            "num_position_embeddings": 64,
        }
        special = {
            k: tokenizer.convert_tokens_to_ids(t)
            for k, t in (
                ("image_token_id", "<|image_pad|>"),
                ("video_token_id", "<|video_pad|>"),
                ("vision_start_token_id", "<|vision_start|>"),
                ("vision_end_token_id", "<|vision_end|>"),
            )
        }
        if arch == "qwen3_5":
            text["intermediate_size"] = 128
            return tf.Qwen3_5Config(text_config=text, vision_config=vision, **special)
        text.update(moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
        return tf.Qwen3_5MoeConfig(text_config=text, vision_config=vision, **special)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


_BASE_TOKENIZER = None


def _base_tokenizer():
    """One byte-level BPE (demo.py's recipe, smaller vocab) shared by every family: built once per process."""
    global _BASE_TOKENIZER
    if _BASE_TOKENIZER is None:
        from training.demo import byte_level_bpe

        tok = byte_level_bpe(1024)
        _BASE_TOKENIZER = tok.to_str()
    return _BASE_TOKENIZER


def build_tokenizer(family_name: str):
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[family_name]
    tok = Tokenizer.from_str(_base_tokenizer())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.special_tokens])
    others = [t for t in family.special_tokens if t not in (family.eos, family.pad, family.bos)]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=family.eos,
        pad_token=family.pad,
        bos_token=family.bos,
        additional_special_tokens=others,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    named = _NAMED_TEMPLATES / family.template
    fast.chat_template = (named if named.exists() else _TEMPLATES / family.template).read_text()
    return fast


# Architectures whose real checkpoints ship mistral-common's tekken.json beside tokenizer.json
# (tokenizer_use_mistral_common reads it); their tiny builds do too.
TEKKEN_ARCHS = {"ministral"}
TEKKEN_VERSION = "v3"  # Ministral-8B-Instruct-2410's tokenizer (mistral-common's InstructTokenizerV3)
_TEKKEN_SPECIAL_TOKENS = 32  # real ones reserve 1000 ranks; the first 20 have fixed meanings in mistral-common


def tekken_json() -> dict:
    """The shared byte-level BPE as mistral-common's tekken.json: special tokens take the first ranks, then
    the 256 bytes in byte order and the merges in training order (tiktoken's ranks). Built offline."""
    import base64

    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from training.demo import _QWEN2_SPLIT

    model = json.loads(_base_tokenizer())["model"]
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = [bytes([b]) for b in range(256)]
    for merge in model["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        ranks.append(bytes(byte_of[c] for c in left + right))
    specials = [dict(t) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    for t in specials:
        t["token_str"] = str(getattr(t["token_str"], "value", t["token_str"]))
    return {
        "config": {
            "pattern": _QWEN2_SPLIT,
            "num_vocab_tokens": len(ranks),
            "default_vocab_size": len(ranks) + _TEKKEN_SPECIAL_TOKENS,
            "default_num_special_tokens": _TEKKEN_SPECIAL_TOKENS,
            "version": TEKKEN_VERSION,
        },
        "vocab": [
            {"rank": i, "token_bytes": base64.b64encode(b).decode(), "token_str": b.decode("utf-8", "replace")}
            for i, b in enumerate(ranks)
        ],
        "special_tokens": specials,
    }


def build_tekken_tokenizer(family_name: str, tekken_file: Path):
    """The family's tokenizer as the real Mistral repos ship it: tokenizer.json converted from `tekken_file`
    by transformers' own converter, so both give the same ids (tests/unit/test_mistral_common.py)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.mistral.tokenizer import MistralConverter

    family = FAMILIES[family_name]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=MistralConverter(str(tekken_file)).converted(),
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = (_NAMED_TEMPLATES / family.template).read_text()
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def build_tiny(arch: str, out_dir: Path | str, seed: int = 0) -> Path:
    """Write a loadable folder (config.json, weights, tokenizer with the family's chat template) of a tiny
    random-weight model of `arch` (see ARCHITECTURES). Idempotent; built beside the target and renamed."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    family, class_name = ARCHITECTURES[arch]
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if arch in TEKKEN_ARCHS:
        tmp.mkdir(parents=True)
        (tmp / "tekken.json").write_text(json.dumps(tekken_json()))
        tokenizer = build_tekken_tokenizer(family, tmp / "tekken.json")
    else:
        tokenizer = build_tokenizer(family)
    config = _model_config(arch, tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config)
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp)
    _save_image_processor(arch, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------- #
# Checks of a config against the model's own config.json (cheap: no weights, no torch)
# --------------------------------------------------------------------------------------------- #

# Architectures whose transformers classes have no flex_attention path (measured with 5.23: loading
# Qwen3_5ForCausalLM with attn_implementation="flex_attention" raises). A test keeps this in step with
# the installed transformers' `_supports_flex_attn`.
NO_FLEX_ATTENTION_TYPES = {"qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"}


def read_model_config(model_dir_or_id: str | Path) -> dict | None:
    """The model's config.json as a dict: from a local folder, or from the local hub cache; None if neither."""
    path = Path(str(model_dir_or_id)).expanduser()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if path.exists() or str(model_dir_or_id).startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(model_dir_or_id), "config.json")
    except Exception:  # not a valid repo id, no cache: nothing to check against
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def _has_model_file(model_dir_or_id: str | Path, name: str) -> bool:
    """Whether the model's folder (or its copy in the local hub cache) has the file `name`."""
    path = Path(str(model_dir_or_id)).expanduser()
    if path.is_dir():
        return (path / name).is_file()
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(str(model_dir_or_id), name), str)
    except Exception:  # not a valid repo id, no cache
        return False


# Vision-language checkpoints for which AutoModelForCausalLM builds a text-only class with other module paths
# (Qwen3.5: `model.layers` where the checkpoint and the seed configs say `model.language_model.layers`) or no
# class at all (Mistral3): these load with AutoModelForImageTextToText, as axolotl does, so regexes and
# `unfrozen_parameters: model.language_model.*` name real modules (the vision tower stays frozen/un-adapted).
FULL_MODEL_TYPES = {"qwen3_5", "qwen3_5_moe", "mistral3"}


def auto_model_class(model_dir_or_id: str | Path):
    """The transformers Auto class Trainyard loads this model with (reads config.json when it is here)."""
    import transformers

    model_config = read_model_config(model_dir_or_id) or {}
    if model_config.get("model_type") in FULL_MODEL_TYPES:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def text_config(model_config: dict) -> dict:
    return model_config.get("text_config") or model_config


def max_head_dim(model_config: dict) -> int:
    """The largest attention head dimension of any layer (Gemma 4: global layers' global_head_dim)."""
    c = text_config(model_config)
    dims = [c.get("head_dim") or 0, c.get("global_head_dim") or 0]
    if c.get("hidden_size") and c.get("num_attention_heads") and not c.get("head_dim"):
        dims.append(c["hidden_size"] // c["num_attention_heads"])
    for override in (c.get("per_layer_config") or {}).values():
        dims.append((override or {}).get("head_dim") or 0)
    if c.get("qk_nope_head_dim") is not None:  # multi-head latent attention (GLM-4.7-Flash, DeepSeek)
        dims += [c["qk_nope_head_dim"] + c.get("qk_rope_head_dim", 0), c.get("v_head_dim") or 0]
    return max(dims)


def has_linear_attention(model_config: dict) -> bool:
    c = text_config(model_config)
    return model_config.get("model_type") in LINEAR_ATTENTION_TYPES or "linear_attention" in (
        c.get("layer_types") or []
    )


def num_experts(model_config: dict) -> int:
    c = text_config(model_config)
    return int(c.get("num_experts") or c.get("n_routed_experts") or c.get("num_local_experts") or 0)


def is_multimodal(model_config: dict) -> bool:
    return bool(model_config.get("vision_config")) or model_config.get("model_type") in MULTIMODAL_TYPES


def check_against_model(config: TrainConfig, model_dir_or_id: str | Path | None = None) -> list[ConfigError]:
    """What the config asks that this model can't do, found from its config.json before anything loads.
    A model whose config.json isn't available here (hub id not cached) is not checked."""
    from training.config import ConfigError

    model_config = read_model_config(model_dir_or_id or config.base_model)
    if model_config is None:
        return []
    model_type = model_config.get("model_type", "")
    errors = []
    attn = config.attn_implementation
    head_dim = max_head_dim(model_config)
    if attn == "flash_attention_2" and head_dim > FLASH_ATTENTION_2_MAX_HEAD_DIM:
        errors.append(
            ConfigError(
                "attn_implementation",
                f"flash_attention_2 supports head dimensions up to {FLASH_ATTENTION_2_MAX_HEAD_DIM}; this model "
                f"({model_type}) has attention layers with head_dim {head_dim}; use sdpa or flex_attention",
            )
        )
    if attn == "flex_attention" and (
        model_type in NO_FLEX_ATTENTION_TYPES or text_config(model_config).get("model_type") in NO_FLEX_ATTENTION_TYPES
    ):
        errors.append(
            ConfigError(
                "attn_implementation",
                f"transformers has no flex_attention path for {model_type} (Gated DeltaNet hybrid); use sdpa",
            )
        )
    if getattr(config, "processor_type", None):
        errors += _image_processor_problems(model_config, model_dir_or_id or config.base_model)
    quantize_experts = getattr(config, "quantize_moe_experts", False)
    if quantize_experts and not num_experts(model_config):
        errors.append(ConfigError("quantize_moe_experts", f"this model ({model_type}) has no MoE experts to quantize"))
    if quantize_experts and not (config.load_in_4bit or config.load_in_8bit):
        errors.append(
            ConfigError(
                "quantize_moe_experts",
                "quantizes experts like the rest of the model: set load_in_4bit (adapter: qlora) or load_in_8bit",
            )
        )
    if getattr(config, "tokenizer_use_mistral_common", False) and not _has_model_file(
        model_dir_or_id or config.base_model, "tekken.json"
    ):
        errors.append(
            ConfigError(
                "tokenizer_use_mistral_common",
                f"this model ({model_type}) has no tekken.json, the file mistral-common's tokenizer reads; "
                "remove it to use the model's tokenizer.json",
            )
        )
    expert_targets = [t for t in (config.lora_target_parameters or []) if "experts" in t]
    if expert_targets and not num_experts(model_config):
        errors.append(
            ConfigError(
                "lora_target_parameters",
                f"this model ({model_type}) has no MoE expert parameters; use lora_target_modules",
            )
        )
    return errors


def _image_processor_problems(model_config: dict, model_dir_or_id) -> list[ConfigError]:
    """processor_type (image rows) needs a vision-language model that ships its image processor."""
    from training.config import ConfigError

    model_type = model_config.get("model_type", "")
    if not model_config.get("vision_config"):
        return [
            ConfigError(
                "processor_type",
                f"this model ({model_type}) has no vision tower, so it can't train on images; remove processor_type "
                "(and skip_prepare_dataset) to train it on text",
            )
        ]
    folder = Path(str(model_dir_or_id)).expanduser()
    shipped = ("preprocessor_config.json", "processor_config.json")
    if folder.is_dir() and not any((folder / f).is_file() for f in shipped):
        return [
            ConfigError(
                "processor_type",
                f"{folder.name} has no preprocessor_config.json: the image processor the model was trained with is "
                "missing; copy it from the model's original repository",
            )
        ]
    return []


# --------------------------------------------------------------------------------------------- #
# Model-side fixes, applied after loading
# --------------------------------------------------------------------------------------------- #


def _segments(position_ids) -> list[list[tuple[int, int]]] | None:
    """Per batch row, the (start, end) of each packed sample (positions restart); None when no row is packed."""
    if position_ids is None:
        return None
    if position_ids.dim() == 3:  # multimodal rope: (sections, batch, seq)
        if position_ids.shape[0] != 4:
            # M-RoPE's temporal/height/width positions of image rows (repeated over an image: not restarts),
            # which are never packed; cutting the Gated DeltaNet state there changed their logits.
            return None
        position_ids = position_ids[0]  # text positions lead
    pos = position_ids.tolist()
    rows, packed = [], False
    for row in pos:
        starts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1] + 1]
        packed |= len(starts) > 1
        rows.append(list(zip(starts, starts[1:] + [len(row)], strict=True)))
    return rows if packed else None


def isolate_packed_linear_attention(model) -> int:
    """Make Gated DeltaNet (linear attention) layers restart their state at each packed sample.

    transformers 5.23 runs these layers over the whole packed row: its kernels accept `cu_seqlens` only
    in the flash-linear-attention path (CUDA), and the torch fallback used on this machine ignores it,
    so a sample's state leaks into the next one. Here each layer is run once per sample (the boundaries
    come from position_ids restarts, which the packing collator writes), so packed = separate exactly.
    Returns the number of layers patched."""
    import torch

    layers = [m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")]
    if not layers:
        return 0
    # The text models that own these layers see position_ids; remember the segments for this forward.
    owners = [
        m
        for m in model.modules()
        if hasattr(m, "layers") and any(getattr(layer, "linear_attn", None) is not None for layer in m.layers)
    ]
    state: dict = {"segments": None}

    def remember(_module, args, kwargs):
        state["segments"] = _segments(kwargs.get("position_ids"))

    for owner in owners:
        owner.register_forward_pre_hook(remember, with_kwargs=True)

    for layer in layers:
        original = layer.forward

        def forward(hidden_states, cache_params=None, attention_mask=None, _original=original, **kwargs):
            segments = state["segments"]
            if segments is None or cache_params is not None or hidden_states.shape[1] != segments[0][-1][1]:
                return _original(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
            kwargs.pop("cu_seq_lens_q", None)
            rows = []
            for b, row in enumerate(segments):
                parts = [
                    _original(hidden_states[b : b + 1, s:e], cache_params=None, attention_mask=None, **kwargs)
                    for s, e in row
                ]
                rows.append(torch.cat(parts, dim=1))
            return torch.cat(rows, dim=0)

        layer.forward = forward
    return len(layers)


class _DequantizedExperts:
    """Namespace for the parametrization below (kept import-light: torch is imported on use)."""


def _dequantize_parametrization(state, shape, dtype, bits: int):
    import bitsandbytes.functional as bnbf
    from torch import nn

    class DequantizeExperts(nn.Module):
        """Stores an expert stack as 4-bit NF4 (or 8-bit blockwise) and gives the full tensor on access."""

        def __init__(self):
            super().__init__()
            self.state, self.shape, self.dtype, self.bits = state, tuple(shape), dtype, bits

        def forward(self, packed):
            if self.bits == 4:
                full = bnbf.dequantize_4bit(packed, self.state)
            else:
                full = bnbf.dequantize_blockwise(packed, self.state)
            return full.reshape(self.shape).to(self.dtype)

    return DequantizeExperts()


def expert_modules(model) -> list[tuple[str, object]]:
    """(name, module) of each routed-experts stack: modules holding 3-D parameters (experts x out x in)."""
    found = []
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if hasattr(module, "parametrizations"):
            params.update({k: v.original for k, v in module.parametrizations.items()})
        if type(module).__name__.endswith("Experts") and any(
            p.dim() == 3 or k in getattr(module, "parametrizations", {}) for k, p in params.items()
        ):
            found.append((name, module))
    return found


def quantize_moe_experts(model, bits: int = 4) -> int:
    """Store every routed expert's weights in `bits` bits (bitsandbytes NF4 for 4, blockwise for 8).

    bitsandbytes (through transformers' quantizer) only replaces nn.Linear; MoE experts in transformers 5
    are fused 3-D nn.Parameters (e.g. `mlp.experts.gate_up_proj`), so a `load_in_4bit` model keeps them in
    full precision — for GLM-4.7-Flash and Qwen3.5 MoE that is ~90% of the weights. Here each stack is
    quantized and dequantized on access (a torch parametrization), so it stays frozen, 4/8-bit at rest,
    and `lora_target_parameters` can still add LoRA on top. Returns the number of tensors quantized (none when
    `experts_quantized_on_load` did it while loading)."""
    count = 0
    for _name, module in expert_modules(model):
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 3 and param.is_floating_point():
                _quantize_expert_stack(module, pname, bits)
                count += 1
    return count


def _quantize_expert_stack(module, pname: str, bits: int) -> None:
    """One expert stack (a 3-D parameter of `module`) quantized in place: packed data, dequantized on access."""
    import bitsandbytes.functional as bnbf
    from torch import nn
    from torch.nn.utils import parametrize

    _fix_peft_stacked_parametrizations()
    # restack_for_plain_base needs the definition order; `parametrizations` keeps the order of quantizing, which
    # while loading is the checkpoint's key order
    if not hasattr(module, "trainyard_param_order"):
        module.trainyard_param_order = list(module._parameters)
    param = getattr(module, pname)
    flat = param.data.reshape(-1, param.shape[-1]).contiguous()
    if bits == 4:
        packed, state = bnbf.quantize_4bit(flat, quant_type="nf4", blocksize=64, compress_statistics=True)
    else:
        packed, state = bnbf.quantize_blockwise(flat, blocksize=256)
    shape, dtype = param.shape, param.dtype
    delattr(module, pname)
    stored = nn.Parameter(packed, requires_grad=False)
    stored._is_hf_initialized = True  # loaded, not to be initialized by from_pretrained's missing-weights pass
    setattr(module, pname, stored)
    parametrize.register_parametrization(
        module, pname, _dequantize_parametrization(state, shape, dtype, bits), unsafe=True
    )


@contextmanager
def experts_quantized_on_load(bits: int):
    """Within this block, from_pretrained quantizes each routed expert stack as soon as it is loaded, so the
    full-precision experts are never all in memory at once: the peak stays near the quantized model plus one
    stack (tests/unit/test_architectures.py measures it). Axolotl patches the same transformers function.

    transformers 5 sets each loaded tensor through `core_model_loading.set_param_for_module`; it is wrapped for
    this block only (hold MODEL_LOCK: loading patches process-wide state), and its thread pool, which would
    materialize tensors ahead of their turn, is turned off. Yields a list whose length counts the stacks."""
    import transformers.core_model_loading as loading

    original = loading.set_param_for_module
    quantized: list[str] = []

    def set_param_for_module(model, target_name, param_value, *args, **kwargs):
        original(model, target_name, param_value, *args, **kwargs)
        module_path, _, pname = target_name.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        if param_value.dim() == 3 and param_value.is_floating_point() and _holds_experts(module):
            _quantize_expert_stack(module, pname, bits)
            quantized.append(target_name)

    async_load = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    loading.set_param_for_module = set_param_for_module
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield quantized
    finally:
        loading.set_param_for_module = original
        if async_load is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = async_load


def _holds_experts(module) -> bool:
    return type(module).__name__.endswith("Experts")


def restack_for_plain_base(peft_model, adapter_dir: Path) -> int:
    """Rewrite a saved adapter so it loads onto the ordinary base model. Several LoRA'd parameters of one
    module (`experts.gate_up_proj` and `experts.down_proj`) are nested wrappers; PEFT nests them in sorted
    name order on a parametrized module (our quantized experts) but in definition order on a plain one,
    so the saved keys (`experts.lora_A`, `experts.base_layer.lora_A`, ...) would land on the wrong
    parameter when loaded onto the unquantized base (size mismatch). Returns the number of keys moved."""
    from peft.tuners.lora.layer import ParamWrapper
    from safetensors.torch import load_file, save_file

    moves: dict[str, dict[int, int]] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, ParamWrapper) or name.endswith(".base_layer"):
            continue
        chain, inner = [], module  # outermost wrapper first
        while isinstance(inner, ParamWrapper):
            chain.append(inner.parameter_name)
            inner = inner.base_layer
        order = getattr(inner, "trainyard_param_order", None) or list(getattr(inner, "parametrizations", {}))
        defined = [p for p in order if p in chain]
        plain = list(reversed(defined))  # a plain load wraps in definition order: the first is innermost
        if len(chain) > 1 and sorted(plain) == sorted(chain) and plain != chain:
            moves[name] = {depth: plain.index(p) for depth, p in enumerate(chain)}
    if not moves:
        return 0
    path = Path(adapter_dir) / "adapter_model.safetensors"
    tensors, renamed, moved = load_file(str(path)), {}, 0
    for key, tensor in tensors.items():
        for prefix, depths in moves.items():
            if not key.startswith(prefix + "."):
                continue
            rest, depth = key[len(prefix) + 1 :], 0
            while rest.startswith("base_layer."):
                rest, depth = rest[len("base_layer.") :], depth + 1
            if depth in depths and depths[depth] != depth:
                key, moved = f"{prefix}.{'base_layer.' * depths[depth]}{rest}", moved + 1
            break
        renamed[key] = tensor
    save_file(renamed, str(path), metadata={"format": "pt"})
    return moved


def _fix_peft_stacked_parametrizations() -> None:
    """peft 0.21.2's ParamWrapper, after each forward, removes its LoRA parametrization from a parameter that
    already had one (our dequantization) only when it is a `_LoraParameterProxy`; for expert stacks it uses
    `_LoraFactorsProxy`, which stays, so the next forward adds LoRA twice and fails on the uint8 storage.
    Also remove a leftover `_LoraFactorsProxy` (idempotent; a no-op for models without stacked parametrizations)."""
    from peft.tuners.lora import layer

    if getattr(layer.ParamWrapper, "_trainyard_fixed", False) or not hasattr(layer, "_LoraFactorsProxy"):
        return
    original = layer.ParamWrapper._remove_parametrizations

    def _remove_parametrizations(self):
        base_layer = self.get_base_layer()
        param_list = base_layer.parametrizations[self.parameter_name]
        if len(param_list) > 1 and isinstance(param_list[len(param_list) - 1], layer._LoraFactorsProxy):
            del param_list[len(param_list) - 1]
            return
        original(self)

    layer.ParamWrapper._remove_parametrizations = _remove_parametrizations
    layer.ParamWrapper._trainyard_fixed = True


def expert_parameter_targets(model, targets: list[str]) -> list[str]:
    """`lora_target_parameters` as PEFT needs them: PEFT matches an already parametrized parameter (a
    quantized expert stack) only by its full name, so suffixes like `experts.gate_up_proj` are expanded."""
    expanded = []
    for name, module in expert_modules(model):
        names = list(dict(module.named_parameters(recurse=False))) + list(getattr(module, "parametrizations", {}))
        for pname in names:
            full = f"{name}.{pname}"
            if any(full == t or full.endswith("." + t) for t in targets):
                expanded.append(full)
    # In the module's own parameter order: PEFT nests one wrapper per parameter in this order, and a plain
    # (unquantized) reload of the adapter nests them in definition order; sorted names loaded back mismatched.
    return list(dict.fromkeys(expanded)) or list(targets)


# Submodules of a multimodal model that are not its language model.
_NON_LANGUAGE_PARTS = re.compile(
    r"(^|\.)(vision_tower|visual|vision_model|multi_modal_projector|embed_vision|audio_tower|embed_audio|"
    r"audio_model|mm_projector)(\.|$)"
)


def language_model_linear_regex(model) -> str | None:
    """For `lora_target_linear` on a model with a vision/audio part: a regex (PEFT full-matches it) for
    the linear layers of the language model only. None for a text-only model (PEFT's all-linear is it)."""
    import torch

    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt")
    ]
    if not any(_NON_LANGUAGE_PARTS.search(n) for n in names):
        return None
    output = model.get_output_embeddings()
    output_names = {n for n, m in model.named_modules() if m is output}
    language = [n for n in names if not _NON_LANGUAGE_PARTS.search(n) and n not in output_names]
    # Group layer-indexed names into one alternative per (prefix, suffix): model.language_model.layers.\d+.mlp.up_proj
    groups: dict[str, set[str]] = {}
    for n in language:
        prefix, _, last = re.sub(r"\.\d+\.", ".#.", n).rpartition(".")
        groups.setdefault(prefix, set()).add(last)
    parts = [
        re.escape(prefix + ".").replace("\\#", "\\d+") + "(?:" + "|".join(sorted(lasts)) + ")"
        for prefix, lasts in sorted(groups.items())
    ]
    return "^(?:" + "|".join(parts) + ")$" if parts else None


def _flatten_int8_inputs(model) -> int:
    """bitsandbytes 0.50's int8 matmul on the CPU takes row statistics over dim 1, so a 4-D input (GLM-4.7's
    latent attention feeds kv_b_proj [batch, 1, seq, rank]) fails with a shape error. Only on the CPU: the
    input is seen as 3-D and the output given its shape back. Returns the number of layers wrapped."""
    import torch

    if torch.cuda.is_available():
        return 0
    layers = [m for m in model.modules() if type(m).__name__ == "Linear8bitLt"]

    def flatten(_module, args):
        x = args[0]
        if x.dim() <= 3:
            return None
        _module._trainyard_lead = x.shape[:-1]
        return (x.reshape(-1, x.shape[-2], x.shape[-1]), *args[1:])

    def restore(_module, _args, output):
        lead = _module.__dict__.pop("_trainyard_lead", None)
        return output if lead is None else output.reshape(*lead, output.shape[-1])

    for layer in layers:
        layer.register_forward_pre_hook(flatten)
        layer.register_forward_hook(restore)
    return len(layers)


def prepare_model(model, config: TrainConfig) -> list[str]:
    """The architecture fixes for a freshly loaded model, before any adapter; returns what was done, as
    log lines (also kept on the model as `trainyard_notes`)."""
    notes = []
    patched = isolate_packed_linear_attention(model)
    if patched:
        notes.append(f"architecture: {patched} Gated DeltaNet layer(s) restart their state at each packed sample")
    if config.load_in_8bit and _flatten_int8_inputs(model):
        notes.append("architecture: 8-bit layers given 4-D inputs see them as 3-D (bitsandbytes' CPU int8 path)")
    if getattr(config, "quantize_moe_experts", False):
        bits = 4 if config.load_in_4bit else 8
        on_load = getattr(model, "trainyard_experts_quantized_on_load", 0)  # modeling.load_model
        count = quantize_moe_experts(model, bits) + on_load
        when = " while loading" if on_load else ""
        notes.append(f"quantize_moe_experts: {count} expert weight stack(s) stored in {bits}-bit{when}")
    model.trainyard_notes = notes
    return notes


def lora_targets(model, config: TrainConfig) -> tuple[list[str] | str | None, list[str] | None]:
    """(target_modules, target_parameters) for PEFT. `lora_target_linear` on a multimodal model means the
    language model's linear layers (a regex, logged), never the vision/audio towers; listed
    `lora_target_modules` are added to it."""
    targets: list[str] | str | None = config.lora_target_modules
    if config.lora_target_linear:
        regex = language_model_linear_regex(model)
        if regex is None:
            targets = "all-linear"
        else:
            # Listed names are language-model linear layers already covered by the regex; a user's own
            # regex string is kept beside it (that is how a user asks for a vision layer explicitly).
            regex = with_listed_regex(regex, config.lora_target_modules)
            targets = regex
            notes = getattr(model, "trainyard_notes", None)
            if notes is not None:
                notes.append(f"lora_target_linear: language model only (multimodal model): target_modules {regex}")
    parameters = (
        expert_parameter_targets(model, config.lora_target_parameters) if config.lora_target_parameters else None
    )
    return targets, parameters


def lora_target_linear_regex(model_dir_or_id: str | Path, trust_remote_code: bool = False) -> str | None:
    """What `lora_target_linear: true` adapts on this model, for the config page: the language-model regex
    of a multimodal model (built on the meta device from config.json, no weights), None for a text-only
    model (all linear layers) or a model whose config.json isn't here."""
    raw = read_model_config(model_dir_or_id)
    if not raw or "model_type" not in raw:
        return None
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        from training.modeling import MODEL_LOCK  # building a model patches process-wide state

        raw = dict(raw)
        model_config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        with MODEL_LOCK, init_empty_weights():
            model = auto_model_class(model_dir_or_id).from_config(model_config, trust_remote_code=trust_remote_code)
    except Exception:  # an architecture this transformers can't build from its config
        return None
    return language_model_linear_regex(model)


def with_listed_regex(language_regex: str, lora_target_modules) -> str:
    """lora_target_linear's language-model regex, with the user's own regex string (lora_target_modules given as
    a string) beside it: how a user asks for some vision layers too. Listed names are language-model layers that
    the regex already covers."""
    if isinstance(lora_target_modules, str):
        return f"{language_regex}|(?:{lora_target_modules})"
    return language_regex


def describe_lora_target_linear(config: TrainConfig) -> tuple[str, str | None] | None:
    """For the config page: (what `lora_target_linear: true` adapts on this model, the regex PEFT is given or
    None); None when the config doesn't ask for it or the model's config.json isn't here."""
    if not (config.adapter and config.lora_target_linear):
        return None
    model_config = read_model_config(config.base_model)
    if model_config is None:
        return None
    if not is_multimodal(model_config):
        return "every linear layer of the model but its output layer (PEFT's all-linear)", None
    regex = lora_target_linear_regex(config.base_model, config.trust_remote_code)
    if regex is None:
        return None
    what = "the language model's linear layers only; the vision tower is not adapted"
    if isinstance(config.lora_target_modules, str):
        what += ", except the layers your lora_target_modules regex names"
    else:
        what += " (to adapt some of its layers too, give lora_target_modules as a regex naming them)"
    return what, with_listed_regex(regex, config.lora_target_modules)
