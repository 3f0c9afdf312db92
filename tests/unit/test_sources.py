"""Dataset sources: every file kind, folders, save_to_disk, split slicing as `datasets` does it, the Hub
(offline), BOMs, and row numbers in errors."""

from __future__ import annotations

import csv
import gzip
import json
import os
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers_data import alpaca_messages_rows, finetome_rows, write_hub_standins, write_parquet
from training.rows import LineProblem, read_rows
from training.sources import SourceError, open_source, parse_split, validate_ds_type, validate_split

ROWS = [{"text": f"row number {i}", "n": i} for i in range(37)]


def spec(path, **kw):
    return SimpleNamespace(
        path=str(path), split=kw.get("split"), ds_type=kw.get("ds_type"), data_files=kw.get("data_files")
    )


def read(path, **kw):
    return list(open_source(spec(path, **kw)).rows())


def texts(items):
    return [row["text"] for _, row in items]


def write_jsonl(path, rows, prefix=b""):
    path.write_bytes(prefix + b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    return path


def write_csv(path, rows, encoding="utf-8"):
    with path.open("w", encoding=encoding, newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# -- split ------------------------------------------------------------------------------------

SPLITS = [
    "train", "train[:10%]", "train[10%:20%]", "train[100:200]", "train[:10]", "train[-10:]", "train[-10%:]",
    "train[:-5]", "train[5:-5]", "train[33%:]", "train[:50%](pct1_dropremainder)", "train[:1_000]", "train[0:0]",
]  # fmt: skip


@pytest.mark.parametrize("text", SPLITS)
@pytest.mark.parametrize("total", [0, 7, 37, 250, 1001])
def test_split_slices_are_the_rows_datasets_reads(text, total):
    from datasets import ReadInstruction

    if "pct1" in text and total < 100:
        pytest.skip("datasets refuses pct1_dropremainder below 100 rows; so do we (see below)")
    (s,) = parse_split(text)
    start, stop = s.bounds(total if s.needs_total() else None)
    ours = list(range(total))[start:stop]
    want = ReadInstruction.from_spec(text).to_absolute({"train": total})[0]
    assert ours == list(range(total))[want.from_ : want.to]


@pytest.mark.parametrize(
    "bad", ["train[:10%", "train[a:b]", "train[:200%]", "[0:10]", "train[10%:20]", "train[:5](closest)"]
)
def test_a_split_datasets_would_not_understand_is_refused_at_validation(bad):
    with pytest.raises(ValueError, match="split"):
        validate_split(bad)


def test_unknown_ds_type_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="parquet"):
        validate_ds_type("excel")
    assert validate_ds_type("csv") == "csv"


# -- files ------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    out = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS),
        "gz": tmp_path / "d.jsonl.gz",
        "array": tmp_path / "d.json",
        "parquet": write_parquet(tmp_path / "d.parquet", ROWS, row_group_size=10),
        "csv": write_csv(tmp_path / "d.csv", ROWS),
        "arrow_file": tmp_path / "d.arrow",
        "arrow_stream": tmp_path / "s.arrow",
    }
    out["gz"].write_bytes(gzip.compress(out["jsonl"].read_bytes()))
    out["array"].write_text(json.dumps(ROWS, indent=1))
    table = pa.Table.from_pylist(ROWS)
    with pa.ipc.new_file(out["arrow_file"], table.schema) as w:
        w.write_table(table, max_chunksize=8)
    with pa.ipc.new_stream(out["arrow_stream"], table.schema) as w:
        w.write_table(table, max_chunksize=8)
    return out


@pytest.mark.parametrize("kind", ["jsonl", "gz", "array", "parquet", "csv", "arrow_file", "arrow_stream"])
def test_every_file_kind_reads_the_same_rows_numbered_from_one(files, kind):
    items = read(files[kind])
    assert texts(items) == [r["text"] for r in ROWS]
    assert [n for n, _ in items] == list(range(1, len(ROWS) + 1))
    if kind != "csv":  # a CSV has no types: its cells are text
        assert [row["n"] for _, row in items] == list(range(len(ROWS)))


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "arrow_stream"])
@pytest.mark.parametrize("split", ["train[:10%]", "train[10%:20%]", "train[5:9]", "train[-3:]", "train[:-30]"])
def test_split_slicing_on_files_matches_datasets(files, kind, split, tmp_path):
    import datasets

    builder = {"jsonl": "json", "arrow_stream": "arrow"}.get(kind, kind)
    theirs = datasets.load_dataset(builder, data_files=str(files[kind]), split=split, cache_dir=str(tmp_path / "c"))
    assert texts(read(files[kind], split=split)) == list(theirs["text"])


