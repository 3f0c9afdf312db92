"""Where a `datasets:` entry's rows come from (JSONL/JSON, Parquet, CSV, Arrow files, a folder of them or
from `save_to_disk`, a Hub dataset), streamed as (1-based row number, row) with axolotl's `split` slicing.

Every reader is bounded: JSON lines through training.rows, Parquet and Arrow by record batch, CSV by
record. Row numbers are what a user can find: the line of a JSONL file, the item of a JSON array, the
row (1-based, header excluded) of a table.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from training.rows import BOM, MAX_LINE_BYTES, FileRefused, LineProblem, read_json_lines, read_rows

DS_TYPES = ("json", "jsonl", "parquet", "csv", "arrow")
BATCH_ROWS = 1000  # rows per Parquet / Arrow record batch: a few MB at most for chat rows
# The extension decides when ds_type is not given (axolotl's get_dataset_type, which defaults to json).
EXTENSIONS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".jsonl": "json", ".json": "json", ".gz": "json"}
# File names that put a file of a folder in a split, as `datasets` infers them.
SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# datasets' split grammar: name[from:to](rounding), joined with "+"; from/to are rows or percents.
_SLICE = re.compile(
    r"^(?P<split>\w+(?:\.\w+)*)"
    r"(?:\[(?:(?P<from>-?[\d_]+)(?P<from_pct>%)?)?:(?:(?P<to>-?[\d_]+)(?P<to_pct>%)?)?\])?"
    r"(?:\((?P<rounding>[^)]*)\))?$"
)


class SourceError(ValueError):
    """The dataset can't be found or opened; the message says what to do."""


# -- split ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSlice:
    split: str
    start: int | None = None
    stop: int | None = None
    percent: bool = False
    rounding: str = "closest"

    @property
    def whole(self) -> bool:
        return self.start is None and self.stop is None

    def needs_total(self) -> bool:
        return self.percent or any(b is not None and b < 0 for b in (self.start, self.stop))

    def bounds(self, total: int | None) -> tuple[int, int | None]:
        """[start, stop) in rows, as `datasets` computes them (_rel_to_abs_instr); stop None: to the end."""
        if not self.needs_total():
            return self.start or 0, self.stop
        assert total is not None
        if self.percent:
            if self.rounding == "pct1_dropremainder":
                if total < 100:
                    raise SourceError(
                        f"split {self.split!r}: pct1_dropremainder rounding on fewer than 100 rows is always empty"
                    )
                to_abs = lambda b: b * math.trunc(total / 100.0)  # noqa: E731
            else:
                to_abs = lambda b: int(round(b * total / 100.0))  # noqa: E731
            start = 0 if self.start is None else to_abs(self.start)
            stop = total if self.stop is None else to_abs(self.stop)
        else:
            start = self.start or 0
            stop = total if self.stop is None else self.stop
        if start < 0:
            start = max(total + start, 0)
        if stop < 0:
            stop = max(total + stop, 0)
        return min(start, total), min(stop, total)


def parse_split(text: str | None) -> list[SplitSlice]:
    """`train`, `train[:10%]`, `train[100:200]`, `train[-10%:]`, `train[:50%](pct1_dropremainder)`,
    `train[:10]+test[:10]` -> slices; ValueError with the accepted forms otherwise."""
    if text is None or not str(text).strip():
        return [SplitSlice("train")]
    slices = []
    for part in re.split(r"\s*\+\s*", str(text).strip()):
        m = _SLICE.match(part)
        if not m:
            raise ValueError(
                f"split {part!r} is not understood; write a split name with an optional slice: "
                "train, train[:10%], train[100:200], train[10%:20%], train[-1000:]"
            )
        percent = bool(m["from_pct"] or m["to_pct"])
        if (m["from"] and m["to"]) and bool(m["from_pct"]) != bool(m["to_pct"]):
            raise ValueError(f"split {part!r}: both bounds must be rows or both percents")
        start = int(m["from"]) if m["from"] else None
        stop = int(m["to"]) if m["to"] else None
        rounding = m["rounding"]
        if rounding is not None and not percent:
            raise ValueError(f"split {part!r}: a rounding applies to percent slices only")
        if rounding not in (None, "closest", "pct1_dropremainder"):
            raise ValueError(f"split {part!r}: rounding must be closest or pct1_dropremainder")
        if percent and any(b is not None and abs(b) > 100 for b in (start, stop)):
            raise ValueError(f"split {part!r}: percents must be between -100% and 100%")
        slices.append(SplitSlice(m["split"], start, stop, percent, rounding or "closest"))
    return slices


