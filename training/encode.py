"""Rows -> `input_ids` + `labels`, in batches. The one path shared by the preview, the CLI and the trainer."""

from __future__ import annotations

import gc
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from training.config import DatasetSpec, TrainConfig
from training.formats import FORMATS, Piece, Rendered, RowProblem
from training.formats.chat_template import resolve_chat_template
from training.rows import LineProblem, read_rows

IGNORE_INDEX = -100
MIN_SAMPLE_TOKENS = 2  # axolotl's min_sample_len: a 1-token sample has no next token to learn


def build_labels(input_ids: Sequence[int], trained: Sequence[bool]) -> list[int]:
    """The only place labels are made: the token id where trained, IGNORE_INDEX (-100) where masked."""
    return [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, trained)]


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
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


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
    "too_short": "fewer than 2 tokens",
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
    skeletons: dict = field(default_factory=dict)  # chat_template: marked renders reused across rows


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
            "rows": self.rows,
            "samples": self.samples,
            "dropped": dict(self.dropped),
            "truncated": self.truncated,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
        }


class Encoder:
    """Encodes rows of one dataset entry with one tokenizer. Cheap to call in batches of any size."""

    def __init__(
        self,
        tokenizer,
        spec: DatasetSpec,
        *,
        sequence_len: int = 512,
        train_on_inputs: bool = False,
        excess_length_strategy: str = "drop",
        chat_template: str | None = "tokenizer_default",
        chat_template_jinja: str | None = None,
        eot_tokens: list[str] | None = None,
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("Trainyard needs a fast (Rust) tokenizer to map trained characters to tokens")
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.spec = spec
        self.format = FORMATS[spec.format_name]
        template = None
        if spec.format_name == "chat_template":
            template = resolve_chat_template(
                spec.chat_template or chat_template,
                spec.chat_template_jinja or chat_template_jinja,
                getattr(tokenizer, "chat_template", None),
            )
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
            tokenizer,
            config.datasets[dataset_index],
            sequence_len=config.sequence_len,
            train_on_inputs=config.train_on_inputs,
            excess_length_strategy=config.excess_length_strategy,
            chat_template=config.chat_template,
            chat_template_jinja=config.chat_template_jinja,
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
        rendered = self._render(rows)
        return self._assemble(rendered, self._encode_pieces(rendered))

    def encode_stream(self, rows: Iterable[tuple[int, dict]], batch_size: int = 1000) -> Iterator[Encoded | Dropped]:
        """Like encode_rows over any number of rows, pipelined: while the Rust tokenizer works on one
        batch (it releases the GIL), Python renders the next and assembles the previous."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for batch in _batched(rows, batch_size):
                with _no_gc():
                    rendered = self._render(batch)
                future = pool.submit(self._encode_pieces, rendered)
                if pending is not None:
                    with _no_gc():
                        done = self._assemble(pending[0], pending[1].result())
                    yield from done
                pending = (rendered, future)
            if pending is not None:
                with _no_gc():
                    done = self._assemble(pending[0], pending[1].result())
                yield from done

    def encode_file(self, path, stats: EncodeStats | None = None) -> Iterator[Encoded | Dropped]:
        """Every line of a dataset file, broken lines included (as `invalid`), row index = line - 1."""

        def rows():
            for line, row in read_rows(path):
                if stats is not None:
                    stats.rows += 1
                yield line - 1, row

        for outcome in self.encode_stream(rows()):
            if stats is not None:
                stats.add(outcome)
            yield outcome

    def _render(self, rows: Iterable[tuple[int, dict]]) -> list[tuple[int, Rendered | Dropped]]:
        rendered: list[tuple[int, Rendered | Dropped]] = []
        for index, row in rows:
            if isinstance(row, LineProblem):  # unreadable line, passed through in order
                rendered.append(
                    (index, Dropped(index, "invalid", f"{row.field}: {row.message}" if row.field else row.message))
                )
                continue
            problems = self.check(row)
            if problems:
                rendered.append(
                    (
                        index,
                        Dropped(
                            index,
                            "invalid",
                            "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in problems),
                        ),
                    )
                )
                continue
            try:
                r = self.format.render(row, self.spec, self.settings)
            except Exception as exc:  # a template error on this row must not sink the whole batch
                rendered.append((index, Dropped(index, "invalid", f"rendering failed: {exc}")))
                continue
            for note in r.notes:
                self.notes[note] += 1
            rendered.append((index, r))
        return rendered

    def _encode_pieces(self, rendered) -> list:
        """Every piece of the batch through the Rust tokenizer: two calls (with/without added specials)."""
        pieces: list[Piece] = [p for _, r in rendered if isinstance(r, Rendered) for p in r.pieces]
        encodings: list = [None] * len(pieces)
        for flag in (False, True):
            idx = [i for i, p in enumerate(pieces) if p.add_special_tokens == flag]
            if idx:
                batch = self.backend.encode_batch([pieces[i].text for i in idx], add_special_tokens=flag)
                for i, enc in zip(idx, batch):
                    encodings[i] = enc
        return encodings

    def _assemble(self, rendered, encodings) -> list[Encoded | Dropped]:
        out: list[Encoded | Dropped] = []
        eos_id = self.tokenizer.eos_token_id
        k = 0
        for index, r in rendered:
            if isinstance(r, Dropped):
                out.append(r)
                continue
            ids: list[int] = []
            trained: list[bool] = []
            parts: list[int] = []
            for piece in r.pieces:
                enc = encodings[k]
                k += 1
                piece_ids = enc.ids
                n = len(piece_ids)
                if piece.whole is not None:
                    trained += [piece.whole.trained] * n
                    parts += [piece.whole.part] * n
                else:
                    t, p = _mark_spans(enc, piece.spans, len(piece.text))
                    trained += t
                    parts += p
                if r.max_tokens and len(ids) + n > r.max_tokens:  # cut: no EOS after a cut text
                    keep = max(r.max_tokens - len(ids), 0)
                    ids += piece_ids[:keep]
                    del trained[len(ids) :], parts[len(ids) :]
                    continue
                ids += piece_ids
                if piece.append_eos is not None and eos_id is not None and (not piece_ids or piece_ids[-1] != eos_id):
                    ids.append(eos_id)
                    trained.append(piece.append_eos.trained)
                    parts.append(piece.append_eos.part)
            out.extend(self._finish(index, r, ids, trained, parts))
        return out

    def warnings(self) -> list[str]:
        """Silent mistakes axolotl would only log: said loudly, with the fix."""
        return [f"{note} ({count} times)" for note, count in self.notes.most_common()]

    # -- internals ----------------------------------------------------------------------------
    def _finish(self, index: int, r: Rendered, ids, trained, parts) -> list[Encoded | Dropped]:
        if not ids:
            return [Dropped(index, "empty", "the row produced no tokens")]
        limit = self.settings.sequence_len
        bounds = [(0, len(ids))]
        if r.split_every:
            bounds = [(s, min(s + r.split_every, len(ids))) for s in range(0, len(ids), r.split_every)]
        out: list[Encoded | Dropped] = []
        for chunk, (lo, hi) in enumerate(bounds):
            if len(bounds) == 1:  # the common case: no copies
                c_ids, c_trained, c_parts = ids, trained, parts
            else:
                c_ids, c_trained, c_parts = ids[lo:hi], trained[lo:hi], parts[lo:hi]
            sample = Encoded(index, c_ids, build_labels(c_ids, c_trained), c_parts, r.parts, chunk=chunk)
            if len(c_ids) < MIN_SAMPLE_TOKENS:
                out.append(Dropped(index, "too_short", f"{len(c_ids)} token(s): nothing to predict", sample))
                continue
            if len(c_ids) > limit:
                strategy = self.settings.excess_length_strategy
                if strategy == "raise":
                    raise SequenceTooLong(f"row {index}: {len(c_ids)} tokens > sequence_len {limit}")
                if strategy == "drop":
                    out.append(Dropped(index, "too_long", f"{len(c_ids)} tokens > sequence_len {limit}", sample))
                    continue
                sample = Encoded(
                    index,
                    c_ids[:limit],
                    sample.labels[:limit],
                    sample.token_parts[:limit],
                    r.parts,
                    truncated=True,
                    chunk=chunk,
                )
            if sample.trained_tokens == 0:
                out.append(Dropped(index, "no_trained_tokens", "every token is masked", sample))
                continue
            out.append(sample)
        return out


@contextmanager
def _no_gc():
    """No cyclic GC inside one batch's allocation burst (its objects hold no cycles); the caller's
    code between batches runs with GC as it was. Measured: ~20% of encoding time went to GC passes
    over the big heap of a process that imported torch/transformers."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _token_range(encoding, start: int, end: int, text_len: int, offsets_cache: list) -> tuple[int, int]:
    """Tokens [lo, hi) overlapping characters [start, end)."""
    n = len(encoding.ids)
    lo = encoding.char_to_token(start)
    # The first token of the character after the range; if it also covers characters inside the
    # range (a merge across the boundary) it overlaps, so it counts.
    hi = encoding.char_to_token(end) if end < text_len else n
    if hi is not None and hi < n and encoding.token_to_chars(hi)[0] < end:
        hi += 1
    if lo is None or hi is None:  # a character no token covers (normalized away): use offsets
        if not offsets_cache:
            offsets = encoding.offsets
            offsets_cache += [[o[0] for o in offsets], [o[1] for o in offsets]]
        starts, ends = offsets_cache
        lo, hi = bisect_right(ends, start), bisect_left(starts, end)
    return lo, hi


def snap(token_starts: list[int], length: int, begin: int, end_inclusive: int) -> tuple[int, int]:
    """Axolotl's training_detail rule, on the tokens of one content (starts relative to it):
    the tokens [first, last] a detail (begin, end_offset inclusive) trains."""
    n = len(token_starts)
    ends = [token_starts[i + 1] - 1 for i in range(n - 1)] + [length - 1]
    first = next((i for i, s in enumerate(token_starts) if s >= begin), n)
    if first > 0 and ends[first - 1] > begin:
        first -= 1
    last = max((i for i, e in enumerate(ends) if e <= end_inclusive), default=-1)
    if last + 1 < n and token_starts[last + 1] < end_inclusive:
        last += 1
    return first, last


def _mark_spans(encoding, spans, text_len: int) -> tuple[list[bool], list[int]]:
    """Per token: trained if it overlaps a trained span (spans only ever add training), and the
    part of the first span it overlaps."""
    n = len(encoding.ids)
    trained = [False] * n
    part = [-1] * n
    offsets_cache: list = []
    for span in spans:
        if span.end <= span.start:
            continue
        if span.snap is not None:
            c_lo, c_hi = _token_range(encoding, span.snap[0], span.snap[1], text_len, offsets_cache)
            starts = [max(encoding.token_to_chars(i)[0] - span.snap[0], 0) for i in range(c_lo, c_hi)]
            first, last = snap(
                starts, span.snap[1] - span.snap[0], span.start - span.snap[0], span.end - 1 - span.snap[0]
            )
            lo, hi = c_lo + first, c_lo + last + 1
        else:
            lo, hi = _token_range(encoding, span.start, span.end, text_len, offsets_cache)
        if hi > lo:
            if span.trained:
                trained[lo:hi] = [True] * (hi - lo)
            if -1 in part[lo:hi]:
                part[lo:hi] = [span.part if p == -1 else p for p in part[lo:hi]]
    return trained, part
