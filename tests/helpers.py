"""Helpers shared by test modules (fixtures live in conftest.py files; test modules never import
each other: what two of them share lives here)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]  # the repository: where a worker or server subprocess starts

# A config that trains the tiny demo model on the `chat` dataset for `steps` steps (str.format).
GOOD = """\
base_model: tiny-chat
datasets:
  - path: chat
    type: chat_template
sequence_len: 128
adapter: lora
lora_target_linear: true
micro_batch_size: 4
max_steps: {steps}
learning_rate: 0.003
"""

CHAT_ROW = {
    "messages": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "2 plus 2 is 4."}]
}


def jsonl(rows) -> bytes:
    """Rows as JSON lines (strings are written as they are: broken lines on purpose)."""
    return "".join(
        json.dumps(r) if not isinstance(r, str) else r
        for r in [(json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows]
    ).encode()


def worker_env() -> dict:
    """The environment of a worker subprocess that uses the test database (SQLite file or PostgreSQL)."""
    from django.db import connection

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        env["TRAINYARD_SQLITE_PATH"] = str(db["NAME"])
    else:
        env["DATABASE_URL"] = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    return env


def trainer_pids(run) -> list[int]:
    """The training processes of a run still alive on this machine."""
    out = subprocess.run(["pgrep", "-f", f"training train {run.run_dir}/config.yaml"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def wait_until(page, expression: str, timeout: float = 30.0, interval: float = 0.2):
    """Poll a JavaScript expression in the page until it is truthy; returns its value.

    Playwright's `wait_for_function` evaluates its predicate with `eval` inside the page, which the
    app's Content-Security-Policy (no unsafe-eval) forbids; `page.evaluate` goes through the
    DevTools protocol and is not subject to it.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"still false after {timeout:.0f} s: {expression}")
        time.sleep(interval)


def trained_runs(tokenizer, sample) -> list[str]:
    """The trained text, one string per run of consecutive trained tokens."""
    runs, current = [], []
    for token_id, label in zip(sample.input_ids, sample.labels):
        if label != -100:
            current.append(token_id)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def dump_config(config) -> str:
    """A parsed TrainConfig back to plain axolotl YAML (defaults left out): the round trip the config tests
    hold (parse -> dump -> parse is the same config). The app exports a config's YAML as it was written."""
    import yaml

    return yaml.safe_dump(config.model_dump(exclude_defaults=True, exclude_none=True), sort_keys=False)
