"""Rows -> `input_ids` + `labels`, in batches. The one path shared by the preview, the CLI and the trainer."""

from __future__ import annotations

import gc
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from training.config import DatasetSpec, TrainConfig
from training.formats import FORMATS, Piece, Rendered, RowProblem
from training.formats.chat_template import check_template, resolve_chat_template
from training.rows import LineProblem, read_rows

IGNORE_INDEX = -100
MIN_SAMPLE_TOKENS = 2  # axolotl's min_sample_len: a 1-token sample has no next token to learn


def build_labels(
    input_ids: Sequence[int], trained: Iterable[tuple[int, int]], never: frozenset[int] = frozenset()
) -> list[int]:
    """The only place labels are made: the token id inside a trained range [lo, hi) of token
    positions, IGNORE_INDEX (-100) everywhere else. Ranges may overlap. Tokens in `never` (image
    placeholders: they stand for pixels, not text to predict) are never trained."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for lo, hi in trained:
        labels[lo:hi] = input_ids[lo:hi]
    if never:
        labels = [IGNORE_INDEX if t in never else label for t, label in zip(input_ids, labels)]
    return labels


@dataclass
class Encoded:
    row: int  # 0-based index of the source row (line number - 1 for JSONL)
    input_ids: list[int]
    labels: list[int]
    token_parts: list[int]  # per token: index into `parts`, -1 for template text
    parts: list[str]
    truncated: bool = False
    chunk: int = 0  # completion rows longer than sequence_len become several chunks
    images: list | None = None  # image rows (training/multimodal.py): the images its image tokens stand for

    @property
    def trained_tokens(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


@dataclass
class Dropped:
    row: int
    reason: str  # invalid | empty | too_long | too_short | no_trained_tokens | unrenderable
    detail: str = ""
    sample: Encoded | None = None  # what was encoded before it was dropped, for the preview


DROP_REASONS = {
    "invalid": "row does not match the format",
    "empty": "no tokens",
    "too_long": "longer than sequence_len (excess_length_strategy: drop)",
    "too_short": "fewer than 2 tokens",
    "no_trained_tokens": "every token masked: nothing to learn from",
    "unrenderable": "the chat template can't render this row (e.g. a role it refuses)",
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
    # kept samples by length (tokens -> count), for packing figures: bounded by sequence_len, however many rows
    lengths: Counter = field(default_factory=Counter)

    def add(self, outcome: Encoded | Dropped) -> None:
        if isinstance(outcome, Dropped):
            self.dropped[outcome.reason] += 1
            return
        self.samples += 1
        self.truncated += outcome.truncated
        self.tokens += len(outcome.input_ids)
        self.trained_tokens += outcome.trained_tokens
        self.lengths[len(outcome.input_ids)] += 1

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
        base_dir: Path | None = None,  # the config's folder: a chat_template_jinja file is looked up there
    ):
        self.tokenizer = tokenizer
        self.spec = spec
        self.format = FORMATS[spec.format_name]
        # tokenizer_use_mistral_common: mistral-common encodes whole conversations itself (training/mistral_chat.py)
        self.mistral = _mistral_chat(tokenizer, spec, train_on_inputs)
        if self.mistral is None and not getattr(tokenizer, "is_fast", False):
            raise ValueError("Trainyard needs a fast (Rust) tokenizer to map trained characters to tokens")
        self.backend = tokenizer.backend_tokenizer if self.mistral is None else None
        template = None
        if spec.format_name == "chat_template" and self.mistral is None:
            template = resolve_chat_template(
                spec.chat_template or chat_template,
                spec.chat_template_jinja or chat_template_jinja,
                getattr(tokenizer, "chat_template", None),
                base_dir,
            )
            check_template(template)  # a syntax error is one clear error, not one per row
            _check_end_token_policies(spec, template, list(eot_tokens) if eot_tokens else None, tokenizer.eos_token)
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
        self._render_valid = getattr(self.format, "render_valid", None)
        self.masked_ids: frozenset[int] = frozenset()  # never trained (image placeholders: multimodal.py)

    @classmethod
    def from_config(
        cls, tokenizer, config: TrainConfig, dataset_index: int = 0, base_dir: Path | None = None, **extra
    ) -> Encoder:
        """The encoder of one `datasets:` entry; `extra` goes to a subclass's own arguments (ImageEncoder's)."""
        return cls(
            tokenizer,
            config.datasets[dataset_index],
            sequence_len=config.sequence_len,
            train_on_inputs=config.train_on_inputs,
            excess_length_strategy=config.excess_length_strategy,
            chat_template=config.chat_template,
            chat_template_jinja=config.chat_template_jinja,
            eot_tokens=config.eot_tokens,
            base_dir=base_dir,
            **extra,
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
        if self.mistral is not None:
            return self._encode_with_mistral_common(rows)
        rendered = self._render(rows)
        return self._assemble(rendered, self._encode_pieces(rendered))

    def encode_stream(self, rows: Iterable[tuple[int, dict]], batch_size: int = 1000) -> Iterator[Encoded | Dropped]:
        """Like encode_rows over any number of rows, a batch at a time. Measured (bench/preprocess.py):
        with Python down to ~12 us a row, tokenizing in a thread beside it (the Rust encoder already
        uses both cores) was slower in the median and much noisier than one batch after another."""
        for batch in _batched(rows, batch_size):
            with _no_gc():
                done = self.encode_rows(batch)
            yield from done

    def encode_file(self, path, stats: EncodeStats | None = None) -> Iterator[Encoded | Dropped]:
        """Every line of a JSONL file, broken lines included (as `invalid`), row index = line - 1."""
        return self.encode_numbered(read_rows(path), stats)

    def encode_numbered(
        self, items: Iterable[tuple[int, dict | LineProblem]], stats: EncodeStats | None = None
    ) -> Iterator[Encoded | Dropped]:
        """(1-based line/row number, row or problem) pairs, as training.sources yields them; row
        index = number - 1. Unreadable rows come out as `invalid`."""

        def rows():
            for number, row in items:
                if stats is not None:
                    stats.rows += 1
                yield number - 1, row

        for outcome in self.encode_stream(rows()):
            if stats is not None:
                stats.add(outcome)
            yield outcome

    def _render(self, rows: Iterable[tuple[int, dict]]) -> list[tuple[int, Rendered | Dropped]]:
        rendered: list[tuple[int, Rendered | Dropped]] = []
        fast, spec, settings = self._render_valid, self.spec, self.settings
        for index, row in rows:
            if fast is not None:  # the format's one-pass path for rows of the common shape
                try:
                    r = fast(row, spec, settings)
                except Exception:  # the general path below reports this row's problem
                    r = None
                if r is not None:
                    for note in r.notes:
                        self.notes[note] += 1
                    rendered.append((index, r))
                    continue
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
                # The row is well formed but this template can't render it (a role it refuses, a
                # system turn it doesn't support): a note on the row, not a fault of the file.
                rendered.append((index, Dropped(index, "unrenderable", f"the template can't render this row: {exc}")))
                continue
            for note in r.notes:
                self.notes[note] += 1
            rendered.append((index, r))
        return rendered

    def _encode_pieces(self, rendered) -> list:
        """Every piece of the batch through the Rust tokenizer: one call per add_special_tokens value."""
        pieces: list[Piece] = [p for _, r in rendered if isinstance(r, Rendered) for p in r.pieces]
        flags = {p.add_special_tokens for p in pieces}
        if len(flags) == 1:  # the common case: one call, in order
            return self.backend.encode_batch([p.text for p in pieces], add_special_tokens=flags.pop())
        encodings: list = [None] * len(pieces)
        for flag in flags:
            idx = [i for i, p in enumerate(pieces) if p.add_special_tokens == flag]
            for i, enc in zip(idx, self.backend.encode_batch([pieces[i].text for i in idx], add_special_tokens=flag)):
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
            trained: list[tuple[int, int]] = []  # token ranges [lo, hi) that train
            parts: list[int] = []
            for piece in r.pieces:
                enc = encodings[k]
                k += 1
                piece_ids = enc.ids
                n, at = len(piece_ids), len(ids)
                if piece.whole is not None:
                    if piece.whole.trained:
                        trained.append((at, at + n))
                    parts += [piece.whole.part] * n
                else:
                    piece_trained, piece_parts = _mark_spans(enc, piece.spans, len(piece.text), n)
                    trained += [(at + lo, at + hi) for lo, hi in piece_trained] if at else piece_trained
                    parts += piece_parts
                if r.max_tokens and at + n > r.max_tokens:  # cut: no EOS after a cut text
                    ids += piece_ids[: max(r.max_tokens - at, 0)]
                    del parts[len(ids) :]
                    continue
                ids += piece_ids
                if piece.append_eos is not None and eos_id is not None and (not piece_ids or piece_ids[-1] != eos_id):
                    ids.append(eos_id)
                    if piece.append_eos.trained:
                        trained.append((len(ids) - 1, len(ids)))
                    parts.append(piece.append_eos.part)
            out.extend(self._finish(index, r, ids, trained, parts))
        return out

    def warnings(self) -> list[str]:
        """Silent mistakes axolotl would only log: said loudly, with the fix."""
        return [f"{note} ({count} times)" for note, count in self.notes.most_common()]

    # -- internals ----------------------------------------------------------------------------
    def _encode_with_mistral_common(self, rows: Iterable[tuple[int, dict]]) -> list[Encoded | Dropped]:
        """Chat rows through mistral-common: it gives the ids and where each turn is; labels are made by
        build_labels and the samples kept or dropped by axolotl's rules (_finish), as for every other row."""
        from training.mistral_chat import Unencodable

        out: list[Encoded | Dropped] = []
        for index, row in rows:
            if isinstance(row, LineProblem):
                out.append(Dropped(index, "invalid", f"{row.field}: {row.message}" if row.field else row.message))
                continue
            problems = self.check(row)
            if problems:
                detail = "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in problems)
                out.append(Dropped(index, "invalid", detail))
                continue
            try:
                enc = self.mistral.encode(row)
            except Unencodable as exc:
                out.append(Dropped(index, "unrenderable", str(exc)))
                continue
            out.extend(self._finish(index, Rendered([], enc.names), enc.ids, enc.trained, enc.parts))
        return out

    def _finish(self, index: int, r: Rendered, ids, trained, parts) -> list[Encoded | Dropped]:
        if not ids:
            return [Dropped(index, "empty", "the row produced no tokens")]
        labels = build_labels(ids, trained, self.masked_ids)
        if not r.split_every:  # the common case: one sample, no copies
            return [self._sample(Encoded(index, ids, labels, parts, r.parts))]
        return [
            self._sample(Encoded(index, ids[lo:hi], labels[lo:hi], parts[lo:hi], r.parts, chunk=chunk))
            for chunk, (lo, hi) in enumerate(
                (s, min(s + r.split_every, len(ids))) for s in range(0, len(ids), r.split_every)
            )
        ]

    def _sample(self, sample: Encoded) -> Encoded | Dropped:
        """Axolotl's rules on one sample: too short or all masked is dropped; too long is dropped,
        truncated or an error, as excess_length_strategy says."""
        length, limit = len(sample.input_ids), self.settings.sequence_len
        if length < MIN_SAMPLE_TOKENS:
            return Dropped(sample.row, "too_short", f"{length} token(s): nothing to predict", sample)
        if length > limit:
            strategy = self.settings.excess_length_strategy
            if strategy == "raise":
                raise SequenceTooLong(
                    f"line {sample.row + 1}: {length} tokens > sequence_len {limit} "
                    "(excess_length_strategy: raise; use drop or truncate to go on)"
                )
            if strategy == "drop":
                return Dropped(sample.row, "too_long", f"{length} tokens > sequence_len {limit}", sample)
            sample = Encoded(
                sample.row,
                sample.input_ids[:limit],
                sample.labels[:limit],
                sample.token_parts[:limit],
                sample.parts,
                truncated=True,
                chunk=sample.chunk,
            )
        if sample.trained_tokens == 0:
            return Dropped(sample.row, "no_trained_tokens", "every token is masked", sample)
        return sample


