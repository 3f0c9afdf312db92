"""The config contract: every axolotl key is honoured (a test proves it), refused with a reason, or harmless."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from training import contract
from training.config import ConfigInvalid, DatasetSpec, TrainConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]
KEYS = contract.axolotl_keys()
TOP = KEYS["top"] | {k for section, names in KEYS.items() if section.startswith("plugin:") for k in names}
BASE = "base_model: tiny\ndatasets:\n  - path: d.jsonl\n"


def sets_of(key: str, *, dataset: bool = False) -> list[str]:
    if dataset:
        return [name for name, keys in (("honoured", contract.HONOURED_DATASET), ("refused", contract.REFUSED_DATASET))
                if key in keys]
    sets = (("honoured", contract.HONOURED), ("refused", contract.REFUSED), ("harmless", contract.HARMLESS))
    return [name for name, keys in sets if key in keys]


def test_the_key_list_is_axolotls_schema():
    # Spot checks that the extraction read the real schema (and the plugins' args the seed configs use).
    assert {"evals_per_epoch", "saves_per_epoch", "fsdp_config", "model_config", "liger_rope", "use_scattermoe"} <= TOP
    assert {"split", "data_files", "ds_type", "field_messages"} <= KEYS["dataset"]
    assert len(TOP) > 400


@pytest.mark.parametrize("section", ["top", "dataset"])
def test_every_axolotl_key_is_in_exactly_one_set(section):
    keys = TOP if section == "top" else KEYS["dataset"]
    misplaced = {k: sets_of(k, dataset=section == "dataset") for k in sorted(keys)}
    misplaced = {k: where for k, where in misplaced.items() if len(where) != 1}
    assert misplaced == {}, f"keys in none or several of honoured/refused/harmless: {misplaced}"


def test_every_field_of_the_config_model_is_honoured_and_nothing_else():
    # A field the pydantic model reads is honoured: it may not also be listed refused or harmless.
    fields = set(TrainConfig.model_fields)
    assert sorted(fields - set(contract.HONOURED)) == []
    assert sorted(fields & (set(contract.REFUSED) | set(contract.HARMLESS))) == []
    dataset_fields = set(DatasetSpec.model_fields)
    assert sorted(dataset_fields - set(contract.HONOURED_DATASET)) == []
    assert sorted(dataset_fields & set(contract.REFUSED_DATASET)) == []
    legacy = set(contract.LEGACY_ATTENTION)  # mapped to attn_implementation before the model sees them
    assert sorted(set(contract.HONOURED) - fields - legacy) == []
    assert sorted(set(contract.HONOURED_DATASET) - dataset_fields) == []


@cache
def _test_functions(path: Path) -> dict[str, str]:
    tree = ast.parse(path.read_text())
    source = path.read_text()
    return {
        node.name: ast.get_source_segment(source, node) or ""
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


@pytest.mark.parametrize("registry", ["top", "dataset"])
def test_every_honoured_key_names_a_test_that_reads_it(registry):
    honoured = contract.HONOURED if registry == "top" else contract.HONOURED_DATASET
    missing = []
    for key, where in honoured.items():
        file, _, function = where.partition("::")
        path = ROOT / file
        if not path.exists():
            missing.append(f"{key}: {file} does not exist")
            continue
        if function:
            source = _test_functions(path).get(function)
            if source is None:
                missing.append(f"{key}: no test {where}")
            elif key not in source and key not in _parametrize_text(path, function):
                missing.append(f"{key}: {where} does not mention it")
        elif key not in path.read_text():
            missing.append(f"{key}: {file} does not mention it")
    assert missing == []


@cache
def _parametrize_text(path: Path, function: str) -> str:
    """The decorators' text of a test (parametrize lists name the keys they cover)."""
    source = path.read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return " ".join(ast.get_source_segment(source, d) or "" for d in node.decorator_list)
    return ""


def errors_of(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigInvalid) as info:
        parse_config(text)
    return [(e.path, e.message) for e in info.value.errors]


