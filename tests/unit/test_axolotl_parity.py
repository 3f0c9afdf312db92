"""Byte-for-byte parity with axolotl 0.21.0's input_ids and labels.

The golden files in tests/fixtures/axolotl/ were produced by running axolotl itself (see
../shared/axolotl-peer/) on small datasets, with the two tokenizers stored beside them. Where
Trainyard deliberately differs, the case says so in DEVIATIONS and the test checks our behaviour.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest

from training.config import DatasetSpec
from training.encode import Dropped, Encoded, Encoder

FIXTURES = Path(__file__).parents[1] / "fixtures" / "axolotl"
CASES = sorted(p.name for p in (FIXTURES / "cases").iterdir())

# Axolotl crashes on rows that lack the top-level `system` key when others have it (chatml), or
# renders a phantom empty system turn for them (llama3); we encode every row as it is.
NO_REFERENCE = {"chat_system_field_mixed_rows_chatml", "chat_system_field_mixed_rows_llama3"}
# Axolotl keeps rows with an empty user/assistant turn (training nothing of it); we refuse empty
# content as invalid input, so the user fixes the data instead. Unknown role names (not in the
# `roles` map) pass through axolotl unchanged; we refuse them, naming the `roles` option.
REFUSED_BY_DESIGN = ("empty content", "unknown role")
# Axolotl maps training_detail offsets onto the content tokenized alone, which is off by a token
# when the template trims leading spaces (llama3): we map them onto the rendered text instead.
ROW_DEVIATIONS = {("chat_training_detail_llama3", 3): "axolotl's training_detail is shifted by llama3's trim"}


@lru_cache(maxsize=2)
def tokenizer_for(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURES / "tokenizers" / name)


def run_case(name: str):
    case = FIXTURES / "cases" / name
    options = json.loads((case / "options.json").read_text())
    dataset = {k: v for k, v in options["dataset"].items() if k not in ("ds_type",)}
    spec = DatasetSpec(**dataset)
    tokenizer = tokenizer_for(options["tokenizer"])
    if options.get("special_tokens"):  # as training.modeling.load_tokenizer applies them
        import copy

        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_special_tokens(options["special_tokens"])
    encoder = Encoder(
        tokenizer,
        spec,
        sequence_len=options["sequence_len"],
        train_on_inputs=options["train_on_inputs"],
        excess_length_strategy=options.get("excess_length_strategy", "drop"),
        eot_tokens=options.get("eot_tokens"),
    )
    outcomes = list(encoder.encode_file(case / "data.jsonl"))
    expected = [json.loads(line) for line in (case / "expected.jsonl").read_text().splitlines()]
    return outcomes, expected


@pytest.mark.parametrize("name", CASES)
def test_labels_match_axolotl(name):
    outcomes, expected = run_case(name)
    if name in NO_REFERENCE:
        assert outcomes and all(isinstance(o, Encoded) for o in outcomes)
        return
    ours = {}
    for o in outcomes:
        sample = o.sample if isinstance(o, Dropped) else o
        chunk = sample.chunk if sample is not None else 0
        ours[(o.row, chunk)] = o
    for exp in expected:
        key = (exp["row"], exp["chunk"])
        if (name, exp["row"]) in ROW_DEVIATIONS:
            continue
        got = ours.pop(key, None)
        assert got is not None, f"row {key}: axolotl produced a sample, we produced nothing"
        if isinstance(got, Dropped) and got.reason == "invalid" and any(r in got.detail for r in REFUSED_BY_DESIGN):
            continue
        sample = got.sample if isinstance(got, Dropped) else got
        kept_by_axolotl = exp["kept"] and exp["n_trainable"] > 0  # we also drop rows with nothing to train
        assert isinstance(got, Encoded) == kept_by_axolotl, (key, got)
        if sample is not None and not (
            isinstance(got, Dropped)
            and got.reason in ("too_long", "too_short")
            and exp["kept"] is False
            and len(sample.input_ids) != exp["n_tokens"]
        ):
            assert sample.input_ids == exp["input_ids"], key
            assert sample.labels == exp["labels"], key
    leftover = [k for k, o in ours.items() if isinstance(o, Encoded) and (name, k[0]) not in ROW_DEVIATIONS]
    assert not leftover, f"we kept samples axolotl did not produce: {leftover}"
