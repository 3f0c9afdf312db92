"""Reasoning traces, as axolotl 0.21: trained with their turn, split from inline <think>, dropped
from earlier turns where the template drops them, and a part of their own for the preview."""

from __future__ import annotations

import json
from pathlib import Path

from training.config import DatasetSpec
from training.encode import Encoded, Encoder
from training.formats.chat_template import split_thinking

FIXTURES = Path(__file__).parents[1] / "fixtures" / "axolotl"


def qwen_tokenizer():
    from transformers import PreTrainedTokenizerFast

    folder = FIXTURES / "tokenizers" / "templates_bpe"
    tokens = json.loads((folder / "families.json").read_text())["chatml"]
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), **{k: v for k, v in tokens.items() if v}
    )


def trained_text(tokenizer, sample: Encoded) -> str:
    return tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != -100])


def encode(row, **options):
    tokenizer = qwen_tokenizer()
    (sample,) = Encoder(tokenizer, DatasetSpec(path="x", chat_template="qwen3", **options)).encode_row(row)
    assert isinstance(sample, Encoded)
    return tokenizer, sample


def test_the_reasoning_of_a_trained_turn_is_trained_with_it():
    row = {
        "messages": [
            {"role": "user", "content": "3 times 4?"},
            {"role": "assistant", "content": "12.", "reasoning_content": "3 * 4 = 12"},
        ]
    }
    tokenizer, sample = encode(row)
    assert trained_text(tokenizer, sample) == "3 * 4 = 12\n</think>\n\n12.<|im_end|>"
    thinking = [p for p in sample.token_parts if p >= 0 and sample.parts[p].endswith(" thinking")]
    assert thinking and sample.parts[thinking[0]] == "assistant #1 thinking"


def test_qwen3_drops_the_thinking_of_turns_before_the_last_question():
    row = {
        "messages": [
            {"role": "user", "content": "Is 7 prime?"},
            {"role": "assistant", "content": "Yes.", "reasoning_content": "no divisors"},
            {"role": "user", "content": "And 9?"},
            {"role": "assistant", "content": "No.", "reasoning_content": "3 * 3"},
        ]
    }
    tokenizer, sample = encode(row)
    text = tokenizer.decode(sample.input_ids)
    assert "no divisors" not in text and "3 * 3" in text
    assert trained_text(tokenizer, sample) == "Yes.<|im_end|>3 * 3\n</think>\n\nNo.<|im_end|>"


def test_split_thinking_moves_inline_thinking_to_the_trace():
    assert split_thinking("<think>\n a \n</think>\n\nb") == ("b", "a")
    assert split_thinking("<|begin_of_thought|>a<|end_of_thought|> <|begin_of_solution|> b <|end_of_solution|>") == (
        "b",
        "a",
    )
    assert split_thinking("no trace") == ("no trace", None)
    inline = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>t</think>A"}]}
    answer = {"role": "assistant", "content": "A", "reasoning_content": "t"}
    trace = {"messages": [{"role": "user", "content": "Q"}, answer]}
    tokenizer, split = encode(inline, split_thinking=True)
    _, given = encode(trace)
    assert split.input_ids == given.input_ids and split.labels == given.labels


def test_field_thinking_names_the_rows_key_for_the_trace():
    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "thought": "t"}]}
    tokenizer, sample = encode(row, field_thinking="thought")
    assert trained_text(tokenizer, sample) == "t\n</think>\n\nA<|im_end|>"
