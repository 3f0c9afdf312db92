"""The merge of a run's adapter into its base model, as the run page and the API tell it: queued,
merging, failed with the reason (and asked for again), a dead merging worker noticed by the reaper.
The merge itself (a real model) is tested in test_runs.py and test_run_outcomes.py."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from webapp.runs import reaper
from webapp.runs.models import Artifact, MergeState, Run, RunStatus
from webapp.runs.processes import ProcessName

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def finished_run(alice):
    run = Run.objects.create(workspace=alice[1], name="done", config_yaml="x", status=RunStatus.SUCCEEDED)
    (run.run_dir / "adapter").mkdir(parents=True)
    (run.run_dir / "adapter" / "adapter_config.json").write_text("{}")
    (run.run_dir / "config.yaml").write_text("base_model: tiny-chat\n")
    return run


def test_a_failed_merge_says_why_on_the_page_and_can_be_asked_again(alice_client, finished_run, monkeypatch):
    import training.modeling

    def full_disk(base, adapter, out):
        out.mkdir(parents=True)
        (out / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training.modeling, "merge_adapter_into_base", full_disk)
    page = alice_client.post(f"/runs/{finished_run.pk}/merge/", follow=True).content.decode()
    run = Run.objects.get(pk=finished_run.pk)
    assert run.merge_state == MergeState.FAILED and run.merge_holder == ""
    assert "No space left on device" in run.merge_error and "free some" in run.merge_error
    assert not (run.run_dir / "merged").exists()  # the half-written model is gone
    assert 'id="merge-failed"' in page and "No space left on device" in page and "Try the merge again" in page
    api = alice_client.get(f"/api/runs/{run.pk}").json()
    assert api["merge_state"] == "failed" and "No space left" in api["merge_error"]

    def merges(base, adapter, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(training.modeling, "merge_adapter_into_base", merges)
    page = alice_client.post(f"/runs/{run.pk}/merge/", follow=True).content.decode()
    run.refresh_from_db()
    assert (run.merge_state, run.merge_error) == ("", "")
    assert Artifact.objects.filter(run=run, kind="merged").count() == 1
    assert 'id="merge-failed"' not in page and 'id="merge-form"' not in page and "merged.zip" in page


def test_a_merge_under_way_is_shown_and_not_queued_twice(alice_client, finished_run, monkeypatch):
    from webapp.runs import tasks

    queued = []
    monkeypatch.setattr(tasks, "merge_adapter", queued.append)  # the worker has not taken it yet
    assert alice_client.post(f"/api/runs/{finished_run.pk}/merge").status_code == 202
    again = alice_client.post(f"/api/runs/{finished_run.pk}/merge")
    assert again.status_code == 409 and "already under way" in again.json()["message"]
    assert queued == [finished_run.pk]
    page = alice_client.get(f"/runs/{finished_run.pk}/").content.decode()
    assert 'id="merge-status"' in page and 'data-state="queued"' in page and 'id="merge-form"' not in page
    refused = alice_client.post(f"/runs/{finished_run.pk}/delete/", follow=True).content.decode()
    assert "merge of its adapter is under way" in refused and Run.objects.filter(pk=finished_run.pk).exists()


def test_the_reaper_fails_a_merge_whose_worker_died(finished_run):
    gone = subprocess.Popen(["sleep", "30"])
    name = ProcessName.of(gone.pid)
    gone.kill()
    gone.wait()
    Run.objects.filter(pk=finished_run.pk).update(merge_state=MergeState.MERGING, merge_holder=str(name))
    alive = Run.objects.create(
        workspace=finished_run.workspace, name="other", config_yaml="x", status=RunStatus.SUCCEEDED,
        merge_state=MergeState.MERGING, merge_holder=str(ProcessName.of(os.getpid())),
    )
    reaper.reap()
    finished_run.refresh_from_db()
    alive.refresh_from_db()
    assert finished_run.merge_state == MergeState.FAILED and "merge again" in finished_run.merge_error
    assert alive.merge_state == MergeState.MERGING  # a merging worker that lives is left alone
