"""One real server (web + worker, as `make run` starts them) and one Chromium for all browser tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
CHROMIUM = "/usr/bin/chromium"


@dataclass
class Server:
    url: str
    env: dict  # the server's environment: `manage.py shell` with it acts on the server's database

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args],
            env=self.env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        return done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _template_tokenizers(models: Path) -> None:
    """Tokenizer folders with real chat templates (Qwen3, Gemma 4) for the preview: the tiny family tokenizers
    of training/architectures.py (their special tokens on a small BPE). The preview loads no weights."""
    from training.architectures import build_tokenizer
    from training.formats.chat_template import named_template

    for folder, family, template in (("tiny-qwen3", "qwen3_5", "qwen3"), ("tiny-gemma4", "gemma4", "gemma4")):
        tokenizer = build_tokenizer(family)
        tokenizer.chat_template = named_template(template)
        tokenizer.save_pretrained(models / folder)


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model_dir):
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    data = tmp_path_factory.mktemp("e2e-data")
    shutil.copytree(tiny_model_dir, data / "models" / "tiny-chat")  # setup_demo reuses it
    _template_tokenizers(data / "models")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "TRAINYARD_HUEY_IMMEDIATE")}
    env.update(TRAINYARD_DATA_DIR=str(data), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run(manage + ["migrate", "-v0"], env=env, cwd=ROOT, check=True)
    subprocess.run(manage + ["setup_demo", "--no-datasets"], env=env, cwd=ROOT, check=True, capture_output=True)
    port = _free_port()
    log = (data / "serve.log").open("w")
    proc = subprocess.Popen(
        manage + ["serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.3)
    yield Server(f"http://127.0.0.1:{port}", env)
    os.killpg(proc.pid, 2)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    """Per module, not per session: Playwright's sync API keeps an asyncio loop running in this thread
    while it is open, which would break later tests that use async_to_sync (tests/web)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def signed_in(server, browser):
    """`signed_in(width)` -> a page of a fresh browser context, signed in as the demo user."""
    contexts = []

    def open_page(width: int = 1280, username: str = "demo", password: str = "trainyard"):
        context = browser.new_context(viewport={"width": width, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.goto(server.url + "/login/")
        page.fill("input[name=username]", username)
        page.fill("input[name=password]", password)
        page.click("button.primary")
        page.wait_for_load_state()
        return page

    yield open_page
    for context in contexts:
        context.close()
