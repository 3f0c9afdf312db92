"""Sharded training: axolotl's FSDP/DeepSpeed keys, refusals that name the machine, and the CPU
proof that FSDP2 over two gloo processes shards the model and trains as the unsharded run does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import dump_config
from training import sharding
from training.config import ConfigInvalid, check_environment, parse_config
from training.demo import write_datasets
from training.events import ListEventSink

SEED_CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "seed-configs"  # copies of shared/seed-configs

FSDP2 = {
    "fsdp_version": 2,
    "offload_params": False,
    "cpu_ram_efficient_loading": False,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
    "state_dict_type": "FULL_STATE_DICT",
    "sharding_strategy": "FULL_SHARD",
    "reshard_after_forward": True,
    "activation_checkpointing": False,
}


def config(**extra):
    base = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "chat_template"}], "adapter": "lora"}
    return parse_config({**base, **extra})


# -- keys -----------------------------------------------------------------------------------------


def test_axolotl_fsdp_config_becomes_trainer_fsdp2_arguments():
    kwargs = sharding.trainer_kwargs(config(fsdp_config=FSDP2))
    assert kwargs["fsdp"] is True
    options = kwargs["fsdp_config"]
    assert options["version"] == 2
    assert options["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert options["reshard_after_forward"] is True and options["cpu_offload"] is False
    assert options["state_dict_type"] == "FULL_STATE_DICT"


def test_legacy_prefixed_names_mean_the_same():
    legacy = {
        "fsdp_version": 2,
        "fsdp_offload_params": True,
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "fsdp_sharding_strategy": "SHARD_GRAD_OP",
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_use_orig_params": False,  # FSDP1 only: accepted, ignored
    }
    options = sharding.trainer_kwargs(config(fsdp_config=legacy))["fsdp_config"]
    assert options["cpu_offload"] is True
    assert options["reshard_after_forward"] is False  # SHARD_GRAD_OP keeps parameters after forward
    assert options["state_dict_type"] == "SHARDED_STATE_DICT"


def test_top_level_fsdp_switches_and_version():
    c = config(fsdp=["full_shard", "auto_wrap", "offload"], fsdp_version=2)
    assert sharding.kind_of(c) == "fsdp"
    assert sharding.trainer_kwargs(c)["fsdp_config"]["cpu_offload"] is True
    assert sharding.kind_of(config()) is None and sharding.trainer_kwargs(config()) == {}
    again = parse_config(dump_config(c))  # export and import keep what runs
    assert sharding.trainer_kwargs(again) == sharding.trainer_kwargs(c)


def test_a_rank_counts_its_local_shard():
    import torch

    class Shard(torch.nn.Parameter):  # stands in for an FSDP2 DTensor parameter
        def to_local(self):
            return self.data[: self.numel() // 2]

    model = torch.nn.Module()
    model.a = Shard(torch.zeros(10))
    model.b = torch.nn.Parameter(torch.zeros(4))
    share = sharding.rank_share(model)
    assert (share["local_params"], share["total_params"]) == (5 + 4, 14)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"fsdp_config": {**FSDP2, "fsdp_version": 1}}, "FSDP1 is deprecated"),
        ({"fsdp_version": 1}, "fsdp_version 1 is not supported"),
        ({"fsdp_config": FSDP2, "deepspeed": "zero2"}, "deepspeed and fsdp both set"),
        ({"deepspeed": "zero9"}, "presets: zero1, zero2, zero3"),
        ({"fsdp_config": {**FSDP2, "sharding_strategy": "SHARD_GRAD_OP"}}, "disagree"),
        ({"fsdp": ["full_shard", "turbo"]}, "unknown option"),
        ({"fsdp_config": {**FSDP2, "fsdp_wrap_everything": True}}, "wrap_everything"),
    ],
)
def test_inconsistent_sharding_keys_are_refused_with_the_key(extra, message):
    with pytest.raises(ConfigInvalid, match=message):
        config(**extra)


def test_deepspeed_presets_by_name_or_axolotl_path():
    names = sharding.deepspeed_presets()
    for name in ("zero1", "zero2", "zero3", "zero3_bf16", "zero3_bf16_cpuoffload_all", "zero3_bf16_cpuoffload_params"):
        assert name in names
        data = json.loads(sharding.deepspeed_file(name).read_text())
        assert data["zero_optimization"]["stage"] == int(name[4])
        assert data["train_micro_batch_size_per_gpu"] == "auto"  # the Trainer fills it in
    assert sharding.deepspeed_file("deepspeed_configs/zero3_bf16.json").name == "zero3_bf16.json"
    offload = json.loads(sharding.deepspeed_file("zero3_bf16_cpuoffload_all").read_text())["zero_optimization"]
    assert offload["offload_param"]["device"] == "cpu" and offload["offload_optimizer"]["device"] == "cpu"
    assert sharding.trainer_kwargs(config(deepspeed="zero2")) == {"deepspeed": str(sharding.deepspeed_file("zero2"))}


def test_a_deepspeed_file_is_found_beside_the_config_when_the_run_starts(tmp_path):
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    c = config(deepspeed="ds.json")  # not looked for at parse time: the cwd there is not the run's
    assert sharding.trainer_kwargs(c, base_dir=tmp_path) == {"deepspeed": str(tmp_path / "ds.json")}
    with pytest.raises(ValueError, match="no preset or file 'ds.json'"):
        sharding.trainer_kwargs(c, base_dir=tmp_path / "elsewhere")


def test_accelerate_config_for_fsdp2_and_deepspeed():
    fsdp = sharding.accelerate_config(config(fsdp_config=FSDP2), 4, cpu=False)
    assert fsdp["distributed_type"] == "FSDP" and fsdp["num_processes"] == 4
    assert fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    ds = sharding.accelerate_config(config(deepspeed="zero3"), 2, cpu=False)
    assert ds["distributed_type"] == "DEEPSPEED"
    assert ds["deepspeed_config"]["deepspeed_config_file"].endswith("zero3.json")
    assert "mixed_precision" not in ds  # accelerate refuses it beside a DeepSpeed JSON
    assert sharding.accelerate_config(config(), 2, cpu=False)["distributed_type"] == "MULTI_GPU"


def test_seed_fsdp_configs_parse_their_sharding_block():
    paths = sorted(SEED_CONFIGS.glob("*fsdp*.yaml"))
    assert len(paths) == 5
    for path in paths:
        block = yaml.safe_load(path.read_text())["fsdp_config"]
        fsdp = sharding.FsdpConfig.model_validate(block)
        assert fsdp.fsdp_version == 2 and fsdp.layer_classes, path.name


# -- the machine ----------------------------------------------------------------------------------


def messages(errors):
    return [f"{e.key}: {e.message}" if hasattr(e, "key") else str(e) for e in errors]


def test_sharding_on_one_device_is_refused_with_the_device_count():
    errors = [str(e) for e in check_environment(config(fsdp_config=FSDP2), cuda_available=True, devices=1)]
    assert any("fsdp_config" in e and "this run gets 1" in e for e in errors), errors
    assert check_environment(config(fsdp_config=FSDP2), cuda_available=True, devices=2) == []
    assert check_environment(config(fsdp_config=FSDP2), cuda_available=True) == []  # count not known here


def test_deepspeed_without_package_or_cuda_is_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    errors = [str(e) for e in check_environment(config(deepspeed="zero3_bf16"), cuda_available=False, devices=2)]
    assert any("DeepSpeed is not installed" in e and "trainyard[deepspeed]" in e for e in errors), errors
    assert any("DeepSpeed needs CUDA" in e for e in errors), errors


def test_qlora_with_fsdp2_needs_cuda():
    qlora = config(adapter="qlora", load_in_4bit=True, fsdp_config=FSDP2)
    errors = [str(e) for e in check_environment(qlora, cuda_available=False, devices=2)]
    assert any("QLoRA with FSDP2" in e and "CUDA" in e for e in errors), errors
    assert not [e for e in check_environment(qlora, cuda_available=True, devices=2) if "fsdp" in str(e)]
    fp32 = config(adapter="qlora", load_in_4bit=True, bf16=False, fsdp_config=FSDP2)
    errors = check_environment(fp32, cuda_available=True, devices=2)
    assert any("stores the 4-bit weights as bf16" in str(e) for e in errors)


def test_qlora_under_fsdp2_stores_4bit_weights_in_the_model_dtype():
    import torch

    qlora = config(adapter="qlora", load_in_4bit=True, fsdp_config=FSDP2)
    assert sharding.qlora_quantization_kwargs(qlora, torch.bfloat16) == {"bnb_4bit_quant_storage": torch.bfloat16}
    assert sharding.qlora_quantization_kwargs(config(adapter="qlora", load_in_4bit=True), torch.bfloat16) == {}


# -- the CPU proof: two gloo processes ------------------------------------------------------------


def _losses(events):
    return [e["values"]["loss"] for e in events if e["event"] == "metric" and "loss" in e["values"]]


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory):
    return write_datasets(tmp_path_factory.mktemp("shard-data"), rows_per_file=48)[0].parent


def proof_config(model_dir, data_dir, **extra) -> dict:
    return {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data_dir / "chat.jsonl"), "type": "chat_template"}],
        "sequence_len": 128,
        "max_steps": 6,
        "learning_rate": 3e-3,
        "lr_scheduler": "constant",
        "adapter": "lora",
        "lora_target_linear": True,
        "seed": 3,
        **extra,
    }


def run_sharded(raw: dict, run_dir: Path, processes: int = 2, *extra: str) -> list[dict]:
    """`trainyard train --processes 2`: accelerate launch with the generated config (the launch the
    worker builds too: sharding.multi_process_launch)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "training", "train", str(run_dir / "config.yaml"), "--run-dir", str(run_dir)]
    cmd += ["--processes", str(processes), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRAINYARD_CPU_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert yaml.safe_load((run_dir / "accelerate.yaml").read_text())["distributed_type"] == "FSDP"
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_the_cli_refuses_fsdp_on_one_process(tmp_path):
    raw = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "chat_template"}], "fsdp_config": FSDP2}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "training", "train", str(tmp_path / "config.yaml"), "--run-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "this run gets 1" in done.stderr and "--processes" in done.stderr


