"""What sharding needs CUDA for, checked on a GPU host: FSDP2 (LoRA, full, QLoRA) and DeepSpeed ZeRO
2/3 on the tiny demo model, each against the unsharded run of the same global batch.

    .venv/bin/python bench/gpu_sharding_check.py            # every CUDA device of this host
    .venv/bin/python bench/gpu_sharding_check.py --only fsdp2_qlora,zero3

With 2+ GPUs each case runs as users run it (`trainyard train --processes N`: accelerate launch with
the generated config) and prints, per case: each rank's share of the parameters, its peak memory,
the largest loss difference against the unsharded run, and whether the saved folder loads on one
device and answers as the unsharded one. With one GPU the same code paths run as one process (a
1-rank mesh, ZeRO on one rank): it proves they work on CUDA, not that anything is sharded.
DeepSpeed cases need `pip install 'trainyard[deepspeed]'` and are skipped without it. Exit status 1
when a case fails, 0 when all that could run passed; without CUDA it says so and exits 0 (CI).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FSDP2 = {
    "fsdp_version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
    "state_dict_type": "FULL_STATE_DICT",
    "reshard_after_forward": True,
}
# name: (config keys, what must be installed, loss tolerance relative to the loss)
CASES = {
    "fsdp2_lora": ({"adapter": "lora", "fsdp_config": FSDP2, "bf16": False}, None, 1e-3),
    "fsdp2_full": ({"adapter": None, "fsdp_config": FSDP2, "bf16": False}, None, 1e-3),
    "fsdp2_qlora": (
        {"adapter": "qlora", "load_in_4bit": True, "fsdp_config": {**FSDP2, "cpu_ram_efficient_loading": True}},
        "bitsandbytes",
        5e-2,  # bf16 compute and 4-bit weights: close, not equal
    ),
    "zero2": ({"adapter": "lora", "deepspeed": "zero2", "bf16": False}, "deepspeed", 1e-3),
    "zero3": ({"adapter": "lora", "deepspeed": "zero3", "bf16": False}, "deepspeed", 1e-3),
    "zero3_bf16_full": ({"adapter": None, "deepspeed": "zero3_bf16", "bf16": True}, "deepspeed", 5e-2),
}


def base_config(model: Path, data: Path, micro_batch_size: int) -> dict:
    return {
        "base_model": str(model),
        "datasets": [{"path": str(data / "chat.jsonl"), "type": "chat_template"}],
        "sequence_len": 128,
        "micro_batch_size": micro_batch_size,
        "max_steps": 8,
        "learning_rate": 3e-3,
        "lr_scheduler": "constant",
        "lora_target_linear": True,
        "seed": 3,
    }


def child(config_path: str, run_dir: str) -> int:
    """One rank of a one-GPU check: the trainer without the CLI's device-count refusal."""
    from training.config import parse_config
    from training.events import JsonlEventSink, NullEventSink, process_rank
    from training.train import train

    config = parse_config(Path(config_path).read_text(), allow_trust_remote_code=True)
    sink = JsonlEventSink(Path(run_dir) / "events.jsonl") if process_rank() == 0 else NullEventSink()
    train(config, Path(run_dir), sink)
    return 0


def run(cmd: list[str], log: Path) -> bool:
    with log.open("w") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode == 0


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def losses(evts: list[dict]) -> list[float]:
    return [e["values"]["loss"] for e in evts if e["event"] == "metric" and "loss" in e["values"]]


def logits_of(model_dir: Path, folder: Path, adapter: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids.input_ids).logits.float()