def validate_split(value: str | None) -> str | None:
    """For the config schema: refuse a split `datasets` would not understand, at validation."""
    if value is not None:
        parse_split(value)
    return value


def validate_ds_type(value: str | None) -> str | None:
    if value is not None and value not in DS_TYPES:
        raise ValueError(f"unknown ds_type {value!r}; choose one of {', '.join(DS_TYPES)}")
    return value


# -- sources ----------------------------------------------------------------------------------


@dataclass
class Source:
    """A resolved dataset entry: files of one kind per split, a `save_to_disk` folder, or a Hub id."""

    label: str  # what messages call it: the path or the Hub id
    slices: list[SplitSlice]
    splits: dict[str, list[tuple[Path, str]]] = field(default_factory=dict)  # split -> [(file, kind)]
    any_split: bool = False  # a lone save_to_disk Dataset: whatever the split's name, these rows
    hub_id: str | None = None
    data_files: list[str] | None = None
    raw_split: str | None = None
    cache_dir: Path | None = None

    @property
    def unit(self) -> str:
        """How row numbers are counted: lines for one JSON-lines file, rows otherwise."""
        files = [f for fs in self.splits.values() for f in fs]
        return "line" if self.hub_id is None and len(files) == 1 and files[0][1] == "json" else "row"

    def rows(self) -> Iterator[tuple[int, dict | LineProblem]]:
        """(1-based row number, row or problem) for each row of the split, streaming. With several
        files the numbers go on from file to file, and a problem names its file."""
        if self.hub_id is not None:
            yield from self._hub_rows()
            return
        for s in self.slices:
            files = self._files_of(s.split)
            total = _count(files) if s.needs_total() else None
            start, stop = s.bounds(total)
            if stop is not None and stop <= start:
                continue
            for k, (number, row) in enumerate(_read_files(files)):
                if k < start:
                    continue
                if stop is not None and k >= stop:
                    break
                yield number, row

    def _files_of(self, split: str) -> list[tuple[Path, str]]:
        if self.any_split:
            return next(iter(self.splits.values()))
        if split not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise SourceError(f"{self.label}: no split {split!r} (it has: {known})")
        return self.splits[split]

    def _hub_rows(self) -> Iterator[tuple[int, dict | LineProblem]]:
        dataset = load_hub_dataset(self.hub_id, self.raw_split, self.data_files, self.cache_dir)
        yield from enumerate(dataset, start=1)


def default_cache_dir() -> Path | None:
    """Hub datasets go to the data dir's cache (`TRAINYARD_DATA_DIR/hub-datasets`), else datasets' own."""
    data_dir = os.environ.get("TRAINYARD_DATA_DIR")
    return Path(data_dir) / "hub-datasets" if data_dir else None


def open_source(spec, base_dir: Path | None = None, cache_dir: Path | None = None) -> Source:
    """Resolve a DatasetSpec (path, ds_type, data_files, split) without reading its rows. Cheap: the
    place for "not found" and "not in the cache (offline)" errors, before a model is loaded."""
    slices = parse_split(spec.split)
    ds_type = validate_ds_type(getattr(spec, "ds_type", None))
    data_files = [spec.data_files] if isinstance(spec.data_files, str) else spec.data_files
    path = _resolve(spec.path, base_dir)
    if path.is_file():
        if data_files:
            raise SourceError(f"{spec.path}: data_files names files inside a folder or a Hub dataset, not a file")
        return Source(str(path), slices, {"train": [(path, _kind(path, ds_type))]})
    if path.is_dir():
        return _open_folder(path, ds_type, data_files, slices, base_dir)
    if HUB_ID.match(spec.path) and Path(spec.path).suffix.lower() not in EXTENSIONS:
        cache = check_hub_cache(spec.path, cache_dir or default_cache_dir())
        return Source(spec.path, slices, hub_id=spec.path, data_files=data_files, raw_split=spec.split, cache_dir=cache)
    raise SourceError(f"file {spec.path!r} not found")


