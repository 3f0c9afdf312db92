"""Rows in: validate an upload's (or a Hub import's) rows one by one and keep them as a content-addressed
Dataset. Whatever the file (JSONL, JSON, .gz, Parquet, CSV), it is streamed once through training's bounded
readers and stored as JSONL; nothing is kept unless it is stored whole."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from django.conf import settings
from django.db import IntegrityError, transaction

from training import rows as row_format
from training import sources
from training.config import DatasetSpec
from training.formats import FORMATS, detect_format
from training.formats.chat_template import detect_layout
from training.rows import LineProblem, parse_line
from webapp.datasets import images
from webapp.datasets.models import Dataset, dataset_dir
from webapp.datasets.storage import install_content, install_rejected
from webapp.http import MAX_NAME, download_name
from webapp.workspaces.models import SiteSettings

MAX_PROBLEMS_SHOWN = 100
REJECTED_NOTE = "trainyard_note"  # the key of a note line in the rejected-lines download
GZIP_MAX_RATIO = 200  # refuse archives that inflate beyond this: a 1 MB bomb must not fill the disk


@dataclass
class ValidationReport:
    format: str | None = None
    format_options: dict = field(default_factory=dict)  # e.g. ShareGPT: field_messages, role/content keys
    rows: int = 0
    problems: list[LineProblem] = field(default_factory=list)  # the first MAX_PROBLEMS_SHOWN
    counts: Counter = field(default_factory=Counter)  # by reason
    unit: str = "line"  # how problems are numbered: "line" (JSONL, JSON array items) or "row" (Parquet, CSV)
    images: int = 0  # images stored in the rows (webapp/datasets/images.py)

    @property
    def by_reason(self) -> list[tuple[str, int]]:
        return self.counts.most_common()

    @property
    def invalid(self) -> int:
        return sum(self.counts.values())

    def add(self, problem: LineProblem) -> None:
        self.counts[reason_of(problem)] += 1
        if len(self.problems) < MAX_PROBLEMS_SHOWN:
            self.problems.append(problem)


def reason_of(problem: LineProblem) -> str:
    """A short category for counting problems by reason."""
    message = problem.message
    for needle, reason in (
        ("invalid JSON", "invalid JSON"),
        ("not UTF-8", "not UTF-8"),
        ("expected a JSON object", "not an object"),
        ("byte limit", "line too long"),
        ("cells where the header", "wrong number of cells"),
        ("can't read the", "unreadable file"),
        ("empty message list", "empty message list"),
        ("unknown role", "unknown role"),
        ("empty content", "empty content"),
        ("can't tell", "unknown format"),
        ("missing", "missing field"),
        ("must be", "mistyped field"),
        ("empty", "empty field"),
    ):
        if needle in message:
            return reason
    return "other"


class UploadRejected(ValueError):
    """An upload refused, saying why; `field` names the part of the request at fault ("file": its rows,
    size or packaging; "name"; "format"), so a client can point at it."""

    def __init__(self, message: str, report: ValidationReport | None = None, field: str = "file"):
        super().__init__(message)
        self.report = report
        self.field = field


@dataclass
class UploadResult:
    dataset: Dataset
    duplicate: bool
    report: ValidationReport


def _upload_rows(raw: IO[bytes], size: int, filename: str):
    """Whatever the file (JSONL, .jsonl.gz, a JSON array, Parquet, CSV, a .zip of one of them with its images),
    its rows as JSON lines, read as a stream through training's readers: (how rows are counted, (number, JSON
    line or problem), the reader of the images its rows name). Parquet goes by record batch, so a 1 GB file
    never sits in memory."""
    head = raw.read(4)
    raw.seek(0)
    name = filename.lower()
    # A .gz (or .zip) upload is refused once it inflates past this: a 1 MB bomb must not fill the disk.
    inflated_limit = max(max(size, 1) * GZIP_MAX_RATIO, 64 * 2**20)
    if images.is_zip(head, name):
        upload = images.ZipUpload(raw, inflated_limit)
        data, data_size = upload.extract_data()
        unit, items, _ = _upload_rows(data, data_size, upload.data_name)
        return unit, items, upload.read
    if head == b"PAR1" or name.endswith(".parquet"):
        return "row", _as_lines(sources.read_parquet(raw)), images.no_files
    if name.endswith(".csv"):
        return "row", _csv_lines(raw), images.no_files
    return "line", row_format.read_json_lines(raw, inflated_limit=inflated_limit), images.no_files


def _csv_lines(raw: IO[bytes]) -> Iterator[tuple[int, bytes | LineProblem]]:
    text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")  # -sig: a BOM is skipped
    try:
        yield from _as_lines(sources.csv_rows(text))
    finally:
        text.detach()  # the upload stays open: its owner closes it


def _as_lines(rows) -> Iterator[tuple[int, bytes | LineProblem]]:
    for number, row in rows:
        yield number, row if isinstance(row, LineProblem) else sources.json_line(row)


def validate_and_store(raw: IO[bytes], size: int, format_override: str | None, filename: str = "dataset.jsonl"):
    """Stream `raw` once: validate each row, hash and index what would be stored (as JSONL, whatever
    the upload's own format). Returns (report, temp path of the clean JSONL, sha256, stored size,
    line-offset index, temp path of rejected lines)."""
    try:
        unit, items, read = _upload_rows(raw, size, filename)
    except row_format.FileRefused as exc:
        raise UploadRejected(str(exc)) from None
    report = ValidationReport(format=format_override, unit=unit)
    spec: DatasetSpec | None = (
        DatasetSpec(path="upload", type=format_override)
        if format_override and format_override != "chat_template"
        else None
    )  # a chat file's layout (messages / ShareGPT) is read from its first row
    tmp_dir = dataset_dir()
    clean = tempfile.NamedTemporaryFile("wb", dir=tmp_dir, suffix=".part", delete=False)
    rejected = tempfile.NamedTemporaryFile("wb", dir=tmp_dir, suffix=".rejected.part", delete=False)
    digest, offsets, written = hashlib.sha256(), array("q"), 0
    try:
        for line_no, line in items:
            parsed = line if isinstance(line, LineProblem) else parse_line(line, line_no)
            if parsed is None:
                continue
            problems: list[LineProblem] = []
            if isinstance(parsed, LineProblem):
                problems = [replace(parsed, unit=unit)]
            else:
                if spec is None:
                    detected = format_override or detect_format(parsed)
                    if detected is None:
                        problems = [
                            LineProblem(
                                line_no,
                                "",
                                "can't tell the format: expected `messages`, "
                                "`instruction`+`output`, `text` or `segments`",
                                unit,
                            )
                        ]
                    else:
                        report.format = detected
                        report.format_options = detect_layout(parsed) if detected == "chat_template" else {}
                        spec = DatasetSpec(path="upload", type=detected, **report.format_options)
                if spec is not None and not problems:
                    count = 0
                    if images.carries_images(parsed, spec):  # stored with its images in the row
                        stored, count, found = images.stored_row(parsed, spec, read)
                    else:
                        found = FORMATS[spec.format_name].check(parsed, spec)
                    problems = [LineProblem(line_no, p.field, p.message, unit) for p in found]
                    if count and not problems:
                        line, report.images = sources.json_line(stored), report.images + count
            if problems:
                for p in problems:
                    report.add(p)
                rejected.write(rejected_line(line))
                continue
            if line_no == 1 and line.startswith(row_format.BOM):
                line = line[len(row_format.BOM) :]
            if not line.endswith(b"\n"):
                line += b"\n"
            report.rows += 1
            offsets.append(written)
            clean.write(line)
            digest.update(line)
            written += len(line)
        clean.close()
        rejected.close()
    except row_format.FileRefused as exc:
        _discard(clean, rejected)
        raise UploadRejected(str(exc)) from None
    except BaseException:
        _discard(clean, rejected)
        raise
    return report, Path(clean.name), digest.hexdigest(), written, offsets, Path(rejected.name)


def rejected_line(line: bytes | LineProblem) -> bytes:
    """What the rejected-lines download holds for a refused item: the line as uploaded, or, for one the
    reader never held whole (over the size limit, an unreadable record), a JSON note saying so in its
    place: never a line cut mid-way, never a silent gap."""
    if isinstance(line, LineProblem):
        note = f"{line} (left out of this file: only lines read whole are copied here)"
        return json.dumps({REJECTED_NOTE: note}, ensure_ascii=False).encode("utf-8") + b"\n"
    return line if line.endswith(b"\n") else line + b"\n"


def _discard(*files) -> None:
    for f in files:
        f.close()
        Path(f.name).unlink(missing_ok=True)


def upload_limit() -> int:
    """Bytes one upload may have: the site setting (MB) if an admin set one, else the environment's."""
    site = SiteSettings.current()
    return site.max_upload_mb * 1024 * 1024 if site.max_upload_mb else settings.TRAINYARD_MAX_UPLOAD_BYTES


