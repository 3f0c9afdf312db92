"""Rows -> `input_ids` + `labels`, in batches. The one path shared by the preview, the CLI and the trainer."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from training.config import DatasetSpec, TrainConfig
from training.formats import FORMATS, Piece, Rendered, RowProblem
from training.formats.chat_template import resolve_chat_template

IGNORE_INDEX = -100


def build_labels(input_ids: Sequence[int], trained: Sequence[bool] | np.ndarray) -> list[int]:
    """The only place labels are made: the token id where trained, IGNORE_INDEX (-100) where masked."""
    ids = np.asarray(input_ids, dtype=np.int64)
    return np.where(np.asarray(trained, dtype=bool), ids, IGNORE_INDEX).tolist()


@dataclass
class Encoded:
    row: int  # 0-based index of the source row (line number - 1 for JSONL)
    input_ids: list[int]
    labels: list[int]
    token_parts: list[int]  # per token: index into `parts`, -1 for template text
    parts: list[str]
    truncated: bool = False
    chunk: int = 0  # completion rows longer than sequence_len become several chunks

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class Dropped:
    row: int
    reason: str  # invalid | empty | too_long | no_trained_tokens
    detail: str = ""
    sample: Encoded | None = None  # what was encoded before it was dropped, for the preview


DROP_REASONS = {
    "invalid": "row does not match the format",
    "empty": "no tokens",
    "too_long": "longer than sequence_len (excess_length_strategy: drop)",
    "no_trained_tokens": "every token masked: nothing to learn from",
}


class RowInvalid(ValueError):
    def __init__(self, row: int, problems: list[RowProblem]):
        self.row, self.problems = row, problems
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))


class SequenceTooLong(ValueError):
    pass


@dataclass
class EncodeSettings:
    """Everything a format needs from the tokenizer and the config, resolved once per dataset."""

    eos_token: str | None
    eot_tokens: list[str]
    chat_template: str | None
    train_on_inputs: bool
    sequence_len: int
    template_kwargs: dict
    excess_length_strategy: str = "drop"


@dataclass
class EncodeStats:
    rows: int = 0
    samples: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)

    def add(self, outcome: Encoded | Dropped) -> None:
        if isinstance(outcome, Dropped):
            self.dropped[outcome.reason] += 1
            return
        self.samples += 1
        self.truncated += outcome.truncated
        self.tokens += len(outcome.input_ids)
        self.trained_tokens += outcome.trained_tokens
        self.lengths.append(len(outcome.input_ids))

    def as_dict(self) -> dict:
        return {
            "rows": self.rows, "samples": self.samples, "dropped": dict(self.dropped),
            "truncated": self.truncated, "tokens": self.tokens, "trained_tokens": self.trained_tokens,
        }


class Encoder:
    """Encodes rows of one dataset entry with one tokenizer. Cheap to call in batches of any size."""

    def __init__(self, tokenizer, spec: DatasetSpec, *, sequence_len: int = 512, train_on_inputs: bool = False,
                 excess_length_strategy: str = "drop", chat_template: str | None = "tokenizer_default",
                 chat_template_jinja: str | None = None, eot_tokens: list[str] | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("Trainyard needs a fast (Rust) tokenizer to map trained characters to tokens")
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.spec = spec
        self.format = FORMATS[spec.format_name]
        template = None
        if spec.format_name == "chat_template":
            template = resolve_chat_template(
                spec.chat_template or chat_template, spec.chat_template_jinja or chat_template_jinja,
                getattr(tokenizer, "chat_template", None))
        eos = tokenizer.eos_token
        self.settings = EncodeSettings(
            eos_token=eos,
            eot_tokens=list(eot_tokens) if eot_tokens else ([eos] if eos else []),
            chat_template=template,
            train_on_inputs=train_on_inputs,
            sequence_len=sequence_len,
            template_kwargs={k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
            excess_length_strategy=excess_length_strategy,
        )
        self.notes: Counter = Counter()

    @classmethod
    def from_config(cls, tokenizer, config: TrainConfig, dataset_index: int = 0) -> Encoder:
        return cls(
            tokenizer, config.datasets[dataset_index], sequence_len=config.sequence_len,
            train_on_inputs=config.train_on_inputs, excess_length_strategy=config.excess_length_strategy,
            chat_template=config.chat_template, chat_template_jinja=config.chat_template_jinja,
            eot_tokens=config.eot_tokens,
        )

    # -- public -------------------------------------------------------------------------------
    def check(self, row) -> list[RowProblem]:
        if not isinstance(row, dict):
            return [RowProblem("", f"a row must be a JSON object, not {type(row).__name__}")]
        return self.format.check(row, self.spec)

    def encode_row(self, row: dict, index: int = 0) -> list[Encoded | Dropped]:
        return self.encode_rows([(index, row)])

    def encode_rows(self, rows: Iterable[tuple[int, dict]]) -> list[Encoded | Dropped]:
        """(row index, row) pairs -> outcomes in the same order (a completion row may give several)."""
        rendered: list[tuple[int, Rendered | Dropped]] = []
        for index, row in rows:
            problems = self.check(row)
            if problems:
                rendered.append((index, Dropped(index, "invalid", "; ".join(
                    f"{p.field}: {p.message}" if p.field else p.message for p in problems))))
                continue
            try:
                r = self.format.render(row, self.spec, self.settings)
            except Exception as exc:  # a template error on this row must not sink the whole batch
                rendered.append((index, Dropped(index, "invalid", f"rendering failed: {exc}")))
                continue
            for note in getattr(r, "notes", ()):
                self.notes[note] += 1
            rendered.append((index, r))
        token_lists = self._tokenize([r for _, r in rendered if isinstance(r, Rendered)])
        out: list[Encoded | Dropped] = []
        it = iter(token_lists)
        for index, r in rendered:
            if isinstance(r, Dropped):
                out.append(r)
                continue
            ids, trained, parts = next(it)
            out.extend(self._finish(index, r, ids, trained, parts))
        return out

    def warnings(self) -> list[str]:
        """Silent mistakes axolotl would only log: said loudly, with the fix."""
        return [f"{note} ({count} times)" for note, count in self.notes.most_common()]

    # -- internals ----------------------------------------------------------------------------
    def _tokenize(self, rendered: list[Rendered]):
        pieces: list[Piece] = [p for r in rendered for p in r.pieces]
        encodings: list = [None] * len(pieces)
        for flag in (False, True):
            idx = [i for i, p in enumerate(pieces) if p.add_special_tokens == flag]
            if idx:
                for i, enc in zip(idx, self.backend.encode_batch([pieces[i].text for i in idx], add_special_tokens=flag)):
                    encodings[i] = enc
        eos_id = self.tokenizer.eos_token_id
        results = []
        k = 0
        for r in rendered:
            all_ids: list[int] = []
            trained_chunks, part_chunks = [], []
            for piece in r.pieces:
                enc = encodings[k]
                k += 1
                ids = list(enc.ids)
                n = len(ids)
                if piece.whole is not None:
                    trained = np.full(n, piece.whole.trained)
                    part = np.full(n, piece.whole.part)
                else:
                    trained, part = _mark_spans(enc.offsets, piece.spans)
                if piece.append_eos is not None and eos_id is not None and (not ids or ids[-1] != eos_id):
                    ids.append(eos_id)
                    trained = np.append(trained, piece.append_eos.trained)
                    part = np.append(part, piece.append_eos.part)
                all_ids.extend(ids)
                trained_chunks.append(trained)
                part_chunks.append(part)
            trained = np.concatenate(trained_chunks) if trained_chunks else np.zeros(0, bool)
            parts = np.concatenate(part_chunks) if part_chunks else np.zeros(0, int)
            results.append((all_ids, trained.astype(bool), parts.astype(int)))
        return results

    def _finish(self, index: int, r: Rendered, ids, trained, parts) -> list[Encoded | Dropped]:
        if not ids:
            return [Dropped(index, "empty", "the row produced no tokens")]
        limit = self.settings.sequence_len
        bounds = [(0, len(ids))]
        if r.split_every:
            bounds = [(s, min(s + r.split_every, len(ids))) for s in range(0, len(ids), r.split_every)]
        out: list[Encoded | Dropped] = []
        for chunk, (lo, hi) in enumerate(bounds):
            c_ids, c_trained, c_parts = ids[lo:hi], trained[lo:hi], parts[lo:hi]
            sample = Encoded(index, c_ids, build_labels(c_ids, c_trained), c_parts.tolist(), r.parts, chunk=chunk)
            if len(c_ids) > limit:
                strategy = self.settings.excess_length_strategy
                if strategy == "raise":
                    raise SequenceTooLong(f"row {index}: {len(c_ids)} tokens > sequence_len {limit}")
                if strategy == "drop":
                    out.append(Dropped(index, "too_long", f"{len(c_ids)} tokens > sequence_len {limit}", sample))
                    continue
                sample = Encoded(index, c_ids[:limit], sample.labels[:limit], sample.token_parts[:limit], r.parts,
                                 truncated=True, chunk=chunk)
            if sample.trained_tokens == 0:
                out.append(Dropped(index, "no_trained_tokens", "every token is masked", sample))
                continue
            out.append(sample)
        return out


def _mark_spans(offsets, spans) -> tuple[np.ndarray, np.ndarray]:
    """Per token: trained if it overlaps a trained span; part of the first span it overlaps."""
    n = len(offsets)
    trained = np.zeros(n, dtype=bool)
    part = np.full(n, -1, dtype=np.int64)
    if not n or not spans:
        return trained, part
    off = np.asarray(offsets, dtype=np.int64)
    starts, ends = off[:, 0], off[:, 1]
    for span in spans:
        if span.end <= span.start:
            continue
        lo = int(np.searchsorted(ends, span.start, side="right"))
        hi = int(np.searchsorted(starts, span.end, side="left"))
        if hi <= lo:
            continue
        sel = slice(lo, hi)
        nonempty = ends[sel] > starts[sel]
        if span.trained:
            trained[sel] |= nonempty
        else:
            # An untrained span inside a trained one (training_detail) masks those tokens again.
            trained[sel] &= ~nonempty
        unset = (part[sel] == -1) & nonempty
        part[sel] = np.where(unset, span.part, part[sel])
    return trained, part
