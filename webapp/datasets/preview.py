"""The masked-label preview: one row through the trainer's own encoder, shown token by token."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from training.config import DatasetSpec
from training.encode import IGNORE_INDEX, Dropped, Encoder
from webapp.datasets.models import Dataset
from webapp.datasets.services import read_row
from webapp.runs.base_models import resolve_base_model


@dataclass
class PreviewOptions:
    model: str
    train_on_inputs: bool = False
    roles_to_train: list[str] = field(default_factory=lambda: ["assistant"])
    train_on_eos: str = "turn"
    sequence_len: int = 512


@dataclass
class Token:
    id: int
    text: str  # whitespace made visible
    label: int
    trained: bool
    special: bool
    part: str


@dataclass
class Preview:
    row: int
    raw: dict
    tokens: list[Token]
    trained: int
    dropped: str | None
    warnings: list[str]


@lru_cache(maxsize=4)
def _tokenizer(source: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def visible(text: str) -> str:
    return text.replace(" ", "\u00b7").replace("\n", "\u21b5").replace("\t", "\u2192")


def preview_row(dataset: Dataset, index: int, options: PreviewOptions) -> Preview:
    tokenizer = _tokenizer(resolve_base_model(options.model))
    spec = DatasetSpec(path=dataset.name, type=dataset.format, roles_to_train=options.roles_to_train,
                       train_on_eos=options.train_on_eos)
    encoder = Encoder(tokenizer, spec, sequence_len=options.sequence_len, train_on_inputs=options.train_on_inputs)
    raw = read_row(dataset, index)
    outcomes = encoder.encode_row(raw, index)
    specials = set(tokenizer.all_special_ids)
    tokens, dropped, trained = [], None, 0
    for outcome in outcomes:
        sample = outcome.sample if isinstance(outcome, Dropped) else outcome
        if isinstance(outcome, Dropped):
            dropped = f"{outcome.reason}: {outcome.detail}"
        if sample is None:
            continue
        for token_id, label, part in zip(sample.input_ids, sample.labels, sample.token_parts):
            is_trained = label != IGNORE_INDEX
            trained += is_trained
            tokens.append(Token(token_id, visible(tokenizer.decode([token_id])), label, is_trained,
                                token_id in specials, sample.parts[part] if part >= 0 else "template"))
    return Preview(index, raw, tokens, trained, dropped, encoder.warnings())
