"""alpaca, completion and input_output on the tiny tokenizer; sequence_len handling."""

from __future__ import annotations

import pytest

from tests.helpers import trained_runs
from training.config import DatasetSpec
from training.encode import Dropped, Encoded, Encoder, SequenceTooLong
from training.formats import detect_format
from training.formats.alpaca import SYSTEM_NO_INPUT, SYSTEM_WITH_INPUT


def encode_all(tokenizer, row, type_, **top):
    return Encoder(tokenizer, DatasetSpec(path="x", type=type_), **top).encode_row(row)


def test_alpaca_prompt_text_and_masking(tokenizer):
    (sample,) = encode_all(tokenizer, {"instruction": "Add 2 and 3.", "input": "", "output": "5"}, "alpaca")
    text = tokenizer.decode(sample.input_ids)
    assert text == f"{SYSTEM_NO_INPUT}\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n5<|im_end|>"
    assert trained_runs(tokenizer, sample) == ["5<|im_end|>"]


def test_alpaca_with_input_uses_the_input_prompt(tokenizer):
    (sample,) = encode_all(tokenizer, {"instruction": "Add.", "input": "2 and 3", "output": "5"}, "alpaca")
    assert tokenizer.decode(sample.input_ids).startswith(
        SYSTEM_WITH_INPUT + "\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 3"
    )


def test_alpaca_train_on_inputs_trains_the_prompt_too(tokenizer):
    (sample,) = encode_all(tokenizer, {"instruction": "Add.", "output": "5"}, "alpaca", train_on_inputs=True)
    assert sample.trained_tokens == len(sample.input_ids)


def test_alpaca_chat_style(tokenizer):
    (sample,) = encode_all(tokenizer, {"instruction": "Hi", "output": "Hello"}, "alpaca:chat")
    assert tokenizer.decode(sample.input_ids) == f"SYSTEM: {SYSTEM_NO_INPUT}\nUSER: Hi\nASSISTANT:Hello<|im_end|>"


def test_completion_trains_everything_and_appends_eos(tokenizer):
    (sample,) = encode_all(tokenizer, {"text": "The fox is red."}, "completion")
    assert tokenizer.decode(sample.input_ids) == "The fox is red.<|im_end|>"
    assert sample.trained_tokens == len(sample.input_ids)


def test_completion_longer_than_sequence_len_is_split_into_chunks(tokenizer):
    text = " ".join(["The capital of France is Paris."] * 40)
    chunks = encode_all(tokenizer, {"text": text}, "completion", sequence_len=64)
    assert len(chunks) > 1 and all(isinstance(c, Encoded) for c in chunks)
    assert all(len(c.input_ids) <= 64 for c in chunks)
    joined = [t for c in chunks for t in c.input_ids]
    assert tokenizer.decode(joined) == text + "<|im_end|>"


def test_input_output_trains_labelled_segments_without_bos_or_eos(tokenizer):
    row = {"segments": [{"label": False, "text": "Q: 2+2?\n"}, {"label": True, "text": "A: 4"}]}
    (sample,) = encode_all(tokenizer, row, "input_output")
    assert tokenizer.decode(sample.input_ids) == "Q: 2+2?\nA: 4"
    assert trained_runs(tokenizer, sample) == ["A: 4"]


@pytest.mark.parametrize("strategy", ["drop", "truncate", "raise"])
def test_excess_length_strategy(tokenizer, strategy):
    row = {"messages": [{"role": "user", "content": "word " * 5}, {"role": "assistant", "content": "ok " * 60}]}
    encoder = Encoder(tokenizer, DatasetSpec(path="x"), sequence_len=40, excess_length_strategy=strategy)
    if strategy == "raise":
        with pytest.raises(SequenceTooLong):
            encoder.encode_row(row)
        return
    (outcome,) = encoder.encode_row(row)
    if strategy == "drop":
        assert isinstance(outcome, Dropped) and outcome.reason == "too_long"
    else:
        assert isinstance(outcome, Encoded) and outcome.truncated and len(outcome.input_ids) == 40


def test_a_truncated_row_whose_trained_part_was_cut_off_is_dropped(tokenizer):
    row = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]}
    encoder = Encoder(tokenizer, DatasetSpec(path="x"), sequence_len=40, excess_length_strategy="truncate")
    (outcome,) = encoder.encode_row(row)
    assert isinstance(outcome, Dropped) and outcome.reason == "no_trained_tokens"


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "chat_template"),
        ({"conversations": []}, "chat_template"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"text": "a"}, "completion"),
        ({"segments": []}, "input_output"),
        ({"foo": 1}, None),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_batch_encoding_equals_row_by_row(tokenizer):
    from training.demo import chat_rows

    rows = list(enumerate(chat_rows(50, seed=7)))
    encoder = Encoder(tokenizer, DatasetSpec(path="x"))
    batched = encoder.encode_rows(rows)
    single = [o for i, r in rows for o in encoder.encode_row(r, i)]
    assert [(o.row, o.input_ids, o.labels) for o in batched] == [(o.row, o.input_ids, o.labels) for o in single]