def read_source(spec, base_dir: Path | None = None) -> Iterator[tuple[int, dict | LineProblem]]:
    return open_source(spec, base_dir).rows()


def _resolve(path: str, base_dir: Path | None) -> Path:
    """A relative path is read next to the config when it isn't where the command runs."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and base_dir is not None and (base_dir / p).exists():
        return base_dir / p
    return p


def _kind(path: Path, ds_type: str | None) -> str:
    """What a file holds: its first bytes for the binary formats (a stored upload is JSONL whatever
    the config's ds_type says), else ds_type, else the extension, else JSON."""
    with path.open("rb") as f:
        head = f.read(6)
    if head[:4] == b"PAR1":
        return "parquet"
    if head == b"ARROW1" or head[:4] == b"\xff\xff\xff\xff":
        return "arrow"
    if ds_type == "csv":
        return "csv"
    if ds_type in ("parquet", "arrow") and not _looks_like_json(head):
        raise SourceError(f"{path}: ds_type is {ds_type} but the file is not {ds_type.capitalize()}")
    if ds_type in ("json", "jsonl"):
        return "json"
    for suffix in reversed(path.suffixes):
        if suffix.lower() in EXTENSIONS:
            return EXTENSIONS[suffix.lower()]
    return "json"


def _looks_like_json(head: bytes) -> bool:
    """A stored upload (JSONL) named by a config that says ds_type: parquet is still read."""
    head = head.removeprefix(BOM).lstrip()
    return head[:1] in (b"{", b"[") or head[:2] == b"\x1f\x8b" or not head


def _open_folder(folder: Path, ds_type, data_files, slices, base_dir) -> Source:
    if data_files:
        files = []
        for name in data_files:
            if any(c in name for c in "*?["):  # a pattern, as datasets allows: matched inside the folder
                matches = sorted(m for m in folder.glob(name) if m.is_file())
            else:
                matches = [folder / name if (folder / name).exists() else _resolve(name, base_dir)]
            if not matches or not all(m.is_file() for m in matches):
                raise SourceError(f"{folder}: data_files {name!r} not found")
            files += [(m, _kind(m, ds_type)) for m in matches]
        return Source(str(folder), slices, {"train": files})
    if (folder / "dataset_dict.json").exists():  # DatasetDict.save_to_disk
        names = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        return Source(str(folder), slices, {n: _saved_files(folder / n) for n in names})
    if (folder / "state.json").exists():  # Dataset.save_to_disk: one split, whatever it was called
        return Source(str(folder), slices, {"train": _saved_files(folder)}, any_split=True)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and _known(p, ds_type))
    if not files:
        raise SourceError(f"{folder}: no data files (.jsonl, .json, .parquet, .csv, .arrow) in the folder")
    # As `datasets` infers splits: if some file names a split (train-00000.parquet, data/test.jsonl),
    # files go by their names and the others are left out; otherwise every file is "train".
    splits: dict[str, list[tuple[Path, str]]] = {}
    for p in files:
        words = set(re.split(r"[^a-z]+", str(p.relative_to(folder)).lower()))
        split = next((s for s, names in SPLIT_WORDS.items() if words & set(names)), None)
        if split:
            splits.setdefault(split, []).append((p, _kind(p, ds_type)))
    return Source(str(folder), slices, splits or {"train": [(p, _kind(p, ds_type)) for p in files]})


def _known(path: Path, ds_type: str | None) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if ds_type:
        wanted = {"json": {".json", ".jsonl", ".gz"}, "jsonl": {".json", ".jsonl", ".gz"}}.get(ds_type, {f".{ds_type}"})
        return bool(set(suffixes) & wanted)
    return bool(suffixes) and suffixes[-1] in EXTENSIONS


