"""Encodes one large JSONL file across processes, in byte-range chunks, with the output in file order.

Python renders ~30k rows/s on one core; the Rust tokenizer alone can't fill the others. For a file over
`MIN_BYTES` (1 MB: ~4k chat rows), `trainyard preprocess` forks workers that each hold the parent's Encoder (nothing is
pickled but the chunk bounds and the results), read their own byte range, number rows from the line
the range starts on (counted once by the parent), and write their samples to a part file; the parent
appends the parts in order, so `--jsonl` output, stats and problems equal the one-process run's.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from training.encode import Encoded, Encoder, EncodeStats
from training.rows import BOM, _bounded_lines, parse_line

# Below this a second process costs more than it saves. A process without transformers has a small
# heap (fork and a pool of 2 take ~10-50 ms here), while 1 MB is ~0.2 s of Python. Measured
# (bench/preprocess.py's 20k rows, 4.5 MB, 2 cores): 1.39 s in one process, 1.17 s in two.
MIN_BYTES = 2**20
# ... and with torch or transformers loaded (a processor for image rows, a tokenizer transformers must
# load): a big heap to fork, and threads that forked children must not inherit in use.
MIN_BYTES_HEAVY = 32 * 2**20
CHUNK_BYTES = 16 * 2**20  # per task: several per worker, so a slow chunk doesn't idle the others
MIN_CHUNK_BYTES = 256 * 2**10  # at least this per task: its result and scheduling then cost little
READ_BLOCK = 2**22

_ENCODER: Encoder | None = None  # the parent's, inherited by fork


@dataclass
class ChunkResult:
    stats: EncodeStats
    problems: list[tuple[int, str]]  # (row number, message) of invalid rows
    notes: Counter
    part: str | None  # the part file of `--jsonl` lines, or None


def jsonl_worth_splitting(path: Path, workers: int) -> bool:
    """A plain (not gzip, not a JSON array) JSONL file big enough to pay for more processes."""
    heavy = "torch" in sys.modules or "transformers" in sys.modules
    if workers < 2 or not path.is_file() or path.stat().st_size < (MIN_BYTES_HEAVY if heavy else MIN_BYTES):
        return False
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(BOM).lstrip()
    return not head.startswith((b"\x1f\x8b", b"["))


def plan_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[int, int, int]]:
    """(start, stop, number of the first line) per chunk; chunks end after a newline."""
    size = path.stat().st_size
    bounds = [0]
    with path.open("rb") as f:
        while bounds[-1] + chunk_bytes < size:
            f.seek(bounds[-1] + chunk_bytes)
            f.readline()  # to the end of the line the cut falls in
            if f.tell() >= size:
                break
            bounds.append(f.tell())
        bounds.append(size)
        chunks, line = [], 1
        for start, stop in zip(bounds, bounds[1:]):
            chunks.append((start, stop, line))
            f.seek(start)
            left = stop - start
            while left > 0:  # newlines in the chunk: the next one's first line number
                block = f.read(min(READ_BLOCK, left))
                line += block.count(b"\n")
                left -= len(block)
    return chunks


def _encode_chunk(task: tuple[str, int, int, int, str | None]) -> ChunkResult:
    path, start, stop, first_line, part = task
    encoder = _ENCODER
    assert encoder is not None, "workers are forked from a parent that set the encoder"
    notes_before = Counter(encoder.notes)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(stop - start)
    if start == 0 and data.startswith(BOM):
        data = data[len(BOM) :]

    def items():
        for k, raw in enumerate(_bounded_lines(io.BytesIO(data).readline)):
            number = first_line + k
            parsed = parse_line(raw, number)
            if parsed is not None:  # a blank line
                yield number, parsed

    stats, problems = EncodeStats(), []
    out = open(part, "w", encoding="utf-8") if part else None
    try:
        for outcome in encoder.encode_numbered(items(), stats):
            if not isinstance(outcome, Encoded):
                if outcome.reason == "invalid":
                    problems.append((outcome.row + 1, outcome.detail))
                continue
            if out:
                out.write(
                    json.dumps({"row": outcome.row, "input_ids": outcome.input_ids, "labels": outcome.labels}) + "\n"
                )
    finally:
        if out:
            out.close()
    return ChunkResult(stats, problems, encoder.notes - notes_before, part)


def _worker_start(fill: bool) -> None:
    """When the workers fill the cores, each one's Rust tokenizer runs on its own thread: a thread pool in
    every worker only fights over the same cores. Measured (20k chat rows, 2 cores, 2 workers): 1.07 s
    against 1.14 s with each worker's tokenizer on both cores (one process: 1.31 s)."""
    if fill:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the Rust side at each batch


def chunk_bytes(size: int, workers: int) -> int:
    """At least 4 chunks a worker, so the last ones don't leave workers idle (43 MB in 16 MB chunks on 2
    workers ran its third chunk alone)."""
    return min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, size // (4 * workers)))


def encode_file_parallel(encoder: Encoder, path: Path, workers: int, jsonl: bool):
    """ChunkResults in file order, computed by `workers` forked processes."""
    global _ENCODER
    chunks = plan_chunks(path, chunk_bytes(path.stat().st_size, workers))
    parts = tempfile.mkdtemp(prefix="trainyard-parts-")
    tasks = [
        (str(path), start, stop, line, os.path.join(parts, f"{k:06d}.jsonl") if jsonl else None)
        for k, (start, stop, line) in enumerate(chunks)
    ]
    _ENCODER = encoder
    fill = workers >= (os.cpu_count() or 1)
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(tasks)), _worker_start, (fill,)) as pool:
            yield from pool.imap(_encode_chunk, tasks)
    finally:
        _ENCODER = None
        for name in os.listdir(parts):
            os.unlink(os.path.join(parts, name))
        os.rmdir(parts)


def merge_stats(total: EncodeStats, part: EncodeStats) -> None:
    total.rows += part.rows
    total.samples += part.samples
    total.dropped.update(part.dropped)
    total.truncated += part.truncated
    total.tokens += part.tokens
    total.trained_tokens += part.trained_tokens
    total.lengths.update(part.lengths)


def count_bins(lengths: Counter, sequence_len: int) -> int:
    """How many bins `training.packing.pack` fills with samples of these lengths (length -> count; its
    first-fit decreasing, on lengths alone: the CLI's figures need no token ids)."""
    from training.packing import _Rooms

    rooms, bins = _Rooms(), 0
    for n in sorted(lengths, reverse=True):
        for _ in range(lengths[n]):
            b = rooms.leftmost(n)
            if b < 0:
                b = rooms.append(sequence_len)
                bins += 1
            rooms.take(b, n)
    return bins
