"""Each honoured config key changes what the trainer does: its arguments, the model, the batches or the run's output.

training/contract.py names the test proving each key; tests/unit/test_config_contract.py checks they exist.
"""

from __future__ import annotations

import math

import pytest

from training.config import ConfigInvalid, check_environment, parse_config
from training.demo import write_datasets
from training.events import ListEventSink


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_datasets(tmp_path_factory.mktemp("data"), rows_per_file=80)[0].parent


def config_of(model_dir, data_dir=None, **keys):
    path = str(data_dir / "chat.jsonl") if data_dir else "d.jsonl"
    base = {
        "base_model": str(model_dir),
        "datasets": [{"path": path, "type": "chat_template"}],
        "sequence_len": 64,
        "micro_batch_size": 4,
        "learning_rate": 1e-3,
        "seed": 1,
    }
    return parse_config({**base, **keys})


def arguments(config, tmp_path, train_rows=100, has_eval=True, bf16=False):
    from transformers import TrainingArguments

    from training.train import training_arguments

    return TrainingArguments(
        **training_arguments(config, tmp_path, train_rows=train_rows, has_eval=has_eval, bf16=bf16)
    )


def run(config, tmp_path, **kw):
    from training.train import train

    sink = ListEventSink()
    summary = train(config, tmp_path, sink, **kw)
    return summary, sink


# -- TrainingArguments ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "keys, attribute, expected",
    [
        ({"micro_batch_size": 3}, "per_device_train_batch_size", 3),
        ({"eval_batch_size": 5}, "per_device_eval_batch_size", 5),
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps", 2),
        ({"num_epochs": 2}, "num_train_epochs", 2),
        ({"max_steps": 7}, "max_steps", 7),
        ({"learning_rate": 0.001}, "learning_rate", 0.001),
        ({"warmup_steps": 5}, "warmup_steps", 5),
        ({"warmup_ratio": 0.1}, "warmup_steps", 0.1),
        ({"adam_beta1": 0.8}, "adam_beta1", 0.8),
        ({"adam_beta2": 0.95}, "adam_beta2", 0.95),
        ({"adam_epsilon": 1e-6}, "adam_epsilon", 1e-6),
        ({"weight_decay": 0.1}, "weight_decay", 0.1),
        ({"max_grad_norm": 0.5}, "max_grad_norm", 0.5),
        ({"neftune_noise_alpha": 5.0}, "neftune_noise_alpha", 5.0),
        ({"full_determinism": True}, "full_determinism", True),
        ({"seed": 7}, "seed", 7),
        ({"eval_steps": 3}, "eval_steps", 3),
        ({"save_steps": 4}, "save_steps", 4),
        ({"save_steps": 4}, "save_strategy", "steps"),
        ({"eval_strategy": "epoch"}, "eval_strategy", "epoch"),
        ({"save_strategy": "epoch"}, "save_strategy", "epoch"),
        ({"save_only_model": True}, "save_only_model", True),
        ({"group_by_length": True}, "train_sampling_strategy", "group_by_length"),
        ({"dataloader_drop_last": True}, "dataloader_drop_last", True),
    ],
)
def test_training_arguments_follow_the_config(tmp_path, keys, attribute, expected):
    args = arguments(config_of("m", **keys), tmp_path)
    value = getattr(args, attribute)
    assert getattr(value, "value", value) == expected