def _saved_files(folder: Path) -> list[tuple[Path, str]]:
    state = json.loads((folder / "state.json").read_text())
    return [(folder / f["filename"], "arrow") for f in state.get("_data_files", [])]


# -- readers ----------------------------------------------------------------------------------


def _read_files(files: list[tuple[Path, str]]) -> Iterator[tuple[int, dict | LineProblem]]:
    offset = 0
    for path, kind in files:
        last = 0
        for number, row in READERS[kind](path):
            last = number
            if len(files) > 1 and isinstance(row, LineProblem):
                row = LineProblem(offset + number, row.field, f"{path.name} {row.unit} {number}: {row.message}", "row")
            yield offset + number, row
        offset += last


def _count(files: list[tuple[Path, str]]) -> int:
    """Rows in these files, for percent and negative slices; cheap where the format says it."""
    total = 0
    for path, kind in files:
        if kind == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        elif kind == "arrow":  # the batches' lengths: memory-mapped, nothing decoded
            import pyarrow as pa

            with pa.memory_map(str(path)) as source:
                try:
                    total += sum(batch.num_rows for batch in _arrow_batches(source))
                except Exception:
                    total += 1  # read_arrow reports it as one problem
        elif kind == "json":  # non-blank lines (or array items), without parsing them
            with path.open("rb") as f:
                try:
                    total += sum(1 for _, raw in read_json_lines(f) if isinstance(raw, LineProblem) or raw.strip())
                except FileRefused:
                    total += 1  # read_rows reports it as one problem
        else:
            total += sum(1 for _ in READERS[kind](path))
    return total


def read_json(path: Path) -> Iterator[tuple[int, dict | LineProblem]]:
    yield from read_rows(path)


def read_parquet(path) -> Iterator[tuple[int, dict | LineProblem]]:
    """By record batch: a row group is read page by page (buffered, not pre-buffered), so memory
    stays near one batch however big the file or its row groups. `path` may be a binary file object."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except Exception as exc:  # pyarrow's ArrowInvalid: not a Parquet file, damaged footer
        yield 1, LineProblem(1, "", f"can't read the Parquet file: {exc}", "row")
        return
    yield from _table_rows(parquet.iter_batches(batch_size=BATCH_ROWS))


def read_arrow(path: Path) -> Iterator[tuple[int, dict | LineProblem]]:
    """An Arrow IPC file or stream (what `save_to_disk` writes), memory-mapped, batch by batch."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            batches = _arrow_batches(source)
        except Exception as exc:
            yield 1, LineProblem(1, "", f"can't read the Arrow file: {exc}", "row")
            return
        yield from _table_rows(_rebatched(batches))


def _arrow_batches(source):
    """Record batches of an Arrow IPC file ("ARROW1" first) or stream, from a memory map."""
    import pyarrow as pa

    if source.read(6) == b"ARROW1":
        source.seek(0)
        reader = pa.ipc.open_file(source)
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    source.seek(0)
    return iter(pa.ipc.open_stream(source))


def read_csv(path: Path) -> Iterator[tuple[int, dict | LineProblem]]:
    with path.open(encoding="utf-8-sig", newline="") as text:  # -sig: a BOM is skipped
        yield from csv_rows(text)


def csv_rows(text) -> Iterator[tuple[int, dict | LineProblem]]:
    """Record by record from a text stream (a quoted field may span lines); cells are strings, as a
    CSV has no types. Row 1 is the first record after the header."""
    csv.field_size_limit(MAX_LINE_BYTES)
    reader = csv.reader(text)
    number = 0
    try:
        header = next(reader, None)
        if header is None:
            return
        for number, values in enumerate(reader, start=1):
            if not any(values):
                continue
            if len(values) != len(header):
                yield number, LineProblem(number, "", f"{len(values)} cells where the header has {len(header)}", "row")
                continue
            yield number, dict(zip(header, values))
    except UnicodeDecodeError as exc:
        yield number + 1, LineProblem(number + 1, "", f"not UTF-8 text: {exc.reason}", "row")
    except csv.Error as exc:
        yield number + 1, LineProblem(number + 1, "", f"invalid CSV: {exc}", "row")


