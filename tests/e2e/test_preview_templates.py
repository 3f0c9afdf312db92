"""The token preview of a Qwen3 row with a reasoning trace and of a Gemma 4 row, at desktop and phone width:
thinking tokens are drawn apart (dotted overline) and trained with their turn. Screenshots go to test-results/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).parents[2] / "test-results"
pytestmark = pytest.mark.slow

ROWS = {
    "qwen3": {
        "messages": [
            {"role": "system", "content": "You are a terse calculator."},
            {"role": "user", "content": "What is 3 times 4?"},
            {
                "role": "assistant",
                "content": "It is 12.",
                "reasoning_content": "Three groups of four: 4 + 4 + 4 = 12.",
            },
        ]
    },
    "gemma4": {
        "messages": [
            {"role": "system", "content": "You answer in one sentence."},
            {"role": "user", "content": "Name a prime number above 10."},
            {"role": "assistant", "content": "Eleven is a prime number."},
            {"role": "user", "content": "And one above 20?"},
            {"role": "assistant", "content": "Twenty-three is prime."},
        ]
    },
}

PLANT = """
import json
from django.contrib.auth.models import User
from django.core.files.base import ContentFile
from webapp.datasets.services import upload_dataset
from webapp.workspaces.models import Workspace
ws = Workspace.objects.get(name="Demo")
user = User.objects.get(username="demo")
rows = json.loads({rows!r})
ids = [upload_dataset(ws, user, ContentFile(json.dumps(row).encode(), name=name + ".jsonl"),
                      name="templates-" + name).dataset.pk for name, row in rows.items()]
print(*ids)
"""

# Each token's look, read from the page: what a user sees, not what the template says
TOKENS = """() => [...document.querySelectorAll('.tokens .tok')].map((el) => ({
  text: el.textContent, classes: el.className, label: Number(el.dataset.label), part: el.dataset.part,
  overline: getComputedStyle(el).borderTopStyle}))"""


@pytest.fixture(scope="module")
def template_datasets(server):
    ids = server.manage("shell", "-c", PLANT.format(rows=json.dumps(ROWS))).split()[-2:]
    return dict(zip(ROWS, ids))


@pytest.mark.parametrize("width", [1280, 390])
def test_qwen3_thinking_and_gemma4_rows_preview_with_their_templates(server, signed_in, template_datasets, width):
    RESULTS.mkdir(exist_ok=True)
    page = signed_in(width)
    seen = {}
    for name, dataset in template_datasets.items():
        page.goto(f"{server.url}/datasets/{dataset}/preview/?row=0&model=tiny-{name}")
        page.wait_for_selector(".tokens .tok")
        page.screenshot(path=str(RESULTS / f"preview-{name}-{width}.png"), full_page=True)
        seen[name] = page.evaluate(TOKENS)
        scroll, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert scroll <= inner, f"{name} preview wider than {width} px"
    qwen = seen["qwen3"]
    thinking = [t for t in qwen if "thinking" in t["classes"]]
    text = "".join(t["text"] for t in thinking)
    assert "Three" in text and "12" in text, text  # the reasoning trace, drawn apart
    assert all(t["overline"] == "dotted" and t["label"] != -100 for t in thinking)  # and trained with its turn
    assert all(t["overline"] != "dotted" for t in qwen if "thinking" not in t["classes"])
    assert any("<think>" in t["text"] for t in qwen) and any(t["text"] == "<|im_start|>" for t in qwen)
    gemma = seen["gemma4"]
    assert [t["text"] for t in gemma[:2]] == ["<bos>", "<|turn>"]  # Gemma 4's own turn markers
    trained = "".join(t["text"] for t in gemma if t["label"] != -100)
    assert "Eleven" in trained and "Twenty" in trained and "prime number above" not in trained
    assert not any("thinking" in t["classes"] for t in gemma)
