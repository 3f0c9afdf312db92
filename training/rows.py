"""Reads dataset files row by row (JSONL, .jsonl.gz, JSON arrays), reporting broken lines with their number."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MAX_LINE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class LineProblem:
    line: int  # 1-based line (JSONL) or item number (JSON array)
    field: str  # "" when the whole line is at fault
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field + ': ' if self.field else ''}{self.message}"


def open_binary(path: Path) -> IO[bytes]:
    path = Path(path)
    with path.open("rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else path.open("rb")


def parse_line(raw: bytes, line: int) -> dict | LineProblem | None:
    """One JSONL line -> the row, a problem, or None for a blank line."""
    if len(raw) > MAX_LINE_BYTES:
        return LineProblem(line, "", f"line is {len(raw):,} bytes, over the {MAX_LINE_BYTES:,}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return LineProblem(line, "", f"not UTF-8 text (byte {exc.start + 1} is 0x{raw[exc.start]:02x})")
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return LineProblem(line, "", f"invalid JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(row, dict):
        return LineProblem(line, "", f"expected a JSON object, got {type(row).__name__}")
    return row


def read_rows(path: Path) -> Iterator[tuple[int, dict | LineProblem]]:
    """(1-based line, row or problem) for each non-blank line, streaming; JSON arrays item by item."""
    with open_binary(path) as f:
        first = f.read(1)
        while first and first in b" \t\r\n":
            first = f.read(1)
        if first == b"[":
            f.seek(0)
            try:
                items = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield 1, LineProblem(1, "", f"invalid JSON array: {exc}")
                return
            for i, item in enumerate(items, start=1):
                yield i, item if isinstance(item, dict) else LineProblem(i, "", "expected a JSON object")
            return
        f.seek(0)
        for line, raw in enumerate(f, start=1):
            parsed = parse_line(raw, line)
            if parsed is not None:
                yield line, parsed
