"""The types every dataset format speaks: pieces of text with trained character spans."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from training.config import DatasetSpec


class Span(NamedTuple):
    """Characters [start, end) of a piece's text; a token overlapping a trained span is trained."""

    start: int
    end: int
    trained: bool
    part: int  # index into Rendered.parts: the message or segment these characters belong to
    snap: tuple[int, int] | None = None  # training_detail: the content's characters, to snap to tokens


@dataclass
class Piece:
    """A text tokenized on its own (axolotl tokenizes alpaca's prompt and response separately)."""

    text: str
    spans: list[Span] = field(default_factory=list)
    add_special_tokens: bool = False  # let the tokenizer add BOS (and what else its post-processor adds)
    whole: Span | None = None  # every token of the piece, specials included, gets this span's flag and part
    append_eos: Span | None = None  # append the eos token, with this flag and part (start/end unused)


@dataclass
class Rendered:
    pieces: list[Piece]
    parts: list[str]  # human names of parts, e.g. "assistant #3", shown in the preview
    split_every: int | None = None  # completion: cut the tokens into chunks of this length
    max_tokens: int | None = None  # completion: tokens beyond this are cut before chunking
    notes: list[str] = field(default_factory=list)  # silent mistakes to tell the user about


@dataclass(frozen=True)
class RowProblem:
    field: str  # e.g. "messages[2].content"
    message: str


class EncodeOptions(Protocol):
    """What a format needs beyond the row: the tokenizer side of things, resolved once."""

    eos_token: str | None
    eot_tokens: list[str]
    chat_template: str | None
    train_on_inputs: bool
    sequence_len: int
    template_kwargs: dict  # bos_token, eos_token, ... as the chat template expects them
    skeletons: dict  # a cache the chat template format may keep across rows


class Format(Protocol):
    name: str

    def check(self, row: dict, spec: DatasetSpec) -> list[RowProblem]: ...

    def render(self, row: dict, spec: DatasetSpec, options: EncodeOptions) -> Rendered: ...

    def looks_like(self, row: dict) -> bool: ...
