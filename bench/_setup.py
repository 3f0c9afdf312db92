"""Shared by the benchmarks: a throwaway data dir with the demo model, and generated chat JSONL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fresh_data_dir() -> Path:
    data = Path(tempfile.mkdtemp(prefix="trainyard-bench-"))
    os.environ["TRAINYARD_DATA_DIR"] = str(data)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = {**os.environ}
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run(manage + ["migrate", "-v0"], env=env, check=True, cwd=ROOT)
    subprocess.run(manage + ["setup_demo", "--no-datasets"], env=env, check=True, cwd=ROOT, capture_output=True)
    return data


def write_chat_jsonl(path: Path, size_mb: int) -> int:
    """Chat rows until the file reaches size_mb; returns the row count. Rows vary so none repeat."""
    sys.path.insert(0, str(ROOT))
    from training.demo import chat_rows

    block = [json.dumps(r) for r in chat_rows(2000, seed=5)]
    target, written, rows = size_mb * 1024 * 1024, 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            for line in block:
                line = line.replace('"}]}', f' ({rows})"}}]}}', 1) + "\n"
                f.write(line)
                written += len(line)
                rows += 1
                if written >= target:
                    break
    return rows


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict, stderr=None):
    """uvicorn serving the app on a free port; returns (process, base URL) once it accepts connections."""
    import socket
    import time

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "webapp.asgi:application",
            "--port",
            str(port),
            "--lifespan",
            "off",
            "--no-access-log",
            "--ws",
            "websockets",
        ],
        cwd=ROOT,
        env=env,
        stderr=stderr,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}"


def login(base: str):
    """Log in as the demo user; returns (opener with the session, csrf token of the dataset page, Cookie header)."""
    import http.cookiejar
    import re
    import urllib.parse
    import urllib.request

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    token = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
    page = opener.open(base + "/login/").read().decode()
    opener.open(
        base + "/login/",
        urllib.parse.urlencode(
            {"username": "demo", "password": "trainyard", "csrfmiddlewaretoken": token.search(page).group(1)}
        ).encode(),
    )
    page = opener.open(base + "/datasets/").read().decode()
    return opener, token.search(page).group(1), "; ".join(f"{c.name}={c.value}" for c in jar)