def test_per_epoch_counts_become_steps_as_in_axolotl(tmp_path):
    # 100 rows, batch 4: 25 steps an epoch, 50 in 2 epochs. Axolotl sets eval_steps to the fraction
    # 1 / (evals_per_epoch * num_epochs) of the run and the Trainer rounds it up: ceil(50 / 8) = 7.
    config = config_of("m", num_epochs=2, evals_per_epoch=4, saves_per_epoch=1, val_set_size=0.1)
    args = arguments(config, tmp_path, train_rows=100)
    assert (args.eval_strategy.value, args.eval_steps) == ("steps", 7)
    assert (args.save_strategy.value, args.save_steps) == ("steps", 25)
    # Gradient accumulation counts optimizer steps; max_steps is the run's length when set.
    args = arguments(config_of("m", gradient_accumulation_steps=5, saves_per_epoch=2), tmp_path, train_rows=100)
    assert args.save_steps == math.ceil(5 / 2)
    assert arguments(config_of("m", max_steps=12, saves_per_epoch=3), tmp_path).save_steps == 4
    # No evaluation set: no evaluation, and validation says so instead of staying silent.
    config = config_of("m", evals_per_epoch=4)
    assert arguments(config, tmp_path, has_eval=False).eval_strategy.value == "no"
    assert config.warnings == ["evals_per_epoch: no evaluation set (val_set_size is 0), so no evaluation runs"]
    with pytest.raises(ConfigInvalid, match="evals_per_epoch or eval_steps"):
        config_of("m", evals_per_epoch=2, eval_steps=3)


def test_checkpoints_are_written_and_capped_and_resume(tiny_model_dir, demo_data, tmp_path):
    # saves_per_epoch 2 over a 4-step run: checkpoints at steps 2 and 4; save_total_limit 1 keeps the last.
    config = config_of(tiny_model_dir, demo_data, max_steps=4, saves_per_epoch=2, save_total_limit=1, adapter="lora",
                       lora_target_linear=True)
    _, sink = run(config, tmp_path)
    saved = [e["step"] for e in sink.events if e["event"] == "artifact" and e["kind"] == "checkpoint"]
    assert saved == [2, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-4"]
    longer = config.model_copy(update={"max_steps": 6})
    summary, _ = run(longer, tmp_path, resume_from=tmp_path / "checkpoints" / "checkpoint-4")
    assert summary["steps"] == 6


def test_early_stopping_patience_stops_a_run_whose_eval_loss_rises(tiny_model_dir, demo_data, tmp_path):
    # A learning rate too small to move fp32 weights: eval_loss never improves, so patience 1 stops the run
    # at the second evaluation.
    config = config_of(tiny_model_dir, demo_data, max_steps=20, learning_rate=1e-30, val_set_size=0.1, eval_steps=1,
                       early_stopping_patience=1, adapter="lora", lora_target_linear=True)
    summary, _ = run(config, tmp_path)
    assert summary["steps"] == 2
    with pytest.raises(ConfigInvalid, match="early_stopping_patience needs an evaluation set"):
        config_of("m", early_stopping_patience=2)


def test_loss_watchdog_stops_a_diverging_run(tiny_model_dir, demo_data, tmp_path):
    config = config_of(tiny_model_dir, demo_data, max_steps=20, loss_watchdog_threshold=0.01, loss_watchdog_patience=2,
                       adapter="lora", lora_target_linear=True)
    summary, sink = run(config, tmp_path)
    assert summary["steps"] == 2
    assert any("loss watchdog" in e.get("message", "") for e in sink.events)


# -- schedulers and optimizers -------------------------------------------------------------------------------
def _learning_rates(config, tmp_path, steps=10):
    import torch
    from transformers import get_scheduler

    args = arguments(config.model_copy(update={"max_steps": steps}), tmp_path)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps), num_training_steps=steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates + [scheduler.get_last_lr()[0]]


