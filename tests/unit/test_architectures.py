"""The seed architectures (Ministral, Gemma 4, GLM-4.7-Flash, Qwen3.5): tiny builds keep the real
structure, packed samples stay separate, configs are checked against the model, MoE experts get LoRA
and 4-bit storage, and lora_target_linear leaves vision towers alone."""

from __future__ import annotations

import json
import re

import pytest
import torch

from training.architectures import (
    ARCHITECTURES,
    NO_FLEX_ATTENTION_TYPES,
    check_against_model,
    isolate_packed_linear_attention,
    language_model_linear_regex,
)
from training.config import check_environment, parse_config

CAUSAL_ARCHS = [a for a in ARCHITECTURES if a != "mistral3"]  # mistral3 has no AutoModelForCausalLM mapping
# (sample a, sample b): the packed row is a + b with positions restarting at b
SAMPLE_A, SAMPLE_B = list(range(5, 17)), list(range(30, 37))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _config(model_dir, **keys):
    return parse_config({"base_model": str(model_dir), "datasets": [{"path": "rows.jsonl"}], **keys})


def _load(model_dir, **keys):
    from training.modeling import load_model, load_tokenizer

    config = _config(model_dir, **keys)
    return load_model(config, load_tokenizer(config)), config


def _class_names(model) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


@pytest.mark.parametrize(
    "arch, classes, module",
    [
        ("ministral", {"MistralDecoderLayer"}, "model.layers.0.self_attn.q_proj"),
        ("gemma4", {"Gemma4TextDecoderLayer", "Gemma4VisionEncoder"}, "model.language_model.layers.1.self_attn.q_proj"),
        ("gemma4_moe", {"Gemma4TextExperts"}, "model.language_model.layers.1.experts"),
        ("glm4_moe_lite", {"Glm4MoeLiteDecoderLayer", "Glm4MoeLiteExperts"}, "model.layers.1.mlp.experts"),
        ("qwen3_5", {"Qwen3_5DecoderLayer", "Qwen3_5GatedDeltaNet", "Qwen3_5Attention"}, "model.layers.0.linear_attn"),
        (
            "qwen3_5_moe",
            {"Qwen3_5MoeDecoderLayer", "Qwen3_5MoeGatedDeltaNet", "Qwen3_5MoeExperts"},
            "model.layers.1.mlp.experts",
        ),
    ],
)
def test_tiny_models_keep_the_real_classes_and_module_paths(tiny_arch, arch, classes, module):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_arch(arch)
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["architectures"] == [ARCHITECTURES[arch][1]]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert classes <= _class_names(model)
    model.get_submodule(module)
    assert model.get_input_embeddings().weight.shape[1] == 64
    tokenizer = AutoTokenizer.from_pretrained(model_dir, mistral_format=False)  # not tekken.json (load_tokenizer)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5."}], tokenize=False
    )
    family_marker = {
        "ministral": "[INST]",
        "gemma4": "<|turn>",
        "gemma4_moe": "<|turn>",
        "glm4_moe_lite": "<|user|>",
        "qwen3_5": "<|im_start|>",
        "qwen3_5_moe": "<|im_start|>",
    }[arch]
    assert family_marker in text
    assert tokenizer.convert_tokens_to_ids(family_marker) != tokenizer.unk_token_id  # one special token


def test_qwen3_5_has_a_gated_deltanet_layer_and_a_full_attention_layer(tiny_arch):
    for arch in ("qwen3_5", "qwen3_5_moe"):
        text = json.loads((tiny_arch(arch) / "config.json").read_text())["text_config"]
        assert set(text["layer_types"]) == {"linear_attention", "full_attention"}


