"""Deleting datasets, configs and runs: writers only, nothing in use, shared files kept, no leftovers."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from tests.helpers import CHAT_ROW, jsonl
from webapp.datasets.models import Dataset
from webapp.datasets.services import upload_dataset
from webapp.runs.models import MetricPoint, Run, RunStatus, TrainingConfig
from webapp.workspaces.models import Membership, Role
from webapp.workspaces.services import create_api_token

pytestmark = pytest.mark.django_db


def test_a_dataset_goes_with_its_files_unless_another_workspace_shares_them(alice, bob, alice_client):
    mine = upload_dataset(alice[1], alice[0], SimpleUploadedFile("c.jsonl", jsonl([CHAT_ROW] * 2))).dataset
    theirs = upload_dataset(bob[1], bob[0], SimpleUploadedFile("c.jsonl", jsonl([CHAT_ROW] * 2))).dataset
    assert mine.path == theirs.path
    response = alice_client.post(f"/datasets/{mine.pk}/delete/", follow=True)
    assert "Deleted" in response.content.decode() and not Dataset.objects.filter(pk=mine.pk).exists()
    assert theirs.path.exists()  # bob's copy still reads it
    bob_client = Client()
    bob_client.force_login(bob[0])
    bob_client.post(f"/datasets/{theirs.pk}/delete/")
    assert not theirs.path.exists() and not theirs.index_path.exists()


def test_a_dataset_an_active_run_trains_on_stays(alice, alice_client, alice_dataset):
    Run.objects.create(
        workspace=alice[1], name="r", config_yaml="datasets:\n  - path: chat\n", status=RunStatus.RUNNING
    )
    response = alice_client.post(f"/datasets/{alice_dataset.pk}/delete/", follow=True)
    assert "is training on it" in response.content.decode() and Dataset.objects.filter(pk=alice_dataset.pk).exists()


def test_an_ended_run_goes_with_its_folder_and_rows_an_active_one_stays(alice, alice_client):
    ended = Run.objects.create(workspace=alice[1], name="old", config_yaml="x", status=RunStatus.SUCCEEDED)
    ended.run_dir.mkdir(parents=True, exist_ok=True)  # ids are reused across tests: so are folders
    (ended.run_dir / "train.log").write_text("log\n")
    MetricPoint.objects.create(run=ended, seq=0, step=1, time=0.0, values={"loss": 1.0})
    alice_client.post(f"/runs/{ended.pk}/delete/")
    assert not Run.objects.filter(pk=ended.pk).exists() and not ended.run_dir.exists()
    assert not MetricPoint.objects.filter(run_id=ended.pk).exists()
    active = Run.objects.create(workspace=alice[1], name="now", config_yaml="x", status=RunStatus.RUNNING)
    response = alice_client.post(f"/runs/{active.pk}/delete/", follow=True)
    assert "cancel it first" in response.content.decode() and Run.objects.filter(pk=active.pk).exists()


def test_a_config_goes_and_its_runs_keep_their_yaml(alice, alice_client):
    config = TrainingConfig.objects.create(workspace=alice[1], name="c", yaml="base_model: x\n")
    run = Run.objects.create(workspace=alice[1], config=config, name="r", config_yaml="base_model: x\n")
    alice_client.post(f"/configs/{config.pk}/delete/")
    run.refresh_from_db()
    assert not TrainingConfig.objects.filter(pk=config.pk).exists() and run.config_yaml == "base_model: x\n"


def test_viewers_and_other_workspaces_cannot_delete(alice, bob, bob_client, alice_dataset):
    config = TrainingConfig.objects.create(workspace=alice[1], name="c", yaml="base_model: x\n")
    run = Run.objects.create(workspace=alice[1], name="r", config_yaml="x", status=RunStatus.FAILED)
    urls = [f"/datasets/{alice_dataset.pk}/delete/", f"/configs/{config.pk}/delete/", f"/runs/{run.pk}/delete/"]
    for url in urls:
        assert bob_client.post(url).status_code == 404
    Membership.objects.create(user=bob[0], workspace=alice[1], role=Role.VIEWER)
    for url in urls:
        assert bob_client.post(url).status_code == 403
    assert "delete-form" not in bob_client.get(f"/runs/{run.pk}/").content.decode()
    assert Dataset.objects.filter(pk=alice_dataset.pk).exists() and Run.objects.filter(pk=run.pk).exists()


def test_the_api_deletes_too(alice, alice_dataset):
    _, raw = create_api_token(alice[0], alice[1], "t")
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    config = TrainingConfig.objects.create(workspace=alice[1], name="c", yaml="base_model: x\n")
    run = Run.objects.create(workspace=alice[1], name="r", config_yaml="x", status=RunStatus.QUEUED)
    assert api.delete(f"/api/runs/{run.pk}").status_code == 409
    Run.objects.filter(pk=run.pk).update(status=RunStatus.CANCELLED)
    assert api.delete(f"/api/runs/{run.pk}").status_code == 204
    assert api.delete(f"/api/configs/{config.pk}").status_code == 204
    assert api.delete(f"/api/datasets/{alice_dataset.pk}").status_code == 204
    assert api.get(f"/api/datasets/{alice_dataset.pk}").status_code == 404
