"""A stored dataset's files: rows read by byte offset, in order or by search; files put in place and removed.

The ground floor of the datasets app: it knows where a Dataset's content-addressed JSONL file, its
offset index and its rejected lines live, and nothing of uploads, encoders or the queue.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings

from webapp.datasets.models import Dataset, dataset_dir


def read_row(dataset: Dataset, index: int) -> dict:
    """Row `index` (0-based) by byte offset: no scan of the file before it."""
    if not 0 <= index < dataset.rows:
        raise IndexError(f"row {index} is out of range (0..{dataset.rows - 1})")
    offsets = array("q")
    with dataset.index_path.open("rb") as f:
        f.seek(index * offsets.itemsize)
        offsets.frombytes(f.read(offsets.itemsize))
    with dataset.path.open("rb") as f:
        f.seek(offsets[0])
        return json.loads(f.readline())


def iter_rows(dataset: Dataset) -> Iterator[dict]:
    """Every stored row in order (stored files hold only valid JSON objects, one per line)."""
    with dataset.path.open("rb") as f:
        for line in f:
            yield json.loads(line)


def first_rows(dataset: Dataset, n: int = 5) -> list[dict]:
    rows = []
    for row in iter_rows(dataset):
        rows.append(row)
        if len(rows) >= n:
            break
    return rows


def search_rows(dataset: Dataset, text: str, limit: int = 20) -> list[int]:
    """Indexes of rows whose JSON contains `text` (case-insensitive), streaming the file."""
    needle = text.lower().encode("utf-8")
    escaped = json.dumps(text.lower(), ensure_ascii=True)[1:-1].encode()  # as it is written in JSON
    found = []
    with dataset.path.open("rb") as f:
        for index, line in enumerate(f):
            low = line.lower()
            if needle in low or escaped in low:
                found.append(index)
                if len(found) >= limit:
                    break
    return found


def install_content(clean: Path, sha256: str, offsets: array) -> None:
    """Put a validated JSONL file (and its line-offset index) at its content address. Atomic per file:
    a reader sees the old file or the whole new one."""
    os.replace(clean, dataset_dir() / f"{sha256}.jsonl")
    with (dataset_dir() / f"{sha256}.idx").open("wb") as f:
        offsets.tofile(f)


def install_rejected(dataset: Dataset, rejected: Path) -> None:
    dataset.rejected_path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(rejected, dataset.rejected_path)


def files_of(dataset: Dataset, *, content: bool) -> list[Path]:
    """What deleting `dataset` removes: its rejected lines, and its content when no other dataset shares it."""
    return [dataset.rejected_path] + ([dataset.path, dataset.index_path] if content else [])


def hub_cache_dir() -> Path:
    """Where Hub datasets are downloaded (on a host with network access) and read from offline."""
    return settings.DATA_DIR / "hub-datasets"


def rejected_lines_download(dataset: Dataset):
    """The lines refused at upload, as a JSONL attachment (the page and the API serve the same file)."""
    from django.http import FileResponse, Http404

    from webapp.http import download_name

    if not dataset.rejected_path.exists():
        raise Http404("no rejected lines")
    name = download_name(f"{dataset.name}.rejected.jsonl")
    return FileResponse(dataset.rejected_path.open("rb"), as_attachment=True, filename=name)