def _packed_vs_separate(model) -> float:
    a, b = torch.tensor([SAMPLE_A]), torch.tensor([SAMPLE_B])
    positions = torch.tensor([list(range(len(SAMPLE_A))) + list(range(len(SAMPLE_B)))])
    with torch.no_grad():
        alone_a = model(a, use_cache=False).logits[0]
        alone_b = model(b, use_cache=False).logits[0]
        packed = model(torch.cat([a, b], 1), position_ids=positions, use_cache=False).logits[0]
    return max(
        (packed[: len(SAMPLE_A)] - alone_a).abs().max().item(), (packed[len(SAMPLE_A) :] - alone_b).abs().max().item()
    )


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex_attention"])
def test_packed_logits_equal_separate_on_every_seed_architecture(tiny_arch, arch, backend):
    """Each accepted (architecture, attention) pair, loaded as the trainer loads it: packed = separate."""
    model_dir = tiny_arch(arch)
    config = _config(model_dir, attn_implementation=backend, sample_packing=True)
    refusals = check_against_model(config)
    if refusals:  # refused at validation: then it must be a model that has no such path
        assert backend == "flex_attention" and json.loads((model_dir / "config.json").read_text())["model_type"] in (
            NO_FLEX_ATTENTION_TYPES
        )
        return
    model, _ = _load(model_dir, attn_implementation=backend, sample_packing=True)
    difference = _packed_vs_separate(model.eval())
    print(f"packed vs separate {arch} {backend}: max |logit diff| {difference:.2e}")
    assert difference < 1e-4


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_gated_deltanet_layers_mix_packed_samples_unless_given_the_boundaries(tiny_arch, arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_arch(arch)).eval()
    leaked = _packed_vs_separate(model)
    assert leaked > 1e-2  # transformers' torch path runs the recurrence across the sample boundary
    assert isolate_packed_linear_attention(model) == 1
    assert _packed_vs_separate(model) < 1e-4


def test_gated_deltanet_boundaries_hold_under_training_with_gradient_checkpointing(tiny_arch):
    model, _ = _load(
        tiny_arch("qwen3_5"), adapter="lora", lora_target_linear=True, gradient_checkpointing=True, sample_packing=True
    )
    model.train()
    ids = torch.tensor([SAMPLE_A + SAMPLE_B])
    positions = torch.tensor([list(range(len(SAMPLE_A))) + list(range(len(SAMPLE_B)))])
    loss = model(ids, position_ids=positions, labels=ids, use_cache=False).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "linear_attn" in n and p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_flash_attention_2_is_refused_on_gemma4_for_its_512_head_dim(tiny_arch):
    config = _config(tiny_arch("gemma4"), attn_implementation="flash_attention_2")
    errors = check_against_model(config)
    assert [e.path for e in errors] == ["attn_implementation"]
    assert "512" in errors[0].message and "sdpa or flex_attention" in errors[0].message
    # through validation on a machine that has CUDA and flash-attn: still refused, for the model
    assert any("head_dim 512" in e.message for e in check_environment(config, cuda_available=True))
    for arch in ("glm4_moe_lite", "qwen3_5", "ministral"):  # head dims <= 256
        assert check_against_model(_config(tiny_arch(arch), attn_implementation="flash_attention_2")) == []


def test_flex_attention_is_refused_where_transformers_has_no_flex_path(tiny_arch):
    errors = check_against_model(_config(tiny_arch("qwen3_5_moe"), attn_implementation="flex_attention"))
    assert [e.path for e in errors] == ["attn_implementation"] and "sdpa" in errors[0].message
    assert check_against_model(_config(tiny_arch("gemma4"), attn_implementation="flex_attention")) == []


def test_refusal_list_matches_the_installed_transformers():
    import transformers

    for name in (
        "Qwen3_5ForCausalLM",
        "Qwen3_5MoeForCausalLM",
        "Gemma4ForConditionalGeneration",
        "Glm4MoeLiteForCausalLM",
        "MistralForCausalLM",
    ):
        cls = getattr(transformers, name)
        refused = cls.config_class.model_type in NO_FLEX_ATTENTION_TYPES or name.startswith("Qwen3_5")
        assert bool(cls._supports_flex_attn) == (not refused), name


def test_moe_keys_on_a_dense_model_are_refused(tiny_arch):
    errors = check_against_model(
        _config(
            tiny_arch("ministral"),
            adapter="qlora",
            quantize_moe_experts=True,
            lora_target_parameters=["experts.gate_up_proj"],
        )
    )
    assert {e.path for e in errors} == {"quantize_moe_experts", "lora_target_parameters"}
    errors = check_against_model(_config(tiny_arch("glm4_moe_lite"), adapter="lora", quantize_moe_experts=True))
    assert [e.path for e in errors] == ["quantize_moe_experts"]  # neither load_in_4bit nor load_in_8bit


def _expert_lora(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "experts" in n and "lora_" in n and "shared" not in n}


