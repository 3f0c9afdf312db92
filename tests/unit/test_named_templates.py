"""Named chat templates: every axolotl name resolves, unknown names are refused at validation, and
rows a template can't render are dropped one by one (labels themselves: test_axolotl_parity.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import ConfigInvalid, DatasetSpec, parse_config
from training.encode import Dropped, Encoded, Encoder
from training.formats.chat_template import (
    TEMPLATE_NAMES,
    _compile,
    named_template,
    resolve_chat_template,
)
from training.formats.template_analysis import message_fields

FIXTURES = Path(__file__).parents[1] / "fixtures" / "axolotl"


def family_tokenizer(family: str):
    from transformers import PreTrainedTokenizerFast

    folder = FIXTURES / "tokenizers" / "templates_bpe"
    tokens = json.loads((folder / "families.json").read_text())[family]
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), **{k: v for k, v in tokens.items() if v}
    )


def test_every_axolotl_template_name_is_shipped_and_has_golden_cases():
    assert len(TEMPLATE_NAMES) == 36
    cases = {p.name for p in (FIXTURES / "cases").iterdir()}
    for name in TEMPLATE_NAMES:
        assert named_template(name).strip()
        assert f"tpl_{name}_defaults" in cases, name


def test_message_keys_reaching_a_template_are_the_ones_axolotl_passes():
    expected = json.loads((FIXTURES / "message_fields.json").read_text())
    for name, fields in expected.items():
        source = named_template(name)
        assert sorted(message_fields(_compile(source).environment, source)) == fields, name


@pytest.mark.parametrize(
    "yaml_text, path, hint",
    [
        ("chat_template: qwen3.5\n", "chat_template", "did you mean qwen3_5"),
        ("chat_template: gemma_4\n", "chat_template", "did you mean gemma4"),
        ("chat_template: tokenizer_default_fallback_chatlm\n", "chat_template", "tokenizer_default_fallback_chatml"),
    ],
)
def test_unknown_template_names_are_refused_at_validation_with_close_matches(yaml_text, path, hint):
    base = "base_model: x\ndatasets:\n  - path: d.jsonl\n"
    with pytest.raises(ConfigInvalid) as top:
        parse_config(base + yaml_text)
    assert top.value.errors[0].path == path and hint in top.value.errors[0].message
    with pytest.raises(ConfigInvalid) as entry:
        parse_config(base + "    " + yaml_text)
    assert entry.value.errors[0].path == "datasets[0].chat_template" and hint in entry.value.errors[0].message


def test_every_named_and_fallback_name_is_accepted():
    for name in sorted(TEMPLATE_NAMES):
        assert DatasetSpec(path="x", chat_template=name).chat_template == name
        assert resolve_chat_template(f"tokenizer_default_fallback_{name}", None, None) == named_template(name)
        assert resolve_chat_template(f"tokenizer_default_fallback_{name}", None, "mine") == "mine"


def test_chat_template_jinja_may_name_a_file_beside_the_config(tmp_path):
    (tmp_path / "my_template.jinja").write_text("{% for message in messages %}{{ message.content }}{% endfor %}")
    text = resolve_chat_template("jinja", "my_template.jinja", None, base_dir=tmp_path)
    assert text.startswith("{% for message")
    assert resolve_chat_template("jinja", str(tmp_path / "my_template.jinja"), None) == text
    assert resolve_chat_template("jinja", "{{ messages[0].content }}", None) == "{{ messages[0].content }}"
    with pytest.raises(ValueError, match="template file 'missing.jinja' not found"):
        resolve_chat_template("jinja", "missing.jinja", None, base_dir=tmp_path)


def test_a_row_the_template_refuses_is_dropped_alone():
    tokenizer = family_tokenizer("gemma")
    encoder = Encoder(tokenizer, DatasetSpec(path="x", chat_template="gemma"))
    ok = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    refused = {"messages": [{"role": "system", "content": "Be brief."}, *ok["messages"]]}
    first, second = encoder.encode_rows([(0, refused), (1, ok)])
    assert isinstance(first, Dropped) and first.reason == "unrenderable" and "System role not supported" in first.detail
    assert isinstance(second, Encoded)


def test_a_role_outside_the_roles_map_reaches_the_template_as_axolotl_does():
    tokenizer = family_tokenizer("chatml")
    row = {"messages": [{"role": "narrator", "content": "Once."}, {"role": "assistant", "content": "Upon."}]}
    (sample,) = Encoder(tokenizer, DatasetSpec(path="x", chat_template="chatml")).encode_row(row)
    assert isinstance(sample, Encoded) and "<|im_start|>narrator" in tokenizer.decode(sample.input_ids)


def test_an_empty_assistant_turn_keeps_the_row_and_says_so():
    tokenizer = family_tokenizer("chatml")
    encoder = Encoder(tokenizer, DatasetSpec(path="x", chat_template="qwen_25"))
    row = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "Still there?"},
            {"role": "assistant", "content": "Yes."},
        ]
    }
    (sample,) = encoder.encode_row(row)
    assert isinstance(sample, Encoded)
    assert tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != -100]) == (
        "Yes.<|im_end|>"
    )
    assert any("empty assistant turn" in w for w in encoder.warnings())


def test_the_encoder_reads_a_template_file_named_relative_to_the_config(tmp_path):
    (tmp_path / "tpl.j2").write_text(named_template("chatml"))
    tokenizer = family_tokenizer("chatml")
    spec = DatasetSpec(path="x", chat_template="jinja", chat_template_jinja="tpl.j2")
    encoder = Encoder(tokenizer, spec, base_dir=tmp_path)
    assert encoder.settings.chat_template == named_template("chatml")
