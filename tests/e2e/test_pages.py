"""Every page as a user sees it, at phone width (390 px) and desktop width (1280 px): nothing wider
than the screen, no script refused by the Content-Security-Policy, no console error."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import wait_until

RESULTS = Path(__file__).parents[2] / "test-results"
pytestmark = pytest.mark.slow

# A finished run with a few points, a dataset and a config, planted through the server's own code.
PLANT = """
from django.contrib.auth.models import User
from django.core.files.base import ContentFile
from training.demo import chat_rows
import json
from webapp.datasets.services import upload_dataset
from webapp.runs.models import MetricPoint, Run, TrainingConfig
from webapp.workspaces.models import Workspace
ws = Workspace.objects.get(name="Demo")
user = User.objects.get(username="demo")
user.is_staff = user.is_superuser = True
user.save()
body = "\\n".join(json.dumps(r) for r in chat_rows(30)).encode()
ds = upload_dataset(ws, user, ContentFile(body, name="pages.jsonl"), name="pages-chat").dataset
config = TrainingConfig.objects.create(workspace=ws, name="pages-config", yaml="base_model: tiny-chat\\ndatasets:\\n  - path: pages-chat\\n")
run = Run.objects.create(workspace=ws, config=config, name="pages-run", config_yaml=config.yaml, status="succeeded")
run.run_dir.mkdir(parents=True, exist_ok=True)
for i in range(1, 11):
    MetricPoint.objects.create(run=run, seq=i, step=i, time=float(i), values={"loss": 3 - i / 10, "learning_rate": 1e-4})
print(ds.pk, config.pk, run.pk)
"""


@pytest.fixture(scope="module")
def planted(server):
    dataset, config, run = server.manage("shell", "-c", PLANT).split()[-3:]
    return {"dataset": dataset, "config": config, "run": run}


WIDEST = """() => [...document.querySelectorAll('body *')]
  .filter((el) => el.getBoundingClientRect().right > window.innerWidth + 1)
  .slice(0, 6).map((el) => `${el.tagName.toLowerCase()}#${el.id}.${el.className} ${Math.round(el.getBoundingClientRect().right)}`)"""


def pages(ids):
    return {
        "runs": "/runs/",
        "run": f"/runs/{ids['run']}/",
        "compare": f"/runs/compare/?ids={ids['run']}",
        "datasets": "/datasets/",
        "dataset": f"/datasets/{ids['dataset']}/",
        "preview": f"/datasets/{ids['dataset']}/preview/",
        "configs": "/configs/",
        "config-new": "/configs/new/",
        "config": f"/configs/{ids['config']}/",
        "tokens": "/settings/tokens/",
        "members": "/settings/members/",
        "workspace-new": "/workspaces/new/",
        "api-docs": "/api/docs",
        "admin": "/admin/",
    }


@pytest.mark.parametrize("width", [390, 1280])
def test_every_page_fits_the_screen_and_runs_its_scripts(server, signed_in, planted, width):
    RESULTS.mkdir(exist_ok=True)
    page = signed_in(width)
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"{page.url}: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"{page.url}: {e}"))
    overflowing = {}
    for name, path in pages(planted).items():
        page.goto(server.url + path)
        page.wait_for_load_state("networkidle")
        if name == "run":
            wait_until(page, "document.getElementById('chart-loss').data?.[0]?.x.length === 10")
        if name == "dataset":
            page.wait_for_selector("#stats-figures:not([hidden])", timeout=60_000)
        if name == "api-docs":
            page.wait_for_selector(".swagger-ui .opblock", timeout=20_000)  # drawn by Swagger UI's script
        if name in ("run", "dataset", "preview", "datasets"):
            page.screenshot(path=str(RESULTS / f"{name}-{width}.png"), full_page=True)
        scroll, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        if scroll > inner:  # name the elements that stick out, to say what to fix
            overflowing[name] = page.evaluate(WIDEST)
    assert overflowing == {}, f"wider than {width} px"
    assert problems == []


def test_a_viewer_sees_no_write_buttons(server, signed_in, planted):
    """A viewer reads everything and is offered nothing that would be refused."""
    server.manage(
        "shell",
        "-c",
        "from webapp.workspaces.services import create_user_with_workspace\n"
        "from webapp.workspaces.models import Membership, Workspace\n"
        "user, _ = create_user_with_workspace('vera', 'vera-password', 'Vera')\n"
        "Membership.objects.get_or_create(user=user, workspace=Workspace.objects.get(name='Demo'), role='viewer')\n",
    )
    page = signed_in(1280, "vera", "vera-password")
    page.goto(server.url + "/runs/")
    with page.expect_navigation():  # the menu submits itself (data-autosubmit)
        page.select_option("#workspace-switch select", label="Demo")
    page.goto(f"{server.url}/runs/{planted['run']}/")
    assert page.locator("#playground-form, #note-form, #delete-form").count() == 0
    assert "members ask the models" in page.inner_text("#playground-read-only")
    page.goto(server.url + "/datasets/")
    assert page.locator("#upload-form, #hub-import-form").count() == 0 and page.is_visible("#read-only")
    page.goto(server.url + "/configs/")
    assert page.locator("text=New config").count() == 0 and page.locator("text=Start run").count() == 0


def test_dark_mode_follows_the_system(server, signed_in, planted):
    page = signed_in(1280)
    page.emulate_media(color_scheme="dark")
    page.goto(f"{server.url}/datasets/{planted['dataset']}/preview/")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    red, green, blue = (int(v) for v in background.removeprefix("rgb(").rstrip(")").split(","))
    assert red + green + blue < 120, background
    page.screenshot(path=str(RESULTS / "preview-dark.png"), full_page=True)


STARTING = """
from django.utils import timezone
from webapp.runs.models import Run
from webapp.workspaces.models import Workspace
run = Run.objects.create(workspace=Workspace.objects.get(name="Demo"), name="starting", config_yaml="x",
                         status="starting", started_at=timezone.now(), heartbeat_at=timezone.now())
