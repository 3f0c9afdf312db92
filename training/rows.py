"""The one reader of JSON-lines dataset files (JSONL, .jsonl.gz, JSON arrays), used by the upload, the CLI
and the trainer: bounded by the row size limit, a BOM skipped, broken lines reported with their number."""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MAX_LINE_BYTES = 8 * 1024 * 1024
BOM = codecs.BOM_UTF8  # editors on Windows save it; the data starts after it
READ_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LineProblem:
    line: int  # 1-based line (JSONL), item (JSON array) or row (Parquet, CSV, Arrow, Hub)
    field: str  # "" when the whole line is at fault
    message: str
    unit: str = "line"  # how `line` is counted: "line" or "row"

    def __str__(self) -> str:
        return f"{self.unit} {self.line}: {self.field + ': ' if self.field else ''}{self.message}"


class FileRefused(ValueError):
    """The file as a whole can't be read (a damaged archive, an archive bomb)."""


@dataclass(frozen=True)
class Overlong:
    """A line over MAX_LINE_BYTES: skipped, never held whole; only its real size is kept, for the message."""

    size: int  # bytes, the newline included


def too_long(line: int, size: int) -> LineProblem:
    return LineProblem(line, "", f"line is {size:,} bytes, over the {MAX_LINE_BYTES:,}-byte limit")


def open_binary(path: Path) -> IO[bytes]:
    path = Path(path)
    with path.open("rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else path.open("rb")


def parse_line(raw: bytes | Overlong, line: int) -> dict | LineProblem | None:
    """One JSONL line -> the row, a problem, or None for a blank line."""
    if isinstance(raw, Overlong):
        return too_long(line, raw.size)
    if len(raw) > MAX_LINE_BYTES:
        return too_long(line, len(raw))
    if line == 1 and raw.startswith(BOM):
        raw = raw[len(BOM) :]
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


def read_json_lines(raw: IO[bytes], *, inflated_limit: int | None = None) -> Iterator[tuple[int, bytes | LineProblem]]:
    """(1-based line, its bytes) for every line of a JSONL file (blank ones too: parse_line skips them),
    or (item number, the item as one JSON line) for a JSON array, read as a stream either way: no more
    than one row (MAX_LINE_BYTES) is held at a time. A gzip file is read through; with `inflated_limit`
    (an upload) it is refused once more than that came out of it. A leading BOM is skipped."""
    head = raw.read(2)
    raw.seek(0)
    if head == b"\x1f\x8b":
        f: IO[bytes] = gzip.GzipFile(fileobj=raw)
        gz, guard = True, inflated_limit
    else:
        f, gz, guard = raw, False, None
    try:
        start = f.read(len(BOM))
        if start != BOM:
            f.seek(0)  # gzip files can seek back within what they have read
        first = f.read(1)
        while first and first in b" \t\r\n":
            first = f.read(1)
    except (EOFError, OSError, zlib.error) as exc:
        if not gz:
            raise
        raise FileRefused(f"the .gz file is damaged: {exc}") from None
    if first == b"[":
        yield from _array_items(f, gz, guard)
        return
    f.seek(len(BOM) if start == BOM else 0)
    for number, line in enumerate(_bounded_lines(f.readline, gz, guard), start=1):
        yield number, too_long(number, line.size) if isinstance(line, Overlong) else line


def read_rows(path: Path) -> Iterator[tuple[int, dict | LineProblem]]:
    """(1-based line, row or problem) for each non-blank line, streaming; JSON arrays item by item."""
    with Path(path).open("rb") as f:
        try:
            for line, raw in read_json_lines(f):
                parsed = raw if isinstance(raw, LineProblem) else parse_line(raw, line)
                if parsed is not None:
                    yield line, parsed
        except FileRefused as exc:
            yield 1, LineProblem(1, "", str(exc))


def _bounded_lines(readline, gz: bool = False, inflated_limit: int | None = None) -> Iterator[bytes | Overlong]:
    """The file's lines, never holding more than MAX_LINE_BYTES of one: a longer line is skipped to its
    end, counting its bytes, and passed on as Overlong (its real size; parse_line reports it)."""
    inflated, archive = 0, inflated_limit is not None

    def read(size: int) -> bytes:
        nonlocal inflated
        try:
            chunk = readline(size)
        except (EOFError, OSError, zlib.error) as exc:
            if not gz:
                raise
            raise FileRefused(f"the .gz file is damaged: {exc}") from None  # truncated or corrupt
        inflated += len(chunk)
        if archive and inflated > inflated_limit:
            raise FileRefused(
                f"the .gz file inflates to more than {inflated_limit:,} bytes: refused as an archive bomb"
            )
        return chunk

    while True:
        line = read(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            size = len(line)
            while rest := read(READ_CHUNK):
                size += len(rest)
                if rest.endswith(b"\n"):
                    break
            yield Overlong(size)
            continue
        yield line


def _array_items(f: IO[bytes], gz: bool, inflated_limit: int | None) -> Iterator[tuple[int, bytes | LineProblem]]:
    """The items of a JSON array (its `[` already read), each re-written as one JSON line, decoded
    from a buffer that never holds much more than one item."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof, inflated, item = "", 0, False, 0, 0

    def fill() -> None:
        nonlocal buf, pos, eof, inflated
        try:
            chunk = f.read(READ_CHUNK)
        except (EOFError, OSError, zlib.error) as exc:
            if not gz:
                raise
            raise FileRefused(f"the .gz file is damaged: {exc}") from None
        inflated += len(chunk)
        if inflated_limit is not None and inflated > inflated_limit:
            raise FileRefused(
                f"the .gz file inflates to more than {inflated_limit:,} bytes: refused as an archive bomb"
            )
        eof = not chunk
        buf = buf[pos:] + utf8.decode(chunk, final=eof)
        pos = 0

    def skip_space() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos] if pos < len(buf) else ""
            fill()

    try:
        expect_value = True  # after `[` or `,`
        while True:
            c = skip_space()
            if c == "]" and (item == 0 or not expect_value):
                return
            if not expect_value:
                if c != ",":
                    yield (
                        item + 1,
                        LineProblem(item + 1, "", f"invalid JSON array: expected ',' or ']' after item {item}"),
                    )
                    return
                pos += 1
                expect_value = True
                continue
            if c == "":
                yield item + 1, LineProblem(item + 1, "", "invalid JSON array: the file ends inside the array")
                return
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as exc:
                    if eof:
                        yield item + 1, LineProblem(item + 1, "", f"invalid JSON: {exc.msg}")
                        return
                    if len(buf) - pos > MAX_LINE_BYTES:
                        yield (
                            item + 1,
                            LineProblem(
                                item + 1, "", f"item is over the {MAX_LINE_BYTES:,}-byte limit (or not valid JSON)"
                            ),
                        )
                        return
                    fill()
                    continue
                if end == len(buf) and not eof and isinstance(value, (int, float)):
                    fill()  # a number may go on in the next chunk
                    continue
                break
            pos = end
            item += 1
            expect_value = False
            yield item, json.dumps(value, ensure_ascii=False).encode("utf-8") + b"\n"
    except UnicodeDecodeError as exc:
        yield item + 1, LineProblem(item + 1, "", f"not UTF-8 text: {exc.reason}")
