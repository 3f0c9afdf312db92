"""The 17 seed configs (tests/fixtures/seed-configs/, copied from ../shared/seed-configs/; axolotl's examples
for Ministral, Gemma 4, GLM-4.7-Flash and Qwen3.5) run as written on tiny models of their architectures.

Only `base_model` (-> the tiny model of its architecture), dataset paths (-> small local stand-ins in the same
layout), `output_dir` and resource sizes (sequence_len, steps, accumulation) are changed. Each config is then
either trained a few steps on the CPU, saving an adapter (or model) that loads, or refused at validation; a
refusal must be *only* for limits of this machine (no CUDA, no flash-attn, no Triton, one process), and the
refused keys must be exactly the ones EXPECTED lists. To show that nothing else in a refused config is wrong,
the same config with exactly those keys removed must then train.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from training.architectures import SEED_MODELS
from training.config import ConfigInvalid, check_environment, parse_config

SEED_DIR = Path(os.environ.get("TRAINYARD_SEED_CONFIGS", Path(__file__).parents[1] / "fixtures" / "seed-configs"))

# A refusal is a limit of this machine when it says so (CUDA, a GPU, the flash-attn package, Triton, more
# processes) and does not also say Trainyard lacks the feature (then it would be refused on a GPU too).
MACHINE_LIMIT = re.compile(r"CUDA|GPU|flash_attn|flash-attn|Triton|several (devices|processes)", re.I)
PRODUCT_GAP = re.compile(
    r"\byet\b|not implemented|not part of Trainyard|not available in Trainyard|not wired|not loaded by Trainyard|"
    r"can't shard|can't be used|this offline server"
)

_PLUGIN_CCE = "plugins[0]"
_LIGER = {"liger_layer_norm", "liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_rms_norm_gated"}
_FA2 = {"attn_implementation"}  # flash_attention_2: needs the flash-attn package and CUDA

# The target partition on this machine (CPU, no flash-attn, one process): None = trains as written;
# otherwise the set of key paths refused for this machine's limits.
EXPECTED: dict[str, set[str] | None] = {
    "gemma4__26b-a4b-moe-qlora.yaml": {
        _PLUGIN_CCE,
        "plugins[1]",
        "plugins[2]",
        "use_kernels",
        "use_scattermoe",
        "experts_implementation",
        *_LIGER,
    },
    # flex_attention: torch 2.13 has no flex backward on the CPU (measured: NotImplementedError)
    "gemma4__31b-qlora-flex.yaml": {_PLUGIN_CCE, "plugins[1]", *_LIGER, "attn_implementation"},
    "gemma4__31b-qlora.yaml": {_PLUGIN_CCE, "plugins[1]", *_LIGER},
    "glm47-flash__lora.yaml": {_PLUGIN_CCE, *_FA2},
    "glm47-flash__lora_fsdp.yaml": {_PLUGIN_CCE, *_FA2, "fsdp_config"},
    "glm47-flash__qlora.yaml": {_PLUGIN_CCE, *_FA2},
    "glm47-flash__qlora_fsdp.yaml": {_PLUGIN_CCE, *_FA2, "fsdp_config"},
    "ministral__ministral-small-qlora.yaml": {_PLUGIN_CCE, *_FA2},
    "qwen3.5__122b-a10b-moe-qlora-fsdp.yaml": {_PLUGIN_CCE, *_FA2, "fsdp_config"},
    "qwen3.5__122b-a10b-moe-qlora.yaml": {_PLUGIN_CCE, *_FA2},
    "qwen3.5__27b-fft.yaml": {_PLUGIN_CCE, *_FA2},
    "qwen3.5__27b-qlora-fsdp.yaml": {_PLUGIN_CCE, *_FA2, "fsdp_config"},
    "qwen3.5__27b-qlora.yaml": {_PLUGIN_CCE, *_FA2},
    "qwen3.5__35b-a3b-moe-qlora-fsdp.yaml": {_PLUGIN_CCE, *_FA2, "fsdp_config"},
    "qwen3.5__35b-a3b-moe-qlora.yaml": {
        _PLUGIN_CCE,
        "plugins[1]",
        "plugins[2]",
        "use_kernels",
        "use_scattermoe",
        *_LIGER,
        "lora_qkv_kernel",
        "lora_o_kernel",
        *_FA2,
    },
    "qwen3.5__9b-fft-vision.yaml": {*_FA2},
    "qwen3.5__9b-lora-vision.yaml": {*_FA2},
}

# What Trainyard lacks today (refused on a GPU host too): config -> {refused key: words its reason contains}.
# Issue #10 stays open while this table is not empty; a gap that closes (or a new one) fails the test, so the
# table always says what is true.
_KERNELS = {
    "plugins[1]": "kernels plugin",  # axolotl.integrations.kernels: CUDA MoE kernels from the Hub
    "use_kernels": "downloads compiled kernels",
    "use_scattermoe": "ScatterMoE",
}
GAPS: dict[str, dict[str, str]] = {
    "gemma4__26b-a4b-moe-qlora.yaml": {**_KERNELS, "experts_implementation": "scattermoe"},
    "qwen3.5__35b-a3b-moe-qlora.yaml": {
        **_KERNELS,
        "lora_qkv_kernel": "fused LoRA Triton kernels",
        "lora_o_kernel": "fused LoRA Triton kernels",
    },
}

# Resource sizes only: small enough to train in seconds on two cores.
RESOURCES = {"sequence_len": 256, "max_steps": 2, "gradient_accumulation_steps": 1, "micro_batch_size": 2}


def _stand_in_rows(layout: str, n: int = 200) -> list[dict]:
    from training.demo import chat_rows

    rows = []
    for row in chat_rows(n, seed=7):  # 200 rows: the configs take train[:1%] up to train[:20%]
        messages = [m for m in row["messages"] if m["role"] != "system"]
        if layout == "sharegpt":  # mlabonne/FineTome-100k
            names = {"user": "human", "assistant": "gpt"}
            rows.append({"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]})
        else:  # fozziethebeat/alpaca_messages_2k_test
            rows.append({"messages": messages})
    return rows


def _llava_stand_in(path: Path, n: int = 200) -> Path:
    """HuggingFaceH4/llava-instruct-mix-vsft's layout, as its Parquet files store it: `messages` whose contents
    are lists of {type, text, index} parts (an image part points at the row's image) and an `images` column of
    {bytes, path} structs holding real (tiny, random) PNGs of a few sizes."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(7)
    rows = []
    for i, row in enumerate(_stand_in_rows("messages", n)):
        width, height = [(32, 32), (48, 24), (64, 40), (20, 28)][i % 4]
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(png, format="PNG")
        messages = []
        for k, m in enumerate(row["messages"]):
            parts = [{"index": None, "text": m["content"], "type": "text"}]
            if k == 0:
                parts.insert(i % 2, {"index": 0, "text": None, "type": "image"})
            messages.append({"content": parts, "role": m["role"]})
        rows.append({"messages": messages, "images": [{"bytes": png.getvalue(), "path": None}]})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("seed-data")
    paths = {}
    for layout in ("sharegpt", "messages"):
        path = folder / f"{layout}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _stand_in_rows(layout)))
        paths[layout] = path
    paths["llava"] = _llava_stand_in(folder / "llava.parquet")
    return paths


def seed_config(name: str, tiny_arch, stand_ins, output_dir: Path) -> dict:
    """The seed config with only base_model, dataset paths, output_dir and resource sizes changed."""
    data = yaml.safe_load((SEED_DIR / name).read_text())
    data["base_model"] = str(tiny_arch(SEED_MODELS[data["base_model"]]))
    for entry in data["datasets"]:
        layout = "sharegpt" if entry.get("field_messages") == "conversations" else "messages"
        entry["path"] = str(stand_ins["llava" if "llava" in entry["path"] else layout])
    data["output_dir"] = str(output_dir)
    data.update(RESOURCES)
    return data


def validate(data: dict) -> tuple[object | None, list]:
    """(config or None, errors) as the CLI and the web app see them on this machine."""
    try:
        config = parse_config(data)
    except ConfigInvalid as invalid:
        return None, invalid.errors
    return config, check_environment(config, devices=1)  # one process, as `trainyard train` runs it here


def without(data: dict, paths: set[str]) -> dict:
    """The config with exactly the refused key paths removed (plugins by index)."""
    data = dict(data)
    plugins = [p for i, p in enumerate(data.get("plugins") or []) if f"plugins[{i}]" not in paths]
    for path in paths:
        if not path.startswith("plugins["):
            data.pop(path.split(".")[0].split("[")[0], None)
    if "plugins" in data:
        data["plugins"] = plugins or None
    return data


def train_and_reload(config, run_dir: Path) -> Path:
    import torch

    from training.events import ListEventSink
    from training.train import train

    torch.set_num_threads(1)
    sink = ListEventSink()
    train(config, run_dir, sink)
    out = run_dir / ("adapter" if config.adapter else "model")
    from training.architectures import auto_model_class

    if config.adapter:
        from peft import PeftModel

        base = auto_model_class(config.base_model).from_pretrained(config.base_model)
        loaded = PeftModel.from_pretrained(base, out)
        assert any("lora_" in n for n, _ in loaded.named_parameters())
    else:
        auto_model_class(out).from_pretrained(out)
    return out


def test_every_seed_config_is_in_the_table():
    assert sorted(p.name for p in SEED_DIR.glob("*.yaml")) == sorted(EXPECTED)


def all_refusals(data: dict) -> tuple[object | None, list]:
    """Every refusal of the config on this machine, and the config without the refused keys.

    Validation answers in two rounds (the contract and the schema, then the machine), so the keys refused
    in one round are removed and validation is asked again, until nothing more is refused."""
    refused: list = []
    for _round in range(6):
        current = without(data, {e.path for e in refused})
        config, errors = validate(current)
        if not errors:
            return config, refused
        refused += [_in_original(e, current, data) for e in errors]
    return None, refused


def _in_original(error, current: dict, original: dict):
    """A refusal of `plugins[i]` in a config with some plugins already removed, at that plugin's index in the
    seed config as written."""
    from training.config import ConfigError

    match = re.fullmatch(r"plugins\[(\d+)\]", error.path)
    if not match:
        return error
    plugin = current["plugins"][int(match.group(1))]
    return ConfigError(f"plugins[{original['plugins'].index(plugin)}]", error.message)


def problems_of(name: str, data: dict, run_dir: Path) -> list[str]:
    """Everything that keeps the seed config `name` (already given its stand-ins) from its EXPECTED outcome:
    refusals not due to this machine, a different set of refused keys, and, as nothing else in the config
    may be wrong, a failure to train without exactly the refused keys."""
    config, errors = all_refusals(data)
    refused = {e.path for e in errors}
    gaps = GAPS.get(name, {})
    problems = [
        f"refused, not for this machine: {e}"
        for e in errors
        if e.path not in gaps and (not MACHINE_LIMIT.search(e.message) or PRODUCT_GAP.search(e.message))
    ]
    problems += [
        f"a known gap refused for another reason: {e}"
        for e in errors
        if e.path in gaps and gaps[e.path] not in e.message and not MACHINE_LIMIT.search(e.message)
    ]
    expected = (EXPECTED[name] or set()) | set(gaps)
    if refused != expected:
        problems.append(f"refused keys {sorted(refused)}, expected {sorted(expected)}")
    if config is None:
        problems.append("no valid config even without the refused keys")
    else:
        try:
            train_and_reload(config, run_dir)
        except Exception as exc:  # noqa: BLE001 - reported with the other problems
            problems.append(f"training failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_seed_config_trains_or_is_refused_only_for_this_machine(name, tiny_arch, stand_ins, tmp_path):
    """All that blocks a config is listed in one failure message."""
    data = seed_config(name, tiny_arch, stand_ins, tmp_path / "outputs")
    assert problems_of(name, data, tmp_path / "run") == []
