"""When `trainyard preprocess` splits a JSONL file across processes, and into how many chunks.
(That the split output equals one process's: tests/unit/test_cli.py.)"""

from __future__ import annotations

import gzip
import json
import os
import sys
import types

from training import parallel_encode
from training.demo import chat_rows


def _write(path, rows: int) -> int:
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(rows, seed=5)), encoding="utf-8")
    return path.stat().st_size


def test_a_file_of_a_few_thousand_chat_rows_is_split_across_cores(tmp_path, monkeypatch):
    """A process without transformers forks cheaply: 20k chat rows (4.5 MB) took 1.39 s in one
    process, 1.17 s in two (2 cores). The threshold was 32 MB; it still is in a process holding
    torch or transformers (the CLI's holds neither for a plain tokenizer: test_jinja_env.py)."""
    size = _write(tmp_path / "chat.jsonl", 6000)
    assert 2**20 < size < 4 * 2**20
    for heavy in ("torch", "transformers"):
        monkeypatch.delitem(sys.modules, heavy, raising=False)
    assert parallel_encode.jsonl_worth_splitting(tmp_path / "chat.jsonl", 2)
    assert not parallel_encode.jsonl_worth_splitting(tmp_path / "chat.jsonl", 1)  # --jobs 1
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    assert not parallel_encode.jsonl_worth_splitting(tmp_path / "chat.jsonl", 2)


def test_small_gzip_or_array_files_stay_in_one_process(tmp_path, monkeypatch):
    for heavy in ("torch", "transformers"):
        monkeypatch.delitem(sys.modules, heavy, raising=False)
    _write(tmp_path / "small.jsonl", 300)
    assert not parallel_encode.jsonl_worth_splitting(tmp_path / "small.jsonl", 8)
    big = (tmp_path / "small.jsonl").read_bytes() * 20
    (tmp_path / "chat.jsonl.gz").write_bytes(gzip.compress(big))
    (tmp_path / "array.json").write_bytes(b"[" + big)
    for name in ("chat.jsonl.gz", "array.json"):
        assert not parallel_encode.jsonl_worth_splitting(tmp_path / name, 8), name


def test_every_worker_gets_several_chunks(tmp_path):
    """At least 4 chunks a worker, so the last ones don't leave a worker idle (a 2 MB file on two
    workers was cut in two 1 MB chunks: one each, the slower one alone at the end)."""
    size = _write(tmp_path / "chat.jsonl", 9000)
    assert 2**20 < size < 3 * 2**20
    chunks = parallel_encode.plan_chunks(tmp_path / "chat.jsonl", parallel_encode.chunk_bytes(size, 2))
    assert len(chunks) >= 8
    assert chunks[0][0] == 0 and chunks[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))


def _tokenizer_threads(task) -> str | None:
    return os.environ.get("TOKENIZERS_PARALLELISM")


def test_workers_that_fill_the_cores_tokenize_on_one_thread_each(tmp_path, monkeypatch):
    _write(tmp_path / "chat.jsonl", 600)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setattr(parallel_encode, "MIN_CHUNK_BYTES", 16 * 1024)
    monkeypatch.setattr(parallel_encode, "_encode_chunk", _tokenizer_threads)
    cores = os.cpu_count() or 1
    seen = list(parallel_encode.encode_file_parallel(None, tmp_path / "chat.jsonl", cores, jsonl=False))
    assert len(seen) > 1 and set(seen) == {"false"}
    if cores > 1:  # fewer workers than cores: each one's tokenizer may use the cores left
        seen = list(parallel_encode.encode_file_parallel(None, tmp_path / "chat.jsonl", cores - 1, jsonl=False))
        assert set(seen) == {"true"}
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"  # the parent's is left as it was
