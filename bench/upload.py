"""Upload memory: stream a generated chat JSONL or Parquet file (default 1 GB) through the real web server
and sample the server's RSS. Goal: the web process stays under 300 MB. Prints a table, then one line of JSON.

`--format parquet` writes the same rows as an uncompressed Parquet file of that size, in row groups of
~250k rows (tens of MB each), which the server must read by record batch, not a row group at a time."""

from __future__ import annotations

import argparse
import http.client
import http.cookiejar
import json
import os
import sys
import threading
import time
from pathlib import Path

from _setup import ROOT, fresh_data_dir, login, start_server, write_chat_jsonl

GOAL_MB = 300


def write_chat_parquet(path: Path, size_mb: int, group_rows: int = 250_000) -> int:
    """The chat rows of write_chat_jsonl (varied so none repeat) as an uncompressed Parquet file of
    about size_mb, in row groups of group_rows; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT))
    from training.demo import chat_rows

    block = [json.dumps(r) for r in chat_rows(2000, seed=5)]
    target, rows, writer = size_mb * 1024 * 1024, 0, None
    while not path.exists() or path.stat().st_size < target:
        batch = []
        for _ in range(group_rows):
            line = block[rows % len(block)]
            batch.append(json.loads(line.replace('"}]}', f' ({rows})"}}]}}', 1)))
            rows += 1
        table = pa.Table.from_pylist(batch)
        writer = writer or pq.ParquetWriter(path, table.schema, compression="none")
        writer.write_table(table, row_group_size=group_rows)
    writer.close()
    return rows


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    args = parser.parse_args()

    data = fresh_data_dir()
    path = data / f"upload.{args.format}"
    rows = (write_chat_parquet if args.format == "parquet" else write_chat_jsonl)(path, args.size_mb)
    server, base = start_server(os.environ.copy())
    try:
        _, token, cookies = login(base)
        idle = rss_mb(server.pid)

        boundary = "----trainyardbench"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="csrfmiddlewaretoken"\r\n\r\n{token}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        peak = {"mb": idle}
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak["mb"] = max(peak["mb"], rss_mb(server.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        conn = http.client.HTTPConnection(base.split("//")[1], timeout=3600)
        conn.putrequest("POST", "/datasets/")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(head) + path.stat().st_size + len(tail)))
        conn.putheader("Cookie", cookies)
        conn.putheader("Referer", base + "/datasets/")
        conn.endheaders()
        conn.send(head)
        with path.open("rb") as f:
            while chunk := f.read(1024 * 1024):
                conn.send(chunk)
        conn.send(tail)
        response = conn.getresponse()
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        location = response.getheader("Location") or ""
    finally:
        server.terminate()
        server.wait(timeout=30)
    figures = {
        "format": args.format,
        "size_mb": round(path.stat().st_size / 2**20),
        "rows": rows,
        "status": response.status,
        "stored": "/datasets/" in location,
        "seconds": round(seconds, 1),
        "mb_per_s": round(path.stat().st_size / 2**20 / seconds, 1),
        "idle_rss_mb": round(idle, 1),
        "peak_rss_mb": round(peak["mb"], 1),
        "goal_peak_rss_mb": GOAL_MB,
    }
    print(
        f"uploaded {figures['size_mb']} MB of {args.format} ({rows} rows) in {figures['seconds']} s, "
        f"HTTP {response.status} -> {location}"
    )
    print(f"web process RSS: idle {figures['idle_rss_mb']} MB, peak {figures['peak_rss_mb']} MB (goal < {GOAL_MB})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