def test_ds_type_overrides_the_extension_and_content_beats_a_wrong_ds_type(tmp_path, files):
    renamed = tmp_path / "rows.txt"
    renamed.write_bytes(files["csv"].read_bytes())
    assert texts(read(renamed, ds_type="csv")) == [r["text"] for r in ROWS]
    # An upload is stored as JSONL: a config saying ds_type: parquet still reads it.
    assert texts(read(files["jsonl"], ds_type="parquet")) == [r["text"] for r in ROWS]
    with pytest.raises(SourceError, match="not Parquet"):
        open_source(spec(files["csv"], ds_type="parquet"))


def test_a_local_file_has_only_the_train_split(files):
    with pytest.raises(SourceError, match="no split 'test'"):
        read(files["parquet"], split="test[:10%]")


def test_missing_local_file_is_not_found(tmp_path):
    with pytest.raises(SourceError, match="file 'nope.jsonl' not found"):
        open_source(spec("nope.jsonl"))


# -- BOM --------------------------------------------------------------------------------------


def test_a_utf8_bom_is_skipped_not_refused(tmp_path):
    jsonl = write_jsonl(tmp_path / "bom.jsonl", ROWS[:3], prefix=b"\xef\xbb\xbf")
    assert [row for _, row in read_rows(jsonl)] == ROWS[:3]
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[:3]).encode())
    assert [row for _, row in read_rows(array)] == ROWS[:3]
    gz = tmp_path / "bom.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    assert [row for _, row in read_rows(gz)] == ROWS[:3]
    table = write_csv(tmp_path / "bom.csv", ROWS[:3], encoding="utf-8-sig")
    assert table.read_bytes().startswith(b"\xef\xbb\xbf")
    assert [row["text"] for _, row in read(table)] == [r["text"] for r in ROWS[:3]]
    assert set(read(table)[0][1]) == {"text", "n"}  # not "\ufefftext"


# -- problems keep their numbers ---------------------------------------------------------------


