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


def test_hub_import_page_polls_the_worker_and_offline_misses_are_said(server, signed_in):
    """The import page's script (a static file, under the CSP) follows the job to its dataset; offline,
    a dataset in no cache is refused on the datasets page with the reason."""
    from tests.helpers import wait_until

    job = server.manage(
        "shell",
        "-c",
        "from webapp.datasets.models import HubImport\nfrom webapp.workspaces.models import Workspace\n"
        "job = HubImport.objects.create(workspace=Workspace.objects.get(name='Demo'), hub_id='org/chat',"
        " status='running', rows_total=200, rows_done=80)\nprint(job.pk)",
    ).split()[-1]
    page = signed_in(390)
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.goto(f"{server.url}/datasets/imports/{job}/")
    wait_until(page, "document.getElementById('import-text').textContent.includes('80 / 200')")
    server.manage(
        "shell",
        "-c",
        "import json\nfrom django.contrib.auth.models import User\nfrom django.core.files.base import ContentFile\n"
        "from webapp.datasets.models import HubImport\nfrom webapp.datasets.services import upload_dataset\n"
        f"job = HubImport.objects.get(pk={job})\n"
        "row = {'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]}\n"
        "ds = upload_dataset(job.workspace, User.objects.get(username='demo'),"
        " ContentFile(json.dumps(row).encode(), name='hub.jsonl'), name='from-hub').dataset\n"
        "HubImport.objects.filter(pk=job.pk).update(status='done', rows_done=200, dataset=ds)",
    )
    wait_until(page, "!document.getElementById('import-done').hidden")
    RESULTS.mkdir(exist_ok=True)
    page.screenshot(path=str(RESULTS / "hub-import-done-390.png"), full_page=True)
    page.click("#import-dataset-link")
    page.wait_for_load_state()
    assert page.inner_text("h1").startswith("from-hub")
    page.goto(f"{server.url}/datasets/")
    page.fill("#hub-import-form input[name=hub_id]", "someone/not-cached")
    page.click("#hub-import-form button")
    page.wait_for_load_state()
    assert "is not in the local cache (offline" in page.inner_text("#import-error")
    page.screenshot(path=str(RESULTS / "hub-import-refused-390.png"), full_page=True)
    assert problems == [] or all("400" in p for p in problems), problems  # the refusal page answers 400
