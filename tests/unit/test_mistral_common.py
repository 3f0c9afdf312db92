"""tokenizer_use_mistral_common: conversations are encoded by mistral-common from the model's tekken.json, and
labelled as axolotl 0.21 labels them (tests/fixtures/axolotl/mistral_common/ holds axolotl's own output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import ConfigInvalid, DatasetSpec, parse_config
from training.encode import IGNORE_INDEX, Dropped, Encoded, Encoder

FIXTURE = Path(__file__).parents[1] / "fixtures" / "axolotl" / "mistral_common"
# Rows where Trainyard finds the turns and axolotl's token fallback doesn't (training/mistral_chat.py says why).
SYSTEM_MULTI_TURN = (
    "a system prompt in a multi-turn row: mistral-common v3 moves it to the last user turn, so axolotl's prefix "
    "encodings put it elsewhere and its labels land a few tokens off"
)
DEVIATIONS = {
    1: SYSTEM_MULTI_TURN,
    3: "an assistant content starting like axolotl's placeholder ([[dummy): axolotl's one placeholder misses its start",
    **{4 + row: SYSTEM_MULTI_TURN for row in (36, 41, 43, 52, 55, 58)},  # demo.chat_rows(60, seed=7) after 4 rows
}


def _backend(path: Path):
    from training.modeling import load_mistral_common_tokenizer

    return load_mistral_common_tokenizer(path)


@pytest.fixture(scope="module")
def fixture_tokenizer():
    return _backend(FIXTURE / "tokenizer")


def _rows() -> list[dict]:
    return [json.loads(line) for line in (FIXTURE / "data.jsonl").read_text().splitlines()]


def _assistant_tokens(tokenizer, row: dict, eos_policy: str) -> list[int]:
    """What should train, from mistral-common's own pieces: each assistant content tokenized alone (as
    mistral-common does), with the eos after it as train_on_eos says."""
    tekken = tokenizer.tokenizer.instruct_tokenizer.tokenizer
    assistants = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    out = []
    for k, content in enumerate(assistants):
        out += tekken.encode(content, bos=False, eos=False)
        if eos_policy == "turn" or (eos_policy == "last" and k == len(assistants) - 1):
            out.append(tokenizer.eos_token_id)
    return out


@pytest.mark.parametrize("eos", ["turn", "last", "none"])
def test_labels_match_axolotl_with_mistral_common(fixture_tokenizer, eos):
    encoder = Encoder(fixture_tokenizer, DatasetSpec(path="data.jsonl", train_on_eos=eos), sequence_len=2048)
    rows = _rows()
    ours = encoder.encode_rows(list(enumerate(rows)))
    expected = [json.loads(line) for line in (FIXTURE / f"expected_{eos}.jsonl").read_text().splitlines()]
    assert len(ours) == len(expected) == len(rows)
    for got, exp in zip(ours, expected):
        assert isinstance(got, Encoded), got
        assert got.input_ids == exp["input_ids"], got.row  # mistral-common's ids, whoever asks
        trained = [t for t, label in zip(got.input_ids, got.labels) if label != IGNORE_INDEX]
        assert trained == _assistant_tokens(fixture_tokenizer, rows[got.row], eos), got.row
        if got.row in DEVIATIONS:
            assert got.labels != exp["labels"], f"row {got.row} now matches axolotl: drop it from DEVIATIONS"
        else:
            assert got.labels == exp["labels"], got.row


def test_mistral_common_trains_assistant_turns(tiny_arch, tmp_path):
    """tokenizer_use_mistral_common: true loads mistral-common's tokenizer (fine-tuning mode) and the data is its
    encoding; without the key the same folder's tokenizer.json is used, though a tekken.json sits beside it."""
    from transformers.tokenization_mistral_common import MistralCommonBackend

    from training.modeling import load_tokenizer

    model_dir = tiny_arch("ministral")
    assert (model_dir / "tekken.json").is_file()
    base = {"base_model": str(model_dir), "datasets": [{"path": "rows.jsonl", "type": "chat_template"}]}
    with_key = parse_config({**base, "tokenizer_use_mistral_common": True})
    without = parse_config(base)
    tokenizer = load_tokenizer(with_key)
    assert isinstance(tokenizer, MistralCommonBackend) and tokenizer.mode.value == "finetuning"
    assert load_tokenizer(without).is_fast  # mistral-common is installed: AutoTokenizer alone would pick it

    row = {
        "messages": [
            {"role": "user", "content": "What is 2 plus 3?"},
            {"role": "assistant", "content": "5."},
            {"role": "user", "content": "And 4 plus 4?"},
            {"role": "assistant", "content": "8, as 4 and 4 make 8."},
        ]
    }
    (sample,) = Encoder.from_config(tokenizer, with_key).encode_row(row)
    assert sample.input_ids == tokenizer.apply_chat_template(row["messages"], return_dict=False)
    assert [t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX] == _assistant_tokens(
        tokenizer, row, "turn"
    )
    assert [sample.parts[p] for p in sample.token_parts if p >= 0][0] == "user #0"
    # mistral-common's fine-tuning mode: a conversation ends with the assistant; the model's template has no such rule
    open_ended = {"messages": row["messages"][:3]}
    (dropped,) = Encoder.from_config(tokenizer, with_key).encode_row(open_ended)
    assert isinstance(dropped, Dropped) and dropped.reason == "unrenderable" and "Assistant" in dropped.detail
    (plain,) = Encoder.from_config(load_tokenizer(without), without).encode_row(open_ended)
    assert isinstance(plain, Encoded)

    # saved with an adapter: tekken.json, and tokenizer.json with its chat template for the playground and merges
    tokenizer.save_pretrained(tmp_path)
    assert {"tekken.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in tmp_path.iterdir()}

    # train_on_inputs trains the user turns too (axolotl fails here: its turn prefixes end with a user turn)
    inputs = parse_config({**base, "tokenizer_use_mistral_common": True, "train_on_inputs": True})
    (all_turns,) = Encoder.from_config(tokenizer, inputs).encode_row(row)
    trained = tokenizer.decode([t for t, lab in zip(all_turns.input_ids, all_turns.labels) if lab != IGNORE_INDEX])
    assert trained == "What is 2 plus 3?5.</s>And 4 plus 4?8, as 4 and 4 make 8.</s>"


def test_the_tiny_ministral_tekken_json_and_tokenizer_json_agree(tiny_arch):
    """The tiny Ministral ships both files, like the real one: the same ids for text and for conversations."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from training.demo import chat_rows
    from training.modeling import load_hf_tokenizer

    model_dir = tiny_arch("ministral")
    tekken = Tekkenizer.from_file(model_dir / "tekken.json")
    hf = load_hf_tokenizer(model_dir)
    mistral = _backend(model_dir)
    for row in chat_rows(40, seed=3):
        messages = [m for m in row["messages"] if m["role"] != "system"]
        for text in (m["content"] for m in messages):
            assert tekken.encode(text, bos=False, eos=False) == hf.encode(text, add_special_tokens=False)
        assert hf.apply_chat_template(messages, return_dict=False) == mistral.apply_chat_template(
            messages, return_dict=False
        )


def test_what_mistral_common_cannot_honour_is_refused(tiny_arch):
    from training.architectures import check_against_model

    model_dir = tiny_arch("ministral")
    base = {"base_model": str(model_dir), "tokenizer_use_mistral_common": True}
    chat = [{"path": "rows.jsonl", "type": "chat_template"}]
    refused = {
        "alpaca rows": {"datasets": [{"path": "rows.jsonl", "type": "alpaca"}]},
        "a chat template": {"datasets": chat, "chat_template": "chatml"},
        "a dataset's chat template": {"datasets": [{**chat[0], "chat_template": "chatml"}]},
        "eot tokens": {"datasets": chat, "eot_tokens": ["[/INST]"]},
        "added tokens": {"datasets": chat, "special_tokens": {"pad_token": "<pad>"}},
    }
    for what, keys in refused.items():
        with pytest.raises(ConfigInvalid) as err:
            parse_config({**base, **keys})
        assert [e.path for e in err.value.errors] == ["tokenizer_use_mistral_common"], what
    # a model without tekken.json
    config = parse_config({**base, "base_model": str(tiny_arch("glm4_moe_lite")), "datasets": chat})
    assert [e.path for e in check_against_model(config)] == ["tokenizer_use_mistral_common"]
    assert check_against_model(parse_config({**base, "datasets": chat})) == []
    # training_detail marks characters; mistral-common gives no offsets for them
    encoder = Encoder(_backend(model_dir), DatasetSpec(path="rows.jsonl", message_field_training_detail="detail"))
    row = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello you", "detail": [{"begin_offset": 0, "end_offset": 4}]},
        ]
    }
    (dropped,) = encoder.encode_row(row)
    assert dropped.reason == "unrenderable" and "offsets" in dropped.detail