def test_schedulers_follow_axolotl(tmp_path):
    # cosine_min_lr_ratio (axolotl): cosine that ends at ratio * learning_rate instead of 0.
    rates = _learning_rates(config_of("m", lr_scheduler="cosine", cosine_min_lr_ratio=0.1), tmp_path)
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert _learning_rates(config_of("m", lr_scheduler="cosine"), tmp_path)[-1] == pytest.approx(0)
    # cosine_with_min_lr and warmup_stable_decay take their options from lr_scheduler_kwargs.
    rates = _learning_rates(
        config_of("m", lr_scheduler="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 5e-4}), tmp_path
    )
    assert rates[-1] == pytest.approx(5e-4)
    rates = _learning_rates(
        config_of("m", lr_scheduler="warmup_stable_decay", lr_scheduler_kwargs={"num_decay_steps": 2}), tmp_path
    )
    assert rates[2:8] == pytest.approx([1e-3] * 6) and rates[-1] < 1e-4
    # Missing or unknown options are refused at validation, not when the scheduler is built.
    for keys, words in [
        ({"lr_scheduler": "warmup_stable_decay"}, "needs lr_scheduler_kwargs num_decay_steps"),
        ({"lr_scheduler": "cosine_with_min_lr"}, "needs lr_scheduler_kwargs min_lr or min_lr_rate"),
        ({"lr_scheduler_kwargs": {"num_cycles": 0.5, "nope": 1}}, "nope not taken by the cosine scheduler"),
        ({"lr_scheduler": "linear", "cosine_min_lr_ratio": 0.1}, "cosine_min_lr_ratio applies to lr_scheduler: cosine"),
    ]:
        with pytest.raises(ConfigInvalid, match=words):
            config_of("m", **keys)


@pytest.mark.parametrize(
    "optimizer, state", [("adamw_torch_8bit", "OptimState8bit"), ("adamw_torch_4bit", "OptimState4bit")]
)
def test_torchao_low_bit_optimizers_step_on_the_cpu(tmp_path, optimizer, state):
    import torch
    from transformers import Trainer

    config = config_of("m", optimizer=optimizer)
    assert check_environment(config, cuda_available=False) == []
    args = arguments(config, tmp_path)
    layer = torch.nn.Linear(256, 256)  # >= 4096 values: its optimizer state is stored low-bit
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, layer)
    assert cls.__module__.startswith("torchao.optim")
    opt = cls(layer.parameters(), **kwargs)
    before = layer.weight.detach().clone()
    layer(torch.randn(4, 256)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(layer.weight, before)
    assert type(opt.state[layer.weight]["exp_avg"]).__name__ == state


def test_tf32_sets_the_cuda_matmul_precision_and_is_a_no_op_on_the_cpu(tmp_path, monkeypatch):
    import torch

    from training.train import training_arguments

    # On a CUDA machine the Trainer gets tf32 as written (it sets torch's matmul precision; left unset it
    # would turn tf32 on by itself on Ampere). On the CPU tf32 has no meaning: nothing is set.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for value in (True, False):
        kwargs = training_arguments(config_of("m", tf32=value), tmp_path, train_rows=10, has_eval=False, bf16=False)
        assert kwargs["tf32"] is value
    # A GPU older than Ampere has no tf32: refused at validation (the Trainer would raise after the model loads).
    from training import config as config_module

    monkeypatch.setattr(config_module, "_cuda_has_bf16", lambda: False)
    assert [p.path for p in check_environment(config_of("m", tf32=True))] == ["tf32"]
    assert check_environment(config_of("m", tf32=False)) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert arguments(config_of("m", tf32=True), tmp_path).tf32 is None
    assert check_environment(config_of("m", tf32=True)) == []


def test_torch_compile_reaches_the_training_arguments(tmp_path):
    # Measured here: the tiny model trains compiled on the CPU (3 LoRA steps in ~70 s, nearly all compiling),
    # too slow for the unit tests, so the proof is the Trainer's argument.
    assert arguments(config_of("m", torch_compile=True), tmp_path).torch_compile is True
    assert arguments(config_of("m"), tmp_path).torch_compile is False


# -- the model -----------------------------------------------------------------------------------------------
def _model(tiny_model_dir, **keys):
    from training.modeling import load_model, load_tokenizer

    config = config_of(tiny_model_dir, **keys)
    return load_model(config, load_tokenizer(config)), config


def test_lora_keys_shape_the_adapter(tiny_model_dir):
    model, _ = _model(
        tiny_model_dir, adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_target_modules=["q_proj"],
        lora_modules_to_save=["norm"], peft_use_dora=True, peft_use_rslora=True,
    )
    peft = model.peft_config["default"]
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, peft.target_modules) == (4, 8, 0.1, {"q_proj"})
    assert peft.use_dora and peft.use_rslora and peft.modules_to_save == ["norm"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA
    assert any("modules_to_save" in n and "norm" in n for n in names)
    assert not any("lora_A" in n for n in names if "q_proj" not in n)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    problems = check_environment(config_of(tiny_model_dir, adapter="lora", lora_modules_to_save=["norm", "nope"]))
    assert [(p.path, p.message.split(" is")[0]) for p in problems] == [("lora_modules_to_save", "'nope'")]
    for targets in (["qkv_proj"], r".*\.qkv"):  # names and a regex that match nothing: refused up front
        (problem,) = check_environment(config_of(tiny_model_dir, adapter="lora", lora_target_modules=targets))
        assert problem.path == "lora_target_modules"
    # Some names exist: those are adapted (as PEFT and axolotl do), the others are named in a warning.
    partial = config_of(tiny_model_dir, adapter="lora", lora_target_modules=["q_proj", "qkv_proj"])
    assert check_environment(partial) == []
    assert any(w.startswith("lora_target_modules: qkv_proj match no module") for w in partial.warnings)
    assert check_environment(config_of(tiny_model_dir, adapter="lora", lora_target_modules=r".*\.q_proj")) == []
    model, _ = _model(tiny_model_dir, adapter="lora", lora_target_linear=True)
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= adapted


def test_unfrozen_parameters_leave_only_matching_weights_trainable(tiny_model_dir):
    model, _ = _model(tiny_model_dir, unfrozen_parameters=[r"model.layers.1.mlp.*", "model.norm.weight"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.mlp.", "model.norm.weight")) for n in trainable)
    assert "model.layers.1.mlp.down_proj.weight" in trainable
    # A pattern that matches nothing is refused at validation, from the model's config (no weights loaded).
    problems = check_environment(config_of(tiny_model_dir, unfrozen_parameters=["model.layers.1.mlp", "nothing"]))
    assert [(p.path, p.message.split(" matches")[0]) for p in problems] == [("unfrozen_parameters", "'nothing'")]
    with pytest.raises(ConfigInvalid, match="index range"):
        config_of("m", unfrozen_parameters=["model.embed_tokens.weight[:100]"])
    with pytest.raises(ConfigInvalid, match="full fine-tune"):
        config_of("m", unfrozen_parameters=["lm_head"], adapter="lora")


def test_bnb_config_kwargs_reach_the_quantization_config(tiny_model_dir):
    import torch

    from training.modeling import quantization_config

    config = config_of("m", adapter="qlora", bnb_config_kwargs={"bnb_4bit_quant_type": "fp4",
                                                                "bnb_4bit_use_double_quant": False})
    assert config.load_in_4bit  # adapter: qlora implies load_in_4bit
    q = quantization_config(config, torch.float32)
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "fp4", False)
    q = quantization_config(config_of("m", adapter="qlora"), torch.float32)
    assert (q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == ("nf4", True)
    q = quantization_config(config_of("m", adapter="lora", load_in_8bit=True,
                                      bnb_config_kwargs={"llm_int8_threshold": 5.0}), torch.float32)
    assert q.load_in_8bit and q.llm_int8_threshold == 5.0
    model, _ = _model(tiny_model_dir, adapter="qlora", bnb_config_kwargs={"bnb_4bit_quant_type": "fp4"})
    assert model.base_model.model.config.quantization_config.bnb_4bit_quant_type == "fp4"
    with pytest.raises(ConfigInvalid, match="bnb_config_kwargs nope unknown"):
        config_of("m", adapter="qlora", bnb_config_kwargs={"nope": 1})
    with pytest.raises(ConfigInvalid, match="applies to quantized loading"):
        config_of("m", bnb_config_kwargs={"bnb_4bit_quant_type": "fp4"})


def test_gradient_checkpointing_kwargs_are_passed_through(tiny_model_dir, monkeypatch):
    from transformers import PreTrainedModel

    seen = []
    original = PreTrainedModel.activation_checkpointing_enable

    def spy(self, activation_checkpointing_kwargs=None, **kwargs):
        seen.append(activation_checkpointing_kwargs)
        return original(self, activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable", spy)
    model, _ = _model(tiny_model_dir, gradient_checkpointing=True)
    _model(tiny_model_dir, gradient_checkpointing=True,
           gradient_checkpointing_kwargs={"use_reentrant": True, "preserve_rng_state": False})
    assert seen == [{"use_reentrant": False}, {"use_reentrant": True, "preserve_rng_state": False}]
    assert model.is_activation_checkpointing
    with pytest.raises(ConfigInvalid, match="gradient_checkpointing_kwargs nope unknown"):
        config_of("m", gradient_checkpointing_kwargs={"nope": 1})


def test_activation_offloading_saves_activations_through_the_offload_hooks(monkeypatch):
    import torch
    from transformers import Trainer

    from training.train import trainer_class

    monkeypatch.setattr(Trainer, "compute_loss", lambda self, model, inputs, *a, **k: model(**inputs)["loss"])

    hooks_during_forward = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

        def forward(self, x, labels=None):
            hooks_during_forward.append(torch._C._autograd._top_saved_tensors_default_hooks(False))
            return {"loss": (x * self.weight).sum()}

    for offloading in (True, False):
        cls = trainer_class(config_of("m", activation_offloading=offloading))
        cls.compute_loss(object.__new__(cls), Probe(), {"x": torch.ones(3)})
    assert hooks_during_forward[0] is not None and hooks_during_forward[1] is None


def test_experts_implementation_reaches_the_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    from training.modeling import load_model

    torch.manual_seed(0)
    tiny = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(tiny).save_pretrained(tmp_path / "moe")

    class Tokenizer:
        def __len__(self):
            return 64

    for name in ("eager", "batched_mm", "grouped_mm"):
        model = load_model(config_of(tmp_path / "moe", experts_implementation=name), Tokenizer())
        assert model.config._experts_implementation == name
        model(torch.tensor([[1, 2, 3]]))  # runs on the CPU
    assert AutoModelForCausalLM  # imported for the loader's registry
    with pytest.raises(ConfigInvalid, match="scattermoe is axolotl's own Triton kernel"):
        config_of("m", experts_implementation="scattermoe")
    # transformers' own registry: the CPU-capable ones are Trainyard's choices; the rest need Hopper GPUs and Hub
    # kernels (sonicmoe, deepgemm), and scattermoe is not there at all (axolotl's kernels plugin registers it)
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert set(ALL_EXPERTS_FUNCTIONS) == {"batched_mm", "grouped_mm", "sonicmoe", "deepgemm"}
    with pytest.raises(ConfigInvalid, match="sonicmoe and deepgemm need Hopper GPUs"):
        config_of("m", experts_implementation="sonicmoe")


def test_attention_keys_pick_the_backend():
    assert config_of("m", attn_implementation="eager").attn_implementation == "eager"
    assert config_of("m", flash_attention=True).attn_implementation == "flash_attention_2"
    assert config_of("m", sdp_attention=True).attn_implementation == "sdpa"
    assert config_of("m", eager_attention=True).attn_implementation == "eager"
    assert config_of("m", flex_attention=True).attn_implementation == "flex_attention"
    assert config_of("m", flash_attention=True, attn_implementation="sdpa").attn_implementation == "sdpa"


def test_special_tokens_and_eot_tokens_reach_the_tokenizer(tiny_model_dir):
    from training.encode import Encoder
    from training.modeling import load_tokenizer

    config = config_of(tiny_model_dir, special_tokens={"pad_token": "<|pad|>"}, eot_tokens=["<|im_end|>"])
    tokenizer = load_tokenizer(config)
    assert tokenizer.pad_token == "<|pad|>"
    encoder = Encoder.from_config(tokenizer, config, 0)
    assert "<|im_end|>" in str(vars(encoder))


def test_data_keys_shape_the_batches():
    from training.train import Collator

    features = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    # sequence_len with pad_to_sequence_len: every batch is as wide as sequence_len; without, the longest row.
    assert Collator(0, pad_to=config_of("m", sequence_len=16, pad_to_sequence_len=True).sequence_len)(features)[
        "input_ids"
    ].shape == (2, 16)
    assert Collator(0)(features)["input_ids"].shape == (2, 3)


def test_bf16_true_trains_in_bf16_on_the_cpu(tiny_model_dir, demo_data, tmp_path):
    import torch
    from safetensors.torch import load_file

    from training.modeling import pick_dtype

    config = config_of(tiny_model_dir, demo_data, bf16=True, max_steps=2)  # a full fine-tune: every weight
    assert check_environment(config, cuda_available=False) == []
    assert pick_dtype(config) == torch.bfloat16
    assert pick_dtype(config_of("m", bf16="auto")) == torch.float32  # auto: fp32 on the CPU (exact)
    assert arguments(config, tmp_path, bf16=True).bf16 is True
    summary, _ = run(config, tmp_path)
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    weights = load_file(tmp_path / "model" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    # A CUDA GPU without bf16 (T4, V100) is the only machine that refuses it.
    assert check_environment(config, cuda_available=True) == []


def test_profiler_steps_keep_a_trace_as_a_run_artifact(tiny_model_dir, demo_data, tmp_path):
    import json

    config = config_of(tiny_model_dir, demo_data, max_steps=3, profiler_steps=1, profiler_steps_start=1,
                       adapter="lora", lora_target_linear=True)
    run(config, tmp_path)
    trace = json.loads((tmp_path / "profiler_trace.json").read_text())
    assert trace["traceEvents"]


# -- data and the model named by the config -------------------------------------------------------------------
@pytest.mark.parametrize(
    "entry, row, words",
    [
        (
            {"type": "chat_template", "message_field_role": "speaker", "message_field_content": "text",
             "field_system": "sys"},
            {
                "sys": "Be brief.",
                "messages": [{"speaker": "user", "text": "Hi"}, {"speaker": "assistant", "text": "Yo"}],
            },
            ["Be brief.", "Hi", "Yo"],
        ),
        ({"type": "completion", "field": "body"}, {"body": "Once upon a time"}, ["Once upon a time"]),
        (
            {"type": "alpaca", "field_instruction": "q", "field_input": "ctx", "field_output": "a"},
            {"q": "Add.", "ctx": "2 and 3", "a": "5"},
            ["Add.", "2 and 3", "5"],
        ),
        (
            {"type": "input_output", "field_segments": "parts"},
            {"parts": [{"label": False, "text": "Q: hi "}, {"label": True, "text": "A: yo"}]},
            ["Q: hi", "A: yo"],
        ),
    ],
)
def test_dataset_field_names_are_read(tokenizer, entry, row, words):
    from training.config import DatasetSpec
    from training.encode import Encoded, Encoder

    (sample,) = Encoder(tokenizer, DatasetSpec(path="x", **entry)).encode_row(row)
    assert isinstance(sample, Encoded) and sample.trained_tokens > 0
    text = tokenizer.decode(sample.input_ids)
    assert all(w in text for w in words), text


def test_base_model_and_datasets_are_what_trains(tiny_model_dir, demo_data, tmp_path):
    from training.modeling import load_tokenizer
    from training.train import prepare_data

    model, config = _model(tiny_model_dir)
    assert model.name_or_path == str(tiny_model_dir.resolve())  # base_model
    one = config_of(tiny_model_dir, datasets=[{"path": str(demo_data / "chat.jsonl")}])
    two = config_of(tiny_model_dir, datasets=[{"path": str(demo_data / "chat.jsonl")}] * 2)
    tokenizer = load_tokenizer(one)
    assert len(prepare_data(two, tokenizer).train) == 2 * len(prepare_data(one, tokenizer).train)


def test_fp16_is_refused_without_cuda_and_reaches_the_trainer_with_it(tmp_path):
    config = config_of("m", fp16=True)
    assert [e.path for e in check_environment(config, cuda_available=False)] == ["fp16"]
    assert check_environment(config, cuda_available=True) == []
    from training.train import training_arguments

    assert training_arguments(config, tmp_path, train_rows=10, has_eval=False, bf16=False)["fp16"] is True


def test_an_optimizer_whose_package_is_missing_is_refused_before_the_model_loads():
    problems = check_environment(config_of("m", optimizer="schedule_free_adamw"), cuda_available=False)
    assert [p.path for p in problems] == ["optimizer"] and "schedulefree" in problems[0].message
    assert check_environment(config_of("m", optimizer="adamw_bnb_8bit"), cuda_available=False) == []


def test_liger_is_refused_without_cuda_and_applied_as_the_flags_say_with_it(tiny_model_dir, monkeypatch):
    import importlib.util
    import sys
    import types

    from training.modeling import load_model, load_tokenizer

    plugin = ["axolotl.integrations.liger.LigerPlugin"]
    keys = dict(plugins=plugin, liger_rope=True, liger_rms_norm=True, liger_glu_activation=True)
    config = config_of(tiny_model_dir, **keys)
    problems = check_environment(config, cuda_available=False)  # measured: Triton has no CPU driver
    assert [p.path for p in problems] == ["plugins[0]", "liger_rope", "liger_rms_norm", "liger_glu_activation"]
    assert all("CUDA GPU" in p.message for p in problems)
    with pytest.raises(ConfigInvalid, match="liger_rope: Liger flags need plugins"):
        config_of("m", liger_rope=True)
    assert config_of("m", plugins=plugin, liger_swiglu=True).liger_glu_activation  # axolotl's old name

    # With CUDA: liger-kernel's own apply function for the model type gets every kernel it takes, each off
    # unless its flag is on (its defaults would turn some on). A stand-in records the call (no GPU here).
    calls = []

    def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
                                    swiglu=True, model=None):
        calls.append(dict(rope=rope, cross_entropy=cross_entropy, rms_norm=rms_norm, swiglu=swiglu,
                          fused_linear_cross_entropy=fused_linear_cross_entropy, model=type(model).__name__))

    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply_liger_kernel_to_llama}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "liger_kernel" else real_find_spec(n, *a)
    )
    assert check_environment(config, cuda_available=True) == []
    load_model(config, load_tokenizer(config))
    assert calls == [dict(rope=True, cross_entropy=False, rms_norm=True, swiglu=True, fused_linear_cross_entropy=False,
                          model="LlamaForCausalLM")]
    # A flag the model's patch has no kernel for is refused at validation, never skipped.
    for flag in ("liger_layer_norm", "liger_rms_norm_gated"):
        (problem,) = check_environment(config_of(tiny_model_dir, plugins=plugin, **{flag: True}), cuda_available=True)
        assert flag in problem.message and "has no such kernel" in problem.message
    for flag in ("liger_cross_entropy", "liger_fused_linear_cross_entropy"):
        assert check_environment(config_of(tiny_model_dir, plugins=plugin, **{flag: True}), cuda_available=True) == []


def test_cut_cross_entropy_is_refused_without_cuda_and_gives_the_same_loss_with_it(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    import sys
    import types

    import torch
    from transformers import Trainer, TrainingArguments

    from training.modeling import load_model, load_tokenizer
    from training.train import trainer_class

    plugin = ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"]
    config = config_of(tiny_model_dir, plugins=plugin)
    (problem,) = check_environment(config, cuda_available=False)
    assert problem.path == "plugins[0]" and "needs a CUDA GPU" in problem.message
    assert check_environment(config_of(tiny_model_dir, plugins=plugin, cut_cross_entropy=False),
                             cuda_available=False) == []
    assert trainer_class(config_of(tiny_model_dir, plugins=plugin, cut_cross_entropy=False)) is Trainer

    # The kernel itself is Triton (no GPU here); a reference implementation of its contract stands in, so
    # what is proven is the wiring: final hidden states x output embedding, shifted, reduced as the Trainer does.
    seen = []

    def linear_cross_entropy(e, c, targets, softcap=None, shift=False, reduction="mean"):
        seen.append(e.shape)
        logits = e @ c.T
        if shift:
            logits, targets = logits[:, :-1], targets[:, 1:]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)

    stand_in = types.SimpleNamespace(linear_cross_entropy=linear_cross_entropy)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", stand_in)
    model = load_model(config, load_tokenizer(config))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]]),
             "labels": torch.tensor([[-100, 6, 7, 8, 9], [-100, -100, 7, 6, 5]])}
    standard = Trainer(model=model, args=args).compute_loss(model, dict(batch))
    cce = trainer_class(config)(model=model, args=args)
    assert cce.compute_loss(model, dict(batch)).item() == pytest.approx(standard.item(), rel=1e-5)
    summed = cce.compute_loss(model, dict(batch), num_items_in_batch=7)
    assert summed.item() == pytest.approx(standard.item(), rel=1e-5)  # 7 trained tokens in the batch
    assert seen[0] == (2, 5, model.config.hidden_size)
    # Under a LoRA adapter (PEFT wraps the model) the same.
    lora = config_of(tiny_model_dir, plugins=plugin, adapter="lora", lora_target_linear=True)
    model = load_model(lora, load_tokenizer(lora))
    standard = Trainer(model=model, args=args).compute_loss(model, dict(batch))
    loss = trainer_class(lora)(model=model, args=args).compute_loss(model, dict(batch))
    assert loss.item() == pytest.approx(standard.item(), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


THOUGHT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message.thought %}[T:{{ message.thought }}]{% endif %}{{ message['content'] }}<|im_end|>\n{% endfor %}"
)