READERS = {"json": read_json, "parquet": read_parquet, "arrow": read_arrow, "csv": read_csv}


def _rebatched(batches, size: int = BATCH_ROWS):
    for batch in batches:
        for at in range(0, batch.num_rows, size):
            yield batch.slice(at, size)


def _table_rows(batches) -> Iterator[tuple[int, dict | LineProblem]]:
    number = 0
    try:
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except Exception as exc:  # a damaged page: the rows before it were read
        yield number + 1, LineProblem(number + 1, "", f"can't read the file from here on: {exc}", "row")


def json_line(row: dict) -> bytes:
    """A row of a table as one JSON line (how an upload of Parquet or CSV is stored). Images travel in the row:
    an Image column's {bytes, path} (Parquet) or decoded picture (a Hub dataset) as {bytes: base64, path}."""
    try:
        return json.dumps(row, ensure_ascii=False, default=_json_default).encode("utf-8") + b"\n"
    except _HasBinary:  # rare: only rows with bytes or pictures pay for the walk
        return json.dumps(_portable(row), ensure_ascii=False, default=str).encode("utf-8") + b"\n"


class _HasBinary(Exception):
    pass


def _json_default(value):
    if isinstance(value, bytes) or type(value).__module__.startswith("PIL."):
        raise _HasBinary
    return str(value)  # dates, decimals: as text


def _portable(value):
    """`value` with image bytes as base64 and pictures as PNG bytes; other bytes as (lossy) UTF-8 text."""
    if isinstance(value, dict):
        if isinstance(value.get("bytes"), bytes) and set(value) <= {"bytes", "path"}:  # datasets' Image layout
            return {**value, "bytes": base64.b64encode(value["bytes"]).decode("ascii")}
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if type(value).__module__.startswith("PIL."):
        out = io.BytesIO()
        value.save(out, format="PNG")
        return {"bytes": base64.b64encode(out.getvalue()).decode("ascii"), "path": None}
    return value


# -- Hub --------------------------------------------------------------------------------------


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ).lower() in ("1", "true", "yes", "on")


def check_hub_cache(hub_id: str, cache_dir: Path | None) -> Path | None:
    """The cache to load a Hub dataset from: the data dir's (where a host with network downloads it).
    Offline, a dataset only in datasets' own cache is read from there, and one in no cache is an
    error now, not after a model has loaded."""
    if not offline():
        return cache_dir
    from datasets import config as ds_config

    folder = hub_id.replace("/", "___")
    if cache_dir is not None and (Path(cache_dir) / folder).exists():
        return cache_dir
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or Path(ds_config.HF_CACHE_HOME) / "hub")
    if (Path(ds_config.HF_DATASETS_CACHE) / folder).exists() or (
        hub_cache / f"datasets--{hub_id.replace('/', '--')}"
    ).exists():
        return None  # datasets' default cache
    raise SourceError(
        f"dataset {hub_id!r} is not in the local cache (offline: HF_HUB_OFFLINE is set) and is not a local "
        "path; download it on a host with network access, or point `path` at a local copy"
    )


def load_hub_dataset(hub_id: str, split: str | None, data_files, cache_dir: Path | None, name: str | None = None):
    """The split (slicing included, as `datasets` reads it) of a Hub dataset, memory-mapped from the cache;
    `name` is the dataset's configuration (subset), when it has several."""
    import datasets

    config = {"name": name} if name else {}
    try:
        return datasets.load_dataset(
            hub_id,
            split=split or "train",
            data_files=data_files,
            cache_dir=str(cache_dir) if cache_dir else None,
            **config,
        )
    except Exception as exc:
        if offline():
            raise SourceError(f"dataset {hub_id!r} is not in the local cache (offline): {exc}") from None
        raise SourceError(f"can't load dataset {hub_id!r} from the Hub: {exc}") from None
