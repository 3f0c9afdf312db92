"""The CLI's light tokenizer loader encodes exactly as AutoTokenizer does, and says why when it can't."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import DatasetSpec
from training.demo import alpaca_rows, chat_rows, completion_rows
from training.encode import Encoder
from training.formats.chat_template import named_template
from training.light_tokenizer import LightTokenizer, load_light_tokenizer

FIXTURES = Path(__file__).parents[1] / "fixtures" / "axolotl" / "tokenizers" / "templates_bpe"


def _thinking(rows):
    for r in rows:
        for m in r["messages"]:
            if m["role"] == "assistant":
                m["reasoning_content"] = "Let me think: " + m["content"][:20]
    return rows


def saved_fixture_tokenizer(folder: Path, family: str, template: str) -> Path:
    """The template fixture tokenizer with a family's special tokens and a named template, saved as a folder."""
    from transformers import PreTrainedTokenizerFast

    tokens = json.loads((FIXTURES / "families.json").read_text())[family]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(FIXTURES / "tokenizer.json"), **{k: v for k, v in tokens.items() if v}
    )
    tokenizer.chat_template = named_template(template)
    tokenizer.save_pretrained(folder)
    return folder


def assert_same_encoding(folder: Path, spec: DatasetSpec, rows: list[dict], **options):
    from transformers import AutoTokenizer

    light = load_light_tokenizer(folder)
    assert isinstance(light, LightTokenizer), light
    auto = AutoTokenizer.from_pretrained(folder)
    if auto.pad_token is None:
        auto.pad_token = auto.eos_token  # as training.modeling.load_tokenizer does
    assert light.special_tokens_map == auto.special_tokens_map
    assert (light.eos_token, light.eos_token_id, light.chat_template) == (
        auto.eos_token,
        auto.eos_token_id,
        auto.chat_template,
    )
    indexed = list(enumerate(rows))
    ours = Encoder(light, spec, **options).encode_rows(indexed)
    theirs = Encoder(auto, spec, **options).encode_rows(indexed)
    assert len(ours) == len(theirs) == len(rows)
    kept = 0
    for a, b in zip(ours, theirs):
        assert type(a) is type(b)
        if hasattr(a, "labels"):
            kept += 1
            assert (a.input_ids, a.labels, a.token_parts, a.parts) == (b.input_ids, b.labels, b.token_parts, b.parts)
            assert light.decode(a.input_ids) == auto.decode(a.input_ids)
    assert kept > len(rows) // 2  # the comparison is about encoded rows, not drops


def test_the_demo_tokenizer_encodes_every_format_as_autotokenizer_does(tiny_model_dir):
    assert_same_encoding(tiny_model_dir, DatasetSpec(path="x"), chat_rows(40, seed=5))
    assert_same_encoding(tiny_model_dir, DatasetSpec(path="x", type="alpaca"), alpaca_rows(20))
    assert_same_encoding(tiny_model_dir, DatasetSpec(path="x", type="completion"), completion_rows(20))


@pytest.mark.parametrize(
    "family, template, thinking",
    [("chatml", "qwen3", True), ("gemma4", "gemma4", False), ("llama3", "llama3", False), ("chatml", "qwen3_5", True)],
)
def test_the_template_fixture_tokenizer_encodes_named_templates_as_autotokenizer_does(
    tmp_path, family, template, thinking
):
    folder = saved_fixture_tokenizer(tmp_path / "tok", family, template)
    rows = chat_rows(30, seed=7)
    assert_same_encoding(folder, DatasetSpec(path="x"), _thinking(rows) if thinking else rows, train_on_inputs=False)
    assert_same_encoding(folder, DatasetSpec(path="x", type="alpaca"), alpaca_rows(10))


def test_folders_transformers_would_change_on_load_fall_back_with_the_reason(tmp_path, tiny_model_dir):
    import shutil

    assert load_light_tokenizer(tmp_path) == "no tokenizer.json in the folder"
    folder = shutil.copytree(tiny_model_dir, tmp_path / "tok")
    config_file = folder / "tokenizer_config.json"
    base = json.loads(config_file.read_text())
    cases = {
        "tokenizer_class": ("Qwen2Tokenizer", "tokenizer_class 'Qwen2Tokenizer'"),
        "add_bos_token": (True, "sets add_bos_token"),
        "auto_map": ({"AutoTokenizer": "x.Y"}, "sets auto_map"),
        "eos_token": ("<|not-a-token|>", "eos_token '<|not-a-token|>' is not a special token"),
    }
    for key, (value, reason) in cases.items():
        config_file.write_text(json.dumps({**base, key: value}))
        why = load_light_tokenizer(folder)
        assert isinstance(why, str) and reason in why, (key, why)
    config_file.write_text(json.dumps(base))
    assert "pad_token '<nope>'" in load_light_tokenizer(folder, {"pad_token": "<nope>"})


def test_preprocess_picks_the_light_loader_for_a_plain_folder_and_autotokenizer_otherwise(tmp_path, tiny_model_dir):
    from training.cli import _preprocess_tokenizer
    from training.config import parse_config

    config = parse_config(f"base_model: {tiny_model_dir}\ndatasets:\n  - path: x.jsonl\n")
    tokenizer, why = _preprocess_tokenizer(config)
    assert isinstance(tokenizer, LightTokenizer) and why is None
    config = parse_config(f"base_model: {tmp_path}\ndatasets:\n  - path: x.jsonl\n")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(SystemExit, match="can't load a tokenizer"):
        _preprocess_tokenizer(config)  # AutoTokenizer was asked, and its error is the one shown
