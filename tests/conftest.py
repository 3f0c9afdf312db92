"""Shared fixtures: the tiny model built once, services that must be there in CI."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

_DATA = Path(os.environ["TRAINYARD_DATA_DIR"])  # set by tests/testenv.py, before Django loaded

import pytest  # noqa: E402

from training.demo import build_demo_model  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _DATA


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The offline demo model (real Llama architecture, ChatML template), built once per session."""
    return build_demo_model(_DATA / "models" / "tiny-chat")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def require_service(url: str, name: str) -> None:
    """Tests that need PostgreSQL/Redis fail (not skip) in CI when the service is missing."""
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=2).close()
    except OSError:
        message = f"{name} is not reachable at {parsed.hostname}:{parsed.port}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