def store_dataset(
    workspace,
    user,
    file: IO[bytes],
    size: int,
    filename: str,
    *,
    name: str | None = None,
    format: str | None = None,
    keep_valid: bool = False,
) -> UploadResult:
    """Validate rows read from `file` and keep them as a content-addressed Dataset (an upload, or a Hub
    import's rows): nothing is kept unless it is stored whole."""
    report, clean, sha, stored_size, offsets, rejected = validate_and_store(file, size, format, filename)
    try:
        if report.rows == 0 and not report.invalid:  # nothing to fix line by line: no table, no advice
            raise UploadRejected("no rows in the file: it is empty (or holds only blank lines)")
        if report.invalid and not keep_valid:
            raise UploadRejected(f"{report.invalid} invalid {report.unit}(s)", report)
        if report.rows == 0:
            raise UploadRejected("no valid row in the file", report)
        existing = Dataset.objects.filter(workspace=workspace, sha256=sha).first()
        if existing:
            return UploadResult(existing, True, report)
        install_content(clean, sha, offsets)
        stem = re.sub(r"(\.(jsonl|json|parquet|csv))?(\.gz)?$", "", filename, flags=re.IGNORECASE)
        base = name.strip() if name else download_name(stem)[: MAX_NAME - 10] or "dataset"
        with transaction.atomic():
            dataset = _create_with_unique_name(
                workspace=workspace,
                base=base,
                original_filename=filename,
                sha256=sha,
                size=stored_size,
                format=report.format,
                format_options=report.format_options,
                rows=report.rows,
                rejected_rows=report.invalid,
                images=report.images,
                created_by=user,
            )
        if report.invalid:
            install_rejected(dataset, rejected)
        return UploadResult(dataset, False, report)
    finally:
        clean.unlink(missing_ok=True)
        rejected.unlink(missing_ok=True)


def _create_with_unique_name(*, workspace, base: str, **fields) -> Dataset:
    for n in range(1, 1000):
        candidate = base if n == 1 else f"{base}-{n}"
        if not Dataset.objects.filter(workspace=workspace, name=candidate).exists():
            try:
                with transaction.atomic():
                    return Dataset.objects.create(workspace=workspace, name=candidate, **fields)
            except IntegrityError:
                continue
    raise UploadRejected("could not find a free dataset name", field="name")