def _mistral_chat(tokenizer, spec: DatasetSpec, train_on_inputs: bool):
    from training.mistral_chat import MistralChat, is_mistral_common

    if not is_mistral_common(tokenizer):
        return None
    if spec.format_name != "chat_template":
        raise ValueError(
            f"the mistral-common tokenizer encodes conversations only, not type: {spec.type} rows; "
            "remove tokenizer_use_mistral_common to use the model's tokenizer.json"
        )
    return MistralChat(tokenizer, spec, train_on_inputs)


def _check_end_token_policies(spec, template: str, eot_tokens: list[str] | None, eos: str | None) -> None:
    """Axolotl's rule: with eot_tokens other than just the eos token, the eos token among those the
    template uses, and train_on_eos differing from train_on_eot, each pass would contradict the other."""
    if not eot_tokens or eot_tokens == [eos]:
        return
    used = [t for t in eot_tokens if t in template]
    if eos in used and spec.eot_policy != spec.train_on_eos:
        raise ValueError(
            f"train_on_eos ({spec.train_on_eos}) and train_on_eot ({spec.eot_policy}) disagree about {eos}, which "
            "is both the eos token and one of eot_tokens: make them equal or take the eos token out of eot_tokens"
        )


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


def _offsets_fallback(encoding, start: int, end: int, offsets_cache: list) -> tuple[int, int]:
    """Tokens [lo, hi) overlapping characters [start, end), from the offsets: for characters no token
    covers (normalized away), where char_to_token has no answer."""
    if not offsets_cache:
        offsets = encoding.offsets
        offsets_cache += [[o[0] for o in offsets], [o[1] for o in offsets]]
    starts, ends = offsets_cache
    return bisect_right(ends, start), bisect_left(starts, end)