run.run_dir.mkdir(parents=True, exist_ok=True)
print(run.pk)
"""

STAGE = """
from webapp.runs import recording
recording.record_events(RUN_ID, [{"event": "status", "state": "preparing", "stage": "loading_model", "time": 1.0,
                                  "message": "loading the model (300 rows tokenized into 300 samples)"}], 10)
"""


@pytest.mark.parametrize("width", [390, 1280])
def test_a_starting_run_page_says_what_the_trainer_is_doing(server, signed_in, width):
    """ "Starting" is not a silent 15 s: the trainer's stage reaches the open page live, without a reload."""
    RESULTS.mkdir(exist_ok=True)
    run_id = server.manage("shell", "-c", STARTING).split()[-1]
    page = signed_in(width)
    page.goto(f"{server.url}/runs/{run_id}/")
    assert page.inner_text("#status-badge") == "starting"
    server.manage("shell", "-c", STAGE.replace("RUN_ID", run_id))
    wait_until(page, "document.getElementById('status-message').textContent.includes('loading the model')", 15)
    assert "300 rows tokenized" in page.inner_text("#status-message")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(RESULTS / f"run-starting-{width}.png"), full_page=True)


MERGE_RUN = """
from webapp.runs.models import Run
from webapp.workspaces.models import Workspace
run = Run.objects.create(workspace=Workspace.objects.get(name="Demo"), name="merging-run", config_yaml="x",
                         status="succeeded", merge_state="merging", merge_holder="elsewhere:1:1:x")
(run.run_dir / "adapter").mkdir(parents=True, exist_ok=True)
print(run.pk)
"""
MERGE_FAILS = """
from webapp.runs.models import Run
Run.objects.filter(pk=RUN_ID).update(merge_state="failed", merge_error="OSError: [Errno 28] No space left on device")
"""


@pytest.mark.parametrize("width", [390, 1280])
def test_the_run_page_follows_a_merge_to_its_failure(server, signed_in, width):
    """A merge runs in a worker after the run ended: the page says so, then shows the failure and the
    way to try again without a reload by the user."""
    RESULTS.mkdir(exist_ok=True)
    run_id = server.manage("shell", "-c", MERGE_RUN).split()[-1]
    page = signed_in(width)
    page.goto(f"{server.url}/runs/{run_id}/")
    assert "merging the adapter" in page.inner_text("#merge-status")
    assert page.locator("#merge-form").count() == 0
    page.locator("#artifacts").screenshot(path=str(RESULTS / f"run-merging-{width}.png"))
    server.manage("shell", "-c", MERGE_FAILS.replace("RUN_ID", run_id))
    page.wait_for_selector("#merge-failed", timeout=15_000)  # across the page's own reload
    assert "No space left on device" in page.inner_text("#merge-failed")
    assert page.inner_text("#merge-form button") == "Try the merge again"
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.locator("#artifacts").screenshot(path=str(RESULTS / f"run-merge-failed-{width}.png"))
