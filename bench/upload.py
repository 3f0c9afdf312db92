"""Upload memory: stream a generated chat JSONL (default 1 GB) through the real web server and sample
the server's RSS. Goal: the web process stays under 300 MB. Prints a table, then one line of JSON."""

from __future__ import annotations

import argparse
import http.client
import http.cookiejar
import json
import os
import threading
import time
from pathlib import Path

from _setup import fresh_data_dir, login, start_server, write_chat_jsonl

GOAL_MB = 300


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    args = parser.parse_args()

    data = fresh_data_dir()
    path = data / "upload.jsonl"
    rows = write_chat_jsonl(path, args.size_mb)
    server, base = start_server(os.environ.copy())
    try:
        _, token, cookies = login(base)
        idle = rss_mb(server.pid)

        boundary = "----trainyardbench"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="csrfmiddlewaretoken"\r\n\r\n{token}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="upload.jsonl"\r\n'
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
        "size_mb": args.size_mb,
        "rows": rows,
        "status": response.status,
        "stored": "/datasets/" in location,
        "seconds": round(seconds, 1),
        "mb_per_s": round(args.size_mb / seconds, 1),
        "idle_rss_mb": round(idle, 1),
        "peak_rss_mb": round(peak["mb"], 1),
        "goal_peak_rss_mb": GOAL_MB,
    }
    print(f"uploaded {args.size_mb} MB ({rows} rows) in {figures['seconds']} s, HTTP {response.status} -> {location}")
    print(f"web process RSS: idle {figures['idle_rss_mb']} MB, peak {figures['peak_rss_mb']} MB (goal < {GOAL_MB})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