def _token_range(encoding, start: int, end: int, text_len: int, n: int, offsets_cache: list) -> tuple[int, int]:
    """Tokens [lo, hi) overlapping characters [start, end)."""
    lo = encoding.char_to_token(start)
    # The first token of the character after the range; if it also covers characters inside the
    # range (a merge across the boundary) it overlaps, so it counts.
    hi = encoding.char_to_token(end) if end < text_len else n
    if hi is not None and hi < n and encoding.token_to_chars(hi)[0] < end:
        hi += 1
    if lo is None or hi is None:
        return _offsets_fallback(encoding, start, end, offsets_cache)
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


def _mark_spans(encoding, spans, text_len: int, n: int) -> tuple[list[tuple[int, int]], list[int]]:
    """For a piece of n tokens: the token ranges [lo, hi) that overlap a trained span (spans only
    ever add training), and per token the part of the first span it overlaps (-1: template text).
    Hot: one call per row, kept lean."""
    trained: list[tuple[int, int]] = []
    part = [-1] * n
    offsets_cache: list = []
    marked_to = 0
    char_to_token, token_to_chars = encoding.char_to_token, encoding.token_to_chars
    for start, end, is_trained, span_part, around in spans:
        if end <= start:
            continue
        if around is not None:  # training_detail: snapped to the content's tokens as axolotl does
            c_lo, c_hi = _token_range(encoding, around[0], around[1], text_len, n, offsets_cache)
            starts = [max(token_to_chars(i)[0] - around[0], 0) for i in range(c_lo, c_hi)]
            first, last = snap(starts, around[1] - around[0], start - around[0], end - 1 - around[0])
            lo, hi = c_lo + first, c_lo + last + 1
        else:  # _token_range, inlined
            lo = char_to_token(start)
            hi = char_to_token(end) if end < text_len else n
            if hi is not None and hi < n and token_to_chars(hi)[0] < end:
                hi += 1
            if lo is None or hi is None:
                lo, hi = _offsets_fallback(encoding, start, end, offsets_cache)
        width = hi - lo
        if width > 0:
            if is_trained:
                trained.append((lo, hi))
            if lo >= marked_to:  # past every token marked so far (spans in order): all free
                part[lo:hi] = [span_part] * width
            elif -1 in part[lo:hi]:
                part[lo:hi] = [span_part if p == -1 else p for p in part[lo:hi]]
            marked_to = max(marked_to, hi)
    return trained, part
