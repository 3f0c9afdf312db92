"""Unit-test fixtures: tiny random-weight models of the seed architectures, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_arch(data_dir):
    """tiny_arch("qwen3_5") -> the folder of that architecture's tiny model (built on first use, cached
    under the test data dir; see training/architectures.py ARCHITECTURES)."""
    from training.architectures import build_tiny

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny(arch, data_dir / "models" / f"tiny-{arch}")
        return built[arch]

    return get