def answer(model, tokenizer, prompt: str) -> tuple[list[int], object]:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    return out[0, ids.shape[1] :].tolist(), logits


@pytest.mark.slow
@pytest.mark.parametrize(
    "adapter, bits", [("lora", None), (None, None), ("lora", 8)], ids=["lora", "full", "lora-8bit"]
)
def test_fsdp2_on_two_cpu_processes_shards_and_trains_as_one(tiny_model_dir, shard_data, tmp_path, adapter, bits):
    """Also with 8-bit weights (load_in_8bit): FSDP2 shards bitsandbytes' int8 weights (sharding.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.train import train

    # Same global batch: 2 samples a step, as 2 ranks x 1 or 1 process x 2.
    # The full fine-tune also checkpoints activations as the seed configs do (recomputation: same numbers).
    fsdp = FSDP2 if adapter else {**FSDP2, "activation_checkpointing": True}
    quantized = {"load_in_8bit": True} if bits == 8 else {}
    sharded_raw = proof_config(
        tiny_model_dir, shard_data, adapter=adapter, micro_batch_size=1, fsdp_config=fsdp, **quantized
    )
    single_raw = proof_config(tiny_model_dir, shard_data, adapter=adapter, micro_batch_size=2, **quantized)
    events = run_sharded(sharded_raw, tmp_path / "sharded")
    single = ListEventSink()
    train(parse_config(single_raw), tmp_path / "single", single)

    ranks = next(e for e in events if e["event"] == "ranks")["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    shares = [r["local_params"] / r["total_params"] for r in ranks]
    assert all(0.4 <= s <= 0.6 for s in shares), shares  # each rank holds about half
    assert sum(r["local_params"] for r in ranks) == ranks[0]["total_params"]
    stepped = [e["values"] for e in events if e["event"] == "metric" and "loss" in e["values"]]
    assert all(v["memory_mb_rank0"] > 0 and v["memory_mb_rank1"] > 0 for v in stepped)  # the run page's per-rank memory

    sharded_curve, single_curve = _losses(events), _losses(single.events)
    assert len(sharded_curve) == len(single_curve) == 6
    worst = max(abs(a - b) for a, b in zip(sharded_curve, single_curve))
    kind = f"{adapter or 'full'}{' 8-bit' if bits else ''}"
    print(f"\nFSDP2 x2 ({kind}): rank shares {shares}, max loss difference {worst:.2e}")
    print(f"  sharded {sharded_curve}\n  single  {single_curve}")
    assert worst < 1e-3 * max(single_curve), (sharded_curve, single_curve)
    assert sharded_curve[-1] < sharded_curve[0]  # it learned something, so equal curves mean something

    # The gathered artifact is an ordinary folder that loads on one process, and answers the same.
    folder = "adapter" if adapter else "model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "<|im_start|>user\nWhat is the capital of Peru?<|im_end|>\n<|im_start|>assistant\n"
    loaded = []
    for side in ("sharded", "single"):
        path = tmp_path / side / folder
        if adapter:
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        loaded.append(answer(model.eval(), tokenizer, prompt))
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    _, base_logits = answer(base_model, tokenizer, prompt)
    (tokens_a, logits_a), (tokens_b, logits_b) = loaded
    assert not torch.allclose(logits_a, base_logits, atol=1e-4)  # the trained weights were saved, not the base
    assert torch.allclose(logits_a, logits_b, atol=2e-3), (logits_a - logits_b).abs().max()
    assert tokens_a == tokens_b


@pytest.mark.slow
@pytest.mark.parametrize("quantized", [{}, {"load_in_8bit": True}], ids=["lora", "lora-8bit"])
def test_a_sharded_run_resumes_from_its_sharded_checkpoint(tiny_model_dir, shard_data, tmp_path, quantized):
    """SHARDED_STATE_DICT checkpoints (each rank writes its part, torch.distributed.checkpoint) are
    loaded back by two ranks: the resumed run continues the uninterrupted run's loss curve exactly
    (8-bit weights too: their scales are in the checkpoint as a buffer of each layer)."""
    fsdp = {**FSDP2, "state_dict_type": "SHARDED_STATE_DICT"}
    raw = proof_config(tiny_model_dir, shard_data, micro_batch_size=1, save_steps=3, fsdp_config=fsdp, **quantized)
    whole = run_sharded(raw, tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # sharded, not one gathered file
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    resumed = run_sharded(raw, tmp_path / "resumed", 2, "--resume", str(checkpoint))

    def curve(evts):
        return {e["step"]: e["values"]["loss"] for e in evts if e["event"] == "metric" and "loss" in e["values"]}

    after = curve(resumed)
    assert sorted(after) == [4, 5, 6]  # it started from step 3, not from the beginning
    for step, loss in after.items():
        assert loss == pytest.approx(curve(whole)[step], rel=1e-5)


@pytest.mark.slow
def test_the_8bit_glm_seed_config_shards_its_int8_weights_and_experts(tiny_arch, shard_data, tmp_path):
    """glm47-flash__lora_fsdp.yaml as written (less this machine's refusals: Cut Cross Entropy, flash-attn) on two
    processes: load_in_8bit and quantize_moe_experts under FSDP2, each rank holding half of every weight."""
    from peft import PeftModel

    from training.architectures import auto_model_class

    raw = yaml.safe_load(
        (Path(__file__).parents[1] / "fixtures" / "seed-configs" / "glm47-flash__lora_fsdp.yaml").read_text()
    )
    assert raw["load_in_8bit"] and raw["quantize_moe_experts"] and raw["fsdp_config"]["fsdp_version"] == 2
    del raw["plugins"], raw["attn_implementation"]
    model_dir = tiny_arch("glm4_moe_lite")
    raw.update(
        base_model=str(model_dir), sequence_len=128, max_steps=2, gradient_accumulation_steps=1, micro_batch_size=1
    )
    raw["datasets"][0]["path"] = str(shard_data / "chat.jsonl")
    events = run_sharded(raw, tmp_path / "run")
    logs = [e["message"] for e in events if e["event"] == "log"]
    assert "quantize_moe_experts: 2 expert weight stack(s) stored in 8-bit while loading" in logs
    ranks = next(e for e in events if e["event"] == "ranks")["ranks"]
    assert [r["local_params"] * 2 for r in ranks] == [r["total_params"] for r in ranks]
    assert len(_losses(events)) == 2
    base = auto_model_class(model_dir).from_pretrained(model_dir)
    assert any(
        "lora_" in n for n, _ in PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").named_parameters()
    )


@pytest.mark.slow
def test_two_hosts_train_as_one_run_through_the_rendezvous(tiny_model_dir, shard_data, tmp_path):
    """docs/multi-host.md, step one: two launchers as machine 0 and machine 1 (one CPU process each,
    the leader at 127.0.0.1) form one FSDP2 run: each "host" holds half the parameters and the loss
    curve is the single-process one."""
    from training.train import train

    raw = proof_config(tiny_model_dir, shard_data, micro_batch_size=1, fsdp_config=FSDP2)
    run_dir = tmp_path / "two-hosts"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    config, port = parse_config(raw), _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRAINYARD_CPU_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    trainer = ["-m", "training", "train", str(run_dir / "config.yaml"), "--run-dir", str(run_dir)]
    members = []
    for rank in (0, 1):
        launch = sharding.multi_process_launch(
            config, run_dir, 2, port, machines=2, machine_rank=rank, main_ip="127.0.0.1"
        )
        log = (run_dir / f"machine{rank}.log").open("w")
        members.append(subprocess.Popen([sys.executable, *launch, *trainer], env=env, stdout=log, stderr=log))
    codes = [m.wait(timeout=600) for m in members]
    assert codes == [0, 0], (run_dir / "machine1.log").read_text()[-3000:]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    ranks = next(e for e in events if e["event"] == "ranks")["ranks"]
    assert [r["param_share"] for r in ranks] == [0.5, 0.5]
    single = ListEventSink()
    train(parse_config(proof_config(tiny_model_dir, shard_data, micro_batch_size=2)), tmp_path / "single", single)
    assert _losses(events) == pytest.approx(_losses(single.events), rel=1e-4)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp1_knobs_are_accepted_with_a_warning_that_they_do_nothing():
    parsed = config(fsdp_config={**FSDP2, "fsdp_use_orig_params": False, "sync_module_states": True})
    assert sorted(w.split(":")[0] for w in parsed.warnings) == [
        "fsdp_config.fsdp_use_orig_params",
        "fsdp_config.sync_module_states",
    ]
    assert "fsdp1_only" not in str(sharding.trainer_kwargs(parsed))