@pytest.mark.parametrize("key", sorted(k for k in contract.REFUSED if k not in TrainConfig.model_fields))
def test_a_refused_key_set_on_is_refused_at_its_path_with_what_to_do(key):
    errors = errors_of(BASE + f'{key}: "something"\n')
    assert [p for p, _ in errors] == [key]
    message = errors[0][1]
    assert "; " in message and len(message) > 20  # why; what instead


@pytest.mark.parametrize("key", sorted(k for k in contract.REFUSED if k not in TrainConfig.model_fields))
def test_a_refused_key_left_off_is_accepted(key):
    parse_config(BASE + f"{key}: false\n")
    parse_config(BASE + f"{key}:\n")


def test_refused_dataset_keys_name_their_entry():
    errors = errors_of(BASE + "  - path: e.jsonl\n    conversation: chatml\n")
    assert errors[0][0] == "datasets[1].conversation" and "chat_template" in errors[0][1]


def test_harmless_keys_are_accepted_and_have_no_effect():
    text = BASE + "".join(f"{k}: whatever\n" for k in sorted(contract.HARMLESS) if k != "strict")
    assert parse_config(text) == parse_config(BASE)


def test_each_plugin_is_refused_with_its_own_reason_and_an_empty_list_is_fine():
    errors = errors_of(
        BASE + "plugins:\n  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin\n"
        "  - axolotl.integrations.liger.LigerPlugin\n  - axolotl.integrations.kernels.KernelsPlugin\n  - my.Plugin\n"
    )
    # Cut Cross Entropy and Liger are applied where there is CUDA: check_environment decides, not the schema.
    assert [p for p, _ in errors] == ["plugins[2]", "plugins[3]"]
    assert "kernels plugin" in errors[0][1] and "unknown plugin 'my.Plugin'" in errors[1][1]
    parse_config(BASE + "plugins: []\n")


def test_unknown_keys_fail_unless_strict_is_false_where_they_warn():
    assert errors_of(BASE + "learning_rat: 0.1\n") == [
        ("learning_rat", "unknown key (not an axolotl option Trainyard supports)")
    ]
    config = parse_config(BASE + "strict: false\nlearning_rat: 0.1\n")
    assert config.warnings == ["learning_rat: unknown key, ignored (strict: false)"]


def test_strict_false_never_swallows_a_known_key():
    errors = errors_of(BASE + "strict: false\nrl: dpo\nlora_qkv_kernel: true\n")
    assert [p for p, _ in errors] == ["rl", "lora_qkv_kernel"]
    assert parse_config(BASE + "strict: false\nlora_qkv_kernel: false\n").warnings == []


def test_every_refusal_is_reported_at_once_one_line_per_key():
    errors = errors_of(BASE + "rl: dpo\nuse_kernels: true\nlora_r: -1\n")
    assert sorted(p for p, _ in errors) == ["lora_r", "rl", "use_kernels"]
    assert all("\n" not in m for _, m in errors)


def test_the_cli_refuses_with_one_line_per_key_and_a_non_zero_exit(tmp_path):
    from training.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(BASE + "rl: dpo\nuse_kernels: true\n")
    with pytest.raises(SystemExit) as refused:
        main(["preprocess", str(path)])
    lines = str(refused.value.code).splitlines()
    assert lines[0].startswith("error: invalid config") and len(lines) == 3
    assert lines[1].startswith("  rl: preference and reinforcement training")
    assert lines[2].startswith("  use_kernels: use_kernels downloads compiled kernels")


def test_class_names_the_auto_classes_would_pick_anyway_are_accepted():
    parse_config(BASE + "model_type: LlamaForCausalLM\ntokenizer_type: LlamaTokenizerFast\nbase_model_config: tiny\n")
    errors = errors_of(BASE + "model_type: AutoModelForSequenceClassification\nbase_model_config: other\n")
    assert [p for p, _ in errors] == ["model_type", "base_model_config"]
