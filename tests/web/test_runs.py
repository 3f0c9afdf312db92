"""Configs and runs through the pages: validation by key path, a real run on the tiny model,
failures with readable reasons, cancel, kill, and privacy of every run URL."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import zipfile

import pytest
from django.utils import timezone

from tests.helpers import GOOD, trainer_pids
from webapp.runs import lifecycle, reaper, services
from webapp.runs.models import Artifact, MetricPoint, Run, RunStatus, TrainingConfig

pytestmark = pytest.mark.django_db(transaction=True)


def save(client, yaml_text, action="save", name="c1"):
    return client.post("/configs/new/", {"name": name, "yaml": yaml_text, "action": action})


def test_invalid_config_names_the_key_and_is_not_saved(alice_client, alice_dataset):
    bad = GOOD.format(steps=5).replace("path: chat", "path: nope").replace("lora_target_linear: true", "lora_r: 0")
    response = save(alice_client, bad)
    page = response.content.decode().replace("&#x27;", "'")
    assert response.status_code == 400
    assert "<code>datasets[0].path</code>: no dataset named 'nope'" in page
    assert "<code>lora_r</code>" in page
    assert TrainingConfig.objects.count() == 0 and Run.objects.count() == 0


@pytest.mark.parametrize(
    "base_model, message",
    [
        ("../../etc", "must be inside the server's model directories"),
        ("owner/bad name!", "neither a model folder name nor a hub id"),
        ("/etc", "must be inside the server's model directories"),
        ("missing-model", "no model folder named 'missing-model'"),
    ],
)
def test_model_paths_outside_the_model_directories_are_refused(alice_client, alice_dataset, base_model, message):
    response = save(alice_client, GOOD.format(steps=5).replace("tiny-chat", base_model))
    assert response.status_code == 400 and message in response.content.decode().replace("&#x27;", "'")


def test_trust_remote_code_is_refused_unless_the_site_allows_it(alice_client, alice_dataset):
    response = save(alice_client, GOOD.format(steps=5) + "trust_remote_code: true\n")
    assert response.status_code == 400 and "an admin must allow it" in response.content.decode()


@pytest.mark.slow
def test_run_trains_streams_metrics_and_offers_the_adapter(alice_client, alice_dataset):
    response = save(alice_client, GOOD.format(steps=12), action="run")
    run = Run.objects.get()
    assert response["Location"] == f"/runs/{run.pk}/"
    run.refresh_from_db()  # huey immediate mode: the task ran the real training subprocess
    assert run.status == RunStatus.SUCCEEDED, (run.message, run.log_path.read_text()[-2000:])
    assert run.current_step == 12 and run.total_steps == 12
    losses = [p.values["loss"] for p in MetricPoint.objects.filter(run=run) if "loss" in p.values]
    assert len(losses) == 12
    artifact = Artifact.objects.get(run=run, kind="adapter")
    download = alice_client.get(f"/runs/{run.pk}/artifacts/{artifact.pk}/download/")
    names = zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content))).namelist()
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json"} <= set(names)
    page = alice_client.get(f"/runs/{run.pk}/").content.decode()
    assert "succeeded" in page and "adapter.zip" in page and "plotly.min.js" in page


@pytest.mark.slow
def test_broken_dataset_row_ends_failed_with_the_line(alice, alice_client, chat_file):
    from webapp.datasets.models import Dataset

    user, workspace = alice
    alice_client.post("/datasets/", {"file": chat_file()})
    dataset = Dataset.objects.get()
    dataset.path.write_text(dataset.path.read_text() + "{oops\n")  # damaged on disk after upload
    save(alice_client, GOOD.format(steps=3), action="run")
    run = Run.objects.get()
    assert run.status == RunStatus.FAILED
    assert "line 4: invalid JSON" in run.message
    assert run.log_path.exists()


def test_cancel_a_queued_run(alice, alice_dataset):
    user, workspace = alice
    config = TrainingConfig.objects.create(workspace=workspace, name="c", yaml=GOOD.format(steps=3))
    run = Run.objects.create(workspace=workspace, config=config, name="r", config_yaml=config.yaml)
    assert services.cancel_run(run)
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED and run.finished_at
    assert not lifecycle.transition(run.pk, [RunStatus.QUEUED], RunStatus.STARTING)  # a late worker can't take it


@pytest.mark.slow
def test_killed_training_process_leaves_run_interrupted_with_its_metrics(alice, alice_dataset, monkeypatch):
    from webapp.runs import supervisor, tasks

    user, workspace = alice
    config = TrainingConfig.objects.create(workspace=workspace, name="c", yaml=GOOD.format(steps=400))
    monkeypatch.setattr(tasks, "execute_run", lambda run_id: None)  # enqueue, but supervise by hand below
    run = services.enqueue_run(workspace, user, config)
    killer = threading.Thread(target=_kill_after_first_points, args=(run,))
    killer.start()
    supervisor.supervise(run.pk, ["test:cpu"])
    killer.join()
    run.refresh_from_db()
    assert run.status == RunStatus.INTERRUPTED and "SIGKILL" in run.message
    assert MetricPoint.objects.filter(run=run).exists()


def _kill_after_first_points(run):
    deadline = time.time() + 120
    events = run.run_dir / "events.jsonl"
    while time.time() < deadline:
        if events.exists() and events.read_text().count('"metric"') >= 3:
            break
        time.sleep(0.2)
    for pid in trainer_pids(run):
        os.kill(pid, signal.SIGKILL)


def test_worker_that_stops_beating_leaves_run_interrupted(alice):
    user, workspace = alice
    run = Run.objects.create(
        workspace=workspace,
        name="r",
        config_yaml="x",
        status=RunStatus.RUNNING,
        heartbeat_at=timezone.now() - timezone.timedelta(seconds=300),
    )
    assert reaper.reap() == 1
    run.refresh_from_db()
    assert run.status == RunStatus.INTERRUPTED and "stopped reporting" in run.message


def test_run_urls_are_private(client, alice, bob_client):
    user, workspace = alice
    run = Run.objects.create(workspace=workspace, name="secret", config_yaml="x", status=RunStatus.SUCCEEDED)
    artifact = Artifact.objects.create(run=run, kind="adapter", path="adapter.zip")
    config = TrainingConfig.objects.create(workspace=workspace, name="c", yaml="x")
    for url in (
        f"/runs/{run.pk}/",
        f"/runs/{run.pk}/artifacts/{artifact.pk}/download/",
        f"/configs/{config.pk}/",
        f"/api/runs/{run.pk}",
        f"/api/runs/{run.pk}/metrics",
    ):
        assert bob_client.get(url).status_code == 404, url
        assert client.get(url).status_code in (302, 401), url
    assert bob_client.post(f"/runs/{run.pk}/cancel/").status_code == 404
    assert bob_client.post(f"/configs/{config.pk}/run/").status_code == 404
    assert bob_client.get("/api/runs/").json() == []


def test_validate_shows_a_memory_estimate_and_export_gives_the_yaml(alice_client, alice_dataset):
    page = alice_client.post("/configs/new/", {"name": "c", "yaml": GOOD.format(steps=5), "action": "validate"})
    assert page.status_code == 200 and 'id="memory-estimate"' in page.content.decode()
    save(alice_client, GOOD.format(steps=5), name="exported")
    config = TrainingConfig.objects.get(name="exported")
    export = alice_client.get(f"/configs/{config.pk}/export.yaml")
    assert export["Content-Disposition"] == 'attachment; filename="exported.yaml"'
    assert export.content.decode() == GOOD.format(steps=5)


def test_the_form_writes_common_keys_into_the_yaml(alice_client, alice_dataset):
    form = {f"f_{k}": "" for k in ("adapter", "lora_r", "max_steps", "learning_rate")}
    form.update(
        {
            "f_base_model": "tiny-chat",
            "f_adapter": "lora",
            "f_lora_r": "32",
            "f_max_steps": "7",
            "f_learning_rate": "0.001",
            "f_gradient_checkpointing": "on",
        }
    )
    response = alice_client.post(
        "/configs/new/", {"name": "c", "yaml": GOOD.format(steps=5), "action": "apply_form", **form}
    )
    text = response.content.decode()
    assert "lora_r: 32" in text and "max_steps: 7" in text and "gradient_checkpointing: true" in text
    more = {
        **form,
        "f_lora_target_modules": "q_proj, v_proj",
        "f_bf16": "false",
        "f_warmup_ratio": "0.1",
        "f_load_in_8bit": "",
        "f_dataset": "chat",
    }
    text = alice_client.post(
        "/configs/new/", {"name": "c", "yaml": GOOD.format(steps=5), "action": "apply_form", **more}
    ).content.decode()
    assert "- q_proj" in text and "- v_proj" in text and "bf16: false" in text and "warmup_ratio: 0.1" in text
    assert 'name="f_lora_target_modules" value="q_proj, v_proj"' in text and 'name="f_dataset" value="chat"' in text
    regex = alice_client.post(
        "/configs/new/",
        {
            "name": "c",
            "yaml": GOOD.format(steps=5),
            "action": "apply_form",
            **{**more, "f_lora_target_modules": ".*proj"},
        },
    ).content.decode()
    assert "lora_target_modules: .*proj" in regex
    bad = alice_client.post(
        "/configs/new/",
        {"name": "c", "yaml": GOOD.format(steps=5), "action": "apply_form", **{**form, "f_lora_r": "many"}},
    )
    assert bad.status_code == 400 and "<code>lora_r</code>: &#x27;many&#x27; is not a valid int" in bad.content.decode()


def test_presets_start_new_configs(alice_client, alice_dataset):
    page = alice_client.get("/configs/new/?preset=qlora-8b").content.decode()
    assert "adapter: qlora" in page and "path: chat" in page


@pytest.mark.slow
def test_cancel_a_running_run_kills_its_process_and_frees_the_device(alice, alice_dataset, monkeypatch, settings):
    from training.events import read_events
    from webapp.runs import gpus, tasks
    from webapp.runs.models import DeviceLease

    settings.TRAINYARD_GPUS = ""
    user, workspace = alice
    config = TrainingConfig.objects.create(workspace=workspace, name="c", yaml=GOOD.format(steps=2000))
    monkeypatch.setattr(tasks, "execute_run", lambda run_id: None)
    run = services.enqueue_run(workspace, user, config)

    def cancel_when_running():
        deadline = time.time() + 120
        while time.time() < deadline:
            r = Run.objects.get(pk=run.pk)
            if r.status == RunStatus.RUNNING and r.current_step > 2:
                services.cancel_run(r)
                return
            time.sleep(0.2)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    tasks._execute_run.call_local(run.pk)
    canceller.join()
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED and run.current_step < 2000
    assert not DeviceLease.objects.exists() and gpus.allocate_gpus(run, 1)
    assert trainer_pids(run) == []
    # Stopped gracefully at a step boundary (the STOP file), not killed: it said so, and wrote no final adapter.
    states = [e.get("state") for e in read_events(run.run_dir / "events.jsonl")[0] if e["event"] == "status"]
    assert states[-1] == "cancelled" and not (run.run_dir / "adapter").exists()


@pytest.mark.slow
def test_playground_answers_with_base_and_adapter_in_a_worker(alice_client, alice_dataset, settings):
    from webapp.runs.models import Generation

    assert (
        alice_client.post("/configs/new/", {"name": "pg", "yaml": GOOD.format(steps=8), "action": "run"}).status_code
        == 302
    )
    run = Run.objects.get(name="pg")
    assert run.status == RunStatus.SUCCEEDED
    response = alice_client.post(f"/runs/{run.pk}/playground/", {"prompt": "What is 2 plus 2?"})
    generation = Generation.objects.get(pk=response.json()["id"])
    data = alice_client.get(f"/runs/{run.pk}/playground/{generation.pk}/").json()
    assert data["status"] == "done", data
    assert data["source"] == "adapter" and isinstance(data["base"], str) and isinstance(data["tuned"], str)
    empty = alice_client.post(f"/runs/{run.pk}/playground/", {"prompt": "  "})
    assert empty.status_code == 400 and empty.json()["error"] == "type a prompt first"


@pytest.mark.slow
def test_merged_model_on_request_and_checkpoint_download(alice_client, alice_dataset):
    yaml_text = GOOD.format(steps=6) + "save_steps: 3\n"
    alice_client.post("/configs/new/", {"name": "m", "yaml": yaml_text, "action": "run"})
    run = Run.objects.get(name="m")
    assert run.status == RunStatus.SUCCEEDED
    checkpoint = Artifact.objects.get(run=run, kind="checkpoint", path="checkpoints/checkpoint-3")
    assert checkpoint.size > 0
    zipped = alice_client.get(f"/runs/{run.pk}/artifacts/{checkpoint.pk}/download/")
    names = zipfile.ZipFile(io.BytesIO(b"".join(zipped.streaming_content))).namelist()
    assert "checkpoint-3/adapter_model.safetensors" in names
    alice_client.post(f"/runs/{run.pk}/merge/")
    merged = Artifact.objects.get(run=run, kind="merged")
    download = alice_client.get(f"/runs/{run.pk}/artifacts/{merged.pk}/download/")
    names = zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content))).namelist()
    assert "merged/model.safetensors" in names and not any("adapter" in n for n in names)
    again = alice_client.post(f"/runs/{run.pk}/merge/", follow=True)
    assert "already there" in again.content.decode()


def test_the_form_keeps_the_yaml_as_written(alice_client, alice_dataset):
    """Comments, key order and number formats survive; unticked boxes add nothing; only changes are written."""
    written = (
        "# my tiny run\n"
        "base_model: tiny-chat  # the demo model\n"
        "datasets:\n"
        "  - path: chat  # uploaded earlier\n"
        "    type: chat_template\n"
        "learning_rate: 2e-4\n"
        "num_epochs: 2\n"
        "lora_r: 8\n"
    )
    form = {"f_base_model": "tiny-chat", "f_dataset": "chat", "f_learning_rate": "2e-4", "f_num_epochs": "2"}
    response = alice_client.post(
        "/configs/new/", {"name": "c", "yaml": written, "action": "apply_form", **form, "f_lora_r": "16"}
    )
    import html

    text = html.unescape(response.content.decode()).split('class="code">', 1)[1].split("</textarea>")[0]
    assert text == written.replace("lora_r: 8", "lora_r: 16")
