"""Dataset statistics: lengths, drops and trained-token ratio under the trainer's own encoder."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from training.encode import Dropped, Encoded
from webapp.datasets.encoding import EncodeOptions, make_encoder
from webapp.datasets.models import Dataset
from webapp.datasets.storage import iter_rows

MAX_DROPPED_LISTED = 1000
PROGRESS_EVERY = 2000


def field_summary(rows_seen: Counter, keys: Counter, roles: Counter, messages: int) -> dict:
    summary = {"keys": {k: round(v / max(rows_seen["rows"], 1), 3) for k, v in keys.most_common(20)}}
    if roles:
        summary["roles"] = dict(roles.most_common())
        summary["messages_per_row"] = round(messages / max(rows_seen["rows"], 1), 2)
    return summary


def compute_stats(dataset: Dataset, options: EncodeOptions, progress: Callable[[int], None]) -> dict:
    encoder = make_encoder(dataset, options)
    lengths: list[int] = []
    dropped: Counter = Counter()
    dropped_rows: list[dict] = []
    tokens = trained = 0
    keys, roles, seen = Counter(), Counter(), Counter()
    messages = 0

    def rows():
        nonlocal messages
        for index, row in enumerate(iter_rows(dataset)):
            seen["rows"] += 1
            keys.update(row.keys())
            msgs = row.get("messages") or row.get("conversations")
            if isinstance(msgs, list):
                messages += len(msgs)
                roles.update(str(m.get("role", m.get("from"))) for m in msgs if isinstance(m, dict))
            if index and index % PROGRESS_EVERY == 0:
                progress(index)
            yield index, row

    for outcome in encoder.encode_stream(rows()):
        sample = outcome.sample if isinstance(outcome, Dropped) else outcome
        if sample is not None:
            lengths.append(len(sample.input_ids))
        if isinstance(outcome, Encoded):
            tokens += len(outcome.input_ids)
            trained += outcome.trained_tokens
        else:
            dropped[outcome.reason] += 1
            if len(dropped_rows) < MAX_DROPPED_LISTED:
                dropped_rows.append({"row": outcome.row, "reason": outcome.reason, "detail": outcome.detail})
    return {
        "rows": seen["rows"],
        "lengths": _histogram(lengths),
        "max_length": max(lengths, default=0),
        "over_sequence_len": sum(1 for n in lengths if n > options.sequence_len),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_ratio": round(trained / tokens, 4) if tokens else 0.0,
        "dropped": dict(dropped),
        "dropped_rows": dropped_rows,
        "fields": field_summary(seen, keys, roles, messages),
        "warnings": encoder.warnings(),
    }


def _histogram(lengths: list[int], bins: int = 40) -> dict:
    """Bin edges and counts (a full list of lengths would not fit a page for big datasets)."""
    if not lengths:
        return {"edges": [], "counts": []}
    top = max(lengths)
    width = max(1, -(-top // bins))
    counts = [0] * (top // width + 1)
    for n in lengths:
        counts[n // width] += 1
    return {"edges": [i * width for i in range(len(counts) + 1)], "counts": counts}