def check_case(name: str, keys: dict, tolerance: float, work: Path, model: Path, data: Path, gpus: int) -> dict:
    import yaml

    from training import sharding
    from training.config import parse_config

    case_dir = work / name
    sharded, single = case_dir / "sharded", case_dir / "single"
    for d in (sharded, single):
        d.mkdir(parents=True, exist_ok=True)
    (sharded / "config.yaml").write_text(yaml.safe_dump({**base_config(model, data, 1), **keys}))
    plain = {k: v for k, v in keys.items() if k not in ("fsdp_config", "deepspeed")}
    (single / "config.yaml").write_text(yaml.safe_dump({**base_config(model, data, gpus), **plain}))
    started = time.time()
    train = [sys.executable, "-m", "training", "train"]
    if gpus >= 2:
        ok = run([*train, str(sharded / "config.yaml"), "--run-dir", str(sharded), "--processes", str(gpus)],
                 sharded / "log.txt")  # fmt: skip
    else:
        config = parse_config((sharded / "config.yaml").read_text())
        launch = sharding.multi_process_launch(config, sharded, 1, 29631)
        ok = run([sys.executable, *launch, __file__, "--child", str(sharded / "config.yaml"), str(sharded)],
                 sharded / "log.txt")  # fmt: skip
    env_single = {**os.environ, "CUDA_VISIBLE_DEVICES": (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]}
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":  # --cpu
        env_single["CUDA_VISIBLE_DEVICES"] = ""
    ok_single = subprocess.run(
        [*train, str(single / "config.yaml"), "--run-dir", str(single)],
        stdout=(single / "log.txt").open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env_single,
    ).returncode == 0  # fmt: skip
    result: dict = {"case": name, "seconds": round(time.time() - started, 1)}
    if not (ok and ok_single):
        failed = sharded if not ok else single
        result.update(ok=False, error=f"training failed; see {failed / 'log.txt'}")
        return result
    a, b = losses(events(sharded)), losses(events(single))
    worst = max((abs(x - y) for x, y in zip(a, b)), default=float("nan"))
    ranks = next((e["ranks"] for e in events(sharded) if e["event"] == "ranks"), [])
    folder = "adapter" if keys.get("adapter") else "model"
    same_answer = None
    try:
        la = logits_of(model, sharded / folder, bool(keys.get("adapter")))
        lb = logits_of(model, single / folder, bool(keys.get("adapter")))
        same_answer = float((la - lb).abs().max())
    except Exception as exc:  # the folder doesn't load: that is the finding
        result["load_error"] = f"{type(exc).__name__}: {exc}"
    result.update(
        ok=len(a) == len(b) > 0 and worst <= tolerance * max(b) and same_answer is not None,
        rank_param_share=[r.get("param_share") for r in ranks],
        rank_memory_mb=[r.get("memory_mb") for r in ranks],
        max_loss_difference=worst,
        max_logit_difference=same_answer,
        sharded_losses=a,
        single_losses=b,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated case names: " + ", ".join(CASES))
    parser.add_argument("--work", help="folder for the runs (default: a temporary one)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--cpu", type=int, metavar="N", help="check this script itself on N CPU processes (gloo; FSDP2 LoRA/full only)"
    )
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    import torch

    gpus = args.cpu or torch.cuda.device_count()
    if args.cpu:
        os.environ.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TRAINYARD_CPU_THREADS="1")
        args.only = args.only or "fsdp2_lora,fsdp2_full"
    elif gpus == 0:
        print("no CUDA device here: nothing to check (the CPU proof is tests/unit/test_sharding.py)")
        return 0
    from training.demo import build_demo_model, write_datasets

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-sharding-"))
    model = build_demo_model(work / "model")
    data = write_datasets(work / "data", rows_per_file=96)[0].parent
    names = args.only.split(",") if args.only else list(CASES)
    where = "CPU process(es)" if args.cpu else f"CUDA device(s): {torch.cuda.get_device_name(0)}"
    print(f"{gpus} {where}; runs under {work}")
    if gpus == 1:
        print("one GPU: every case runs as one process (code paths on CUDA, no sharding)")
    failed = 0
    for name in names:
        keys, needs, tolerance = CASES[name]
        if needs and importlib.util.find_spec(needs) is None:
            print(json.dumps({"case": name, "skipped": f"{needs} is not installed"}))
            continue
        result = check_case(name, keys, tolerance, work, model, data, gpus)
        failed += not result["ok"]
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