@pytest.mark.parametrize(
    "arch, targets",
    [
        ("glm4_moe_lite", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
        ("qwen3_5_moe", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
        ("gemma4_moe", ["experts.gate_up_proj", "experts.down_proj"]),
    ],
)
def test_lora_target_parameters_put_lora_on_the_experts(tiny_arch, arch, targets):
    model, _ = _load(
        tiny_arch(arch),
        adapter="lora",
        lora_target_modules=["o_proj"]
        if arch != "gemma4_moe"
        else r"model.language_model.layers.[\d]+.self_attn.o_proj",
        lora_target_parameters=targets,
    )
    lora = _expert_lora(model)
    assert lora and all(p.requires_grad for p in lora.values())
    before = {n: p.detach().clone() for n, p in lora.items()}
    _train_steps(model)
    assert any(not torch.equal(before[n], p) for n, p in lora.items())  # the experts' LoRA learned


def _train_steps(model, steps: int = 2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([SAMPLE_A + SAMPLE_B])
    for _ in range(steps):
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("arch", ["glm4_moe_lite", "qwen3_5_moe"])
def test_quantize_moe_experts_stores_experts_in_4_bit(tiny_arch, arch):
    """quantize_moe_experts under QLoRA: every routed expert stack is held as packed NF4 (uint8, half a
    byte per weight), the rest is bitsandbytes Linear4bit, and LoRA on the experts still trains."""
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(tiny_arch(arch))
    expert_weights = {n: p for n, p in full.named_parameters() if p.dim() == 3 and ".experts." in n}
    assert expert_weights
    model, _ = _load(
        tiny_arch(arch),
        adapter="qlora",
        quantize_moe_experts=True,
        lora_target_modules=["o_proj"],
        lora_target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    stored = {n: p for n, p in model.named_parameters() if ".parametrizations." in n and n.endswith(".original")}
    assert len(stored) == len(expert_weights)
    for packed in stored.values():
        assert packed.dtype == torch.uint8 and not packed.requires_grad
    # 4 bits per weight: each stack packs two weights a byte
    assert sorted(p.numel() for p in stored.values()) == sorted(p.numel() // 2 for p in expert_weights.values())
    assert not [n for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3 and p.dtype != torch.uint8]
    assert "Linear4bit" in _class_names(model)
    # dequantized experts are close to the originals (NF4 error), so the model is the same model
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts") and hasattr(m, "parametrizations")]
    restored = experts[-1].gate_up_proj
    reference = [p for n, p in expert_weights.items() if n.endswith("gate_up_proj")][-1]
    assert (restored - reference).abs().mean() < 0.2 * reference.abs().mean()
    assert _expert_lora(model)
    _train_steps(model)


@pytest.mark.parametrize("load_in", ["load_in_4bit", "load_in_8bit"])
def test_quantize_moe_experts_quantizes_each_stack_while_loading(tmp_path, monkeypatch, load_in):
    """quantize_moe_experts quantizes an expert stack as soon as it is loaded: the full-precision experts held by
    the model while it loads never exceed one stack (they were all held before being quantized: 4.5x here)."""
    import transformers
    import transformers.core_model_loading as loading

    from training.architectures import _holds_experts
    from training.modeling import load_model, load_tokenizer

    config = transformers.Glm4MoeLiteConfig(  # GLM-4.7-Flash's layout: layers 1-3 MoE, 2 stacks each
        vocab_size=700, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        first_k_dense_replace=0, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=16, n_shared_experts=1,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Glm4MoeLiteForCausalLM(config).save_pretrained(tmp_path / "glm")
    from training.demo import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path / "glm")
    stacks = {n: p.numel() * p.element_size() for n, p in transformers.Glm4MoeLiteForCausalLM(config).named_parameters()
              if p.dim() == 3}  # fmt: skip
    assert len(stacks) == 6

    held: list[int] = []
    set_param = loading.set_param_for_module

    def recording(model, *args, **kwargs):  # what the model holds after each loaded tensor
        set_param(model, *args, **kwargs)
        held.append(
            sum(
                p.numel() * p.element_size()
                for m in model.modules()
                if _holds_experts(m)
                for p in m.parameters(recurse=False)
                if p.dim() == 3 and p.is_floating_point() and p.device.type != "meta"
            )
        )

    monkeypatch.setattr(loading, "set_param_for_module", recording)
    adapter = "lora" if load_in == "load_in_8bit" else "qlora"
    keys = {"adapter": adapter, load_in: True, "lora_target_modules": ["o_proj"]}
    config = _config(tmp_path / "glm", quantize_moe_experts=True, **keys)
    model = load_model(config, load_tokenizer(config))
    assert max(held) == max(stacks.values())  # one stack at a time, quantized before the next one loads
    assert any("6 expert weight stack(s)" in n and "while loading" in n for n in model.trainyard_notes)
    assert loading.set_param_for_module is recording  # transformers is left as it was
    held.clear()
    plain = _config(tmp_path / "glm", **keys)
    load_model(plain, load_tokenizer(plain))  # without quantize_moe_experts every stack stays full
    assert max(held) == sum(stacks.values()) > 4 * max(stacks.values())


def test_quantize_moe_experts_in_8_bit_with_lora(tiny_arch):
    model, _ = _load(
        tiny_arch("glm4_moe_lite"),
        adapter="lora",
        load_in_8bit=True,
        quantize_moe_experts=True,
        lora_target_modules=["o_proj"],
    )
    stored = [p for n, p in model.named_parameters() if ".parametrizations." in n]
    assert stored and all(p.dtype == torch.uint8 for p in stored)
    assert "quantize_moe_experts: 2 expert weight stack(s) stored in 8-bit while loading" in model.trainyard_notes
    _train_steps(model)  # GLM's latent attention feeds 4-D inputs to 8-bit layers: they train on the CPU too
    with torch.no_grad():
        model.eval()(torch.tensor([SAMPLE_A]), use_cache=False)


@pytest.mark.parametrize("arch", ["gemma4", "qwen3_5", "mistral3"])
def test_lora_target_linear_adapts_only_the_language_model(tiny_arch, arch):
    import transformers
    from peft import LoraConfig, get_peft_model

    from training.architectures import lora_targets

    config = _config(tiny_arch(arch), adapter="lora", lora_target_linear=True)
    # the full multimodal model, as a vision config loads it (AutoModelForCausalLM drops Qwen3.5's vision tower)
    model = getattr(transformers, ARCHITECTURES[arch][1]).from_pretrained(tiny_arch(arch))
    model.trainyard_notes = []
    targets, _ = lora_targets(model, config)
    assert targets == language_model_linear_regex(model) and "language_model" in targets
    assert any(targets in note for note in model.trainyard_notes)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    adapted = [n for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert adapted and all("language_model" in n for n in adapted)
    vision = [n for n, m in model.named_modules() if re.search(r"vision|visual", n) and isinstance(m, torch.nn.Linear)]
    assert vision  # the model has a vision tower with linear layers, and none of them got LoRA
    # every language-model linear layer did
    lm_linear = [n for n, m in peft_model.named_modules() if n.endswith("base_layer") and "language_model" in n]
    assert len(lm_linear) == len(adapted)


def test_lora_target_linear_through_the_loader_on_gemma4(tiny_arch):
    model, _ = _load(tiny_arch("gemma4"), adapter="qlora", lora_target_linear=True)
    adapted = {n for n, p in model.named_parameters() if "lora_A" in n}
    assert adapted and not [n for n in adapted if "vision" in n]
    assert any(note.startswith("lora_target_linear: language model only") for note in model.trainyard_notes)


def test_the_config_page_can_show_the_language_model_regex_without_loading_weights(tiny_arch):
    from training.architectures import lora_target_linear_regex

    regex = lora_target_linear_regex(tiny_arch("gemma4"))
    assert regex and re.fullmatch(regex, "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(regex, "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear")
    assert lora_target_linear_regex(tiny_arch("ministral")) is None  # text-only: all linear layers


def test_flash_attention_2_is_refused_for_the_real_gemma4_config(tmp_path):
    from tests.fixtures.seed_model_configs import SEED_MODEL_CONFIGS

    for model in ("google/gemma-4-31B", "google/gemma-4-26B-A4B"):
        folder = tmp_path / model.split("/")[1]
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(SEED_MODEL_CONFIGS[model]))
        errors = check_against_model(_config(folder, attn_implementation="flash_attention_2"))
        assert [e.path for e in errors] == ["attn_implementation"] and "head_dim 512" in errors[0].message
    folder = tmp_path / "glm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SEED_MODEL_CONFIGS["zai-org/GLM-4.7-Flash"]))
    assert check_against_model(_config(folder, attn_implementation="flash_attention_2")) == []