def test_reasoning_trace_keys_reach_the_template(tokenizer):
    from training.config import DatasetSpec
    from training.encode import Encoder

    def text(row, **keys):
        spec = DatasetSpec(path="x", chat_template_jinja=THOUGHT_TEMPLATE, template_thinking_key="thought", **keys)
        (sample,) = Encoder(tokenizer, spec).encode_row(row)
        return tokenizer.decode(sample.input_ids)

    user = {"role": "user", "content": "Hi"}
    # field_thinking: the row's key for the trace; template_thinking_key: the key the template reads.
    row = {"messages": [user, {"role": "assistant", "content": "Yo", "trace": "ponder"}]}
    assert "[T:ponder]Yo" in text(row, field_thinking="trace")
    assert "[T:" not in text(row, field_thinking="reasoning_content")
    # split_thinking: an inline <think> block of an assistant turn becomes the trace.
    inline = {"messages": [user, {"role": "assistant", "content": "<think>ponder</think>Yo"}]}
    assert "[T:ponder]Yo" in text(inline, split_thinking=True)
    assert "<think>ponder</think>Yo" in text(inline)


def test_cut_cross_entropy_and_liger_cross_entropy_are_not_both_asked_for():
    plugins = ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin", "axolotl.integrations.liger.LigerPlugin"]
    with pytest.raises(ConfigInvalid, match="both compute the loss"):
        config_of("m", plugins=plugins, liger_fused_linear_cross_entropy=True)
    assert config_of("m", plugins=plugins, liger_rope=True).liger_rope