def test_broken_rows_are_reported_by_line_or_row(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{broken\n{"text": "b"}\n')
    items = read(jsonl)
    assert [n for n, _ in items] == [1, 3, 4]
    assert isinstance(items[1][1], LineProblem) and str(items[1][1]).startswith("line 3: invalid JSON")
    table = tmp_path / "d.csv"
    table.write_text('text,n\n"a",1\n"b",2,extra\n"multi\nline",3\n')
    items = read(table)
    assert [n for n, _ in items] == [1, 2, 3]
    assert str(items[1][1]) == "row 2: 3 cells where the header has 2"
    assert items[2][1] == {"text": "multi\nline", "n": "3"}


def test_a_json_array_is_read_item_by_item_with_its_broken_item_numbered(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"text": "a"}, 5, {"text": "b"}, {"text": ')
    items = list(read_rows(path))
    assert items[0] == (1, {"text": "a"})
    assert str(items[1][1]) == "line 2: expected a JSON object, got int"
    assert items[2] == (3, {"text": "b"})
    assert items[3][0] == 4 and "invalid JSON" in items[3][1].message


def test_an_overlong_jsonl_line_is_cut_and_reported_without_holding_it(tmp_path, monkeypatch):
    import training.rows as rows

    monkeypatch.setattr(rows, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "long.jsonl"
    path.write_text('{"text": "a"}\n' + json.dumps({"text": "x" * 5000}) + '\n{"text": "c"}\n')
    items = list(read_rows(path))
    assert items[0] == (1, {"text": "a"}) and items[2] == (3, {"text": "c"})
    size = len(json.dumps({"text": "x" * 5000})) + 1  # the newline too
    assert f"line is {size:,} bytes, over the 1,000-byte limit" in str(items[1][1])


def test_a_63_mb_line_is_reported_with_its_real_size_not_the_limit():
    """Counted while it is skipped: the message says 63 MB, not the 8 MB the reader stopped holding at."""
    import io

    from training.rows import MAX_LINE_BYTES, read_json_lines

    line = b'{"text": "' + b"a" * (63 * 2**20) + b'"}\n'
    items = list(read_json_lines(io.BytesIO(b'{"text": "a"}\n' + line + b'{"text": "b"}\n')))
    assert [n for n, _ in items] == [1, 2, 3]
    assert str(items[1][1]) == f"line 2: line is {len(line):,} bytes, over the {MAX_LINE_BYTES:,}-byte limit"
    assert items[2][1] == b'{"text": "b"}\n'


# -- folders ----------------------------------------------------------------------------------


def test_save_to_disk_folders_read_by_record_batch(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert texts(read(tmp_path / "one")) == [r["text"] for r in ROWS]
    assert texts(read(tmp_path / "one", split="train[:10%]")) == [r["text"] for r in ROWS[:4]]
    datasets.DatasetDict({"train": ds.select(range(30)), "test": ds.select(range(30, 37))}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert texts(read(tmp_path / "dict", split="test")) == [r["text"] for r in ROWS[30:]]
    assert texts(read(tmp_path / "dict", split="train[-2:]")) == [r["text"] for r in ROWS[28:30]]


def test_a_folder_of_files_splits_by_file_name_or_is_all_train(tmp_path):
    hub_like = tmp_path / "hub"
    write_parquet(hub_like / "data" / "train-00000-of-00002.parquet", ROWS[:20])
    write_parquet(hub_like / "data" / "train-00001-of-00002.parquet", ROWS[20:30])
    write_parquet(hub_like / "data" / "test-00000-of-00001.parquet", ROWS[30:])
    assert texts(read(hub_like)) == [r["text"] for r in ROWS[:30]]
    assert texts(read(hub_like, split="test")) == [r["text"] for r in ROWS[30:]]
    # Row numbers go on across files, so a slice over them counts every file.
    assert [n for n, _ in read(hub_like, split="train[18:22]")] == [19, 20, 21, 22]
    plain = tmp_path / "plain"
    plain.mkdir()
    write_jsonl(plain / "a.jsonl", ROWS[:5])
    write_csv(plain / "b.csv", ROWS[5:8])
    assert texts(read(plain)) == [r["text"] for r in ROWS[:8]]


def test_data_files_pick_files_in_the_folder(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:5])
    write_jsonl(tmp_path / "b.jsonl", ROWS[5:9])
    write_jsonl(tmp_path / "c.jsonl", ROWS[9:])
    assert texts(read(tmp_path, data_files=["c.jsonl", "a.jsonl"])) == [r["text"] for r in ROWS[9:] + ROWS[:5]]
    assert texts(read(tmp_path, data_files="b.jsonl")) == [r["text"] for r in ROWS[5:9]]
    assert texts(read(tmp_path, data_files="[ab].jsonl")) == [r["text"] for r in ROWS[:9]]
    with pytest.raises(SourceError, match="data_files 'z.jsonl' not found"):
        open_source(spec(tmp_path, data_files="z.jsonl"))


def test_a_problem_in_the_second_file_names_that_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{broken\n')
    problem = read(tmp_path)[3][1]
    assert isinstance(problem, LineProblem)
    assert str(problem).startswith("row 4: b.jsonl line 2: invalid JSON")


# -- memory -----------------------------------------------------------------------------------


def test_a_parquet_file_with_one_big_row_group_is_read_a_batch_at_a_time(tmp_path):
    rows = [{"messages": [{"role": "user", "content": os.urandom(500).hex()}]} for _ in range(20000)]
    path = write_parquet(tmp_path / "big.parquet", rows, row_group_size=10**9)
    del rows
    assert pq.ParquetFile(path).metadata.num_row_groups == 1 and path.stat().st_size > 15e6
    peak, count = 0, 0
    for _ in open_source(spec(path)).rows():  # lazily: measured while reading
        count += 1
        if count % 200 == 0:
            peak = max(peak, pa.total_allocated_bytes())
    assert count == 20000
    assert peak < path.stat().st_size / 3, f"{peak:,} bytes held for a {path.stat().st_size:,}-byte file"


# -- Hub --------------------------------------------------------------------------------------


def test_a_hub_id_offline_and_not_cached_is_a_clear_error_before_reading(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SourceError, match=r"dataset 'someone/not-here' is not in the local cache \(offline"):
        open_source(spec("someone/not-here", split="train[:10%]"), cache_dir=tmp_path / "cache")


def test_a_hub_id_goes_through_datasets_with_its_split_and_the_data_dirs_cache(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, split=None, data_files=None, cache_dir=None):
        calls.append((path, split, data_files, cache_dir))
        return datasets.Dataset.from_list(ROWS[:4])

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRAINYARD_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    items = read("org/data", split="train[:10%]", data_files="x.jsonl")
    assert texts(items) == [r["text"] for r in ROWS[:4]] and [n for n, _ in items] == [1, 2, 3, 4]
    assert calls == [("org/data", "train[:10%]", ["x.jsonl"], str(tmp_path / "hub-datasets"))]


# -- seed stand-ins ---------------------------------------------------------------------------


def test_seed_dataset_standins_have_the_hub_columns_and_read_with_a_split(tmp_path):
    folders = write_hub_standins(tmp_path, rows=50)
    fine = read(folders["mlabonne/FineTome-100k"], split="train[:10%]")
    assert len(fine) == 5 and set(fine[0][1]) == {"conversations", "source", "score"}
    assert fine[0][1]["conversations"][1] == finetome_rows(1)[0]["conversations"][1]
    alpaca = read(
        folders["fozziethebeat/alpaca_messages_2k_test"] / "data" / "train-00000-of-00001.parquet", ds_type="parquet"
    )
    assert [row for _, row in alpaca] == alpaca_messages_rows(50)


# -- the trainer ------------------------------------------------------------------------------


def test_the_trainer_reads_a_parquet_slice_and_numbers_a_bad_row(tmp_path, tiny_model_dir):
    from training.config import parse_config
    from training.modeling import load_tokenizer
    from training.train import DataInvalid, encode_dataset

    chat = [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
        for i in range(20)
    ]
    write_parquet(tmp_path / "chat.parquet", chat)
    config = parse_config(
        f"base_model: {tiny_model_dir}\nsequence_len: 64\n"
        "datasets:\n  - path: chat.parquet\n    split: train[25%:50%]\n"
    )
    tokenizer = load_tokenizer(config)
    samples, stats, _ = encode_dataset(config, tokenizer, 0, tmp_path)
    assert stats.rows == 5 and [s.row for s in samples] == [5, 6, 7, 8, 9]  # 0-based source rows
    chat[2]["messages"] = []
    write_parquet(tmp_path / "chat.parquet", chat)
    with pytest.raises(DataInvalid) as err:
        whole = parse_config(f"base_model: {tiny_model_dir}\ndatasets:\n  - path: chat.parquet\n")
        encode_dataset(whole, tokenizer, 0, tmp_path)
    assert "1 invalid row(s)" in str(err.value) and "chat.parquet:row 3:" in str(err.value)


def test_percent_slices_of_a_jsonl_with_blank_lines_count_rows_not_lines(tmp_path):
    import datasets

    path = tmp_path / "gaps.jsonl"
    path.write_text("".join(json.dumps(r) + ("\n\n" if r["n"] % 3 == 0 else "\n") for r in ROWS[:10]))
    for split in ("train[50%:]", "train[-20%:]", "train[:30%]"):
        theirs = datasets.load_dataset("json", data_files=str(path), split=split, cache_dir=str(tmp_path / "c"))
        assert texts(read(path, split=split)) == list(theirs["text"]), split


def test_offline_a_hub_dataset_in_the_data_dirs_cache_is_loaded_from_there(tmp_path, monkeypatch):
    import datasets

    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(
        datasets, "load_dataset", lambda path, **kw: calls.append(kw) or datasets.Dataset.from_list(ROWS[:2])
    )
    (tmp_path / "cache" / "org___data").mkdir(parents=True)  # as load_dataset(cache_dir=...) leaves it
    source = open_source(spec("org/data", split="train[:1%]"), cache_dir=tmp_path / "cache")
    assert texts(source.rows()) == [r["text"] for r in ROWS[:2]]
    assert calls == [{"split": "train[:1%]", "data_files": None, "cache_dir": str(tmp_path / "cache")}]
