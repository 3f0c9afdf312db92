"""Run outcomes that must not lie (issue 14): a diverged run fails with its step and the fix and offers no
NaN weights; disk faults say what is wrong with the disk; a resumed attempt killed before its own first
checkpoint can be resumed again; merges and playground answers at once all succeed."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import GOOD, trainer_pids
from webapp.runs import artifacts, services
from webapp.runs.models import Artifact, MetricPoint, Run, RunStatus, TrainingConfig

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _finite_safetensors(folder) -> bool:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return all(bool(t.isfinite().all()) for t in tensors.values())


def test_a_diverged_run_fails_with_its_step_and_the_fix_and_offers_no_nan_adapter(alice_client, alice_dataset):
    yaml_text = GOOD.format(steps=12).replace("learning_rate: 0.003", "learning_rate: 20") + "save_steps: 2\n"
    alice_client.post("/configs/new/", {"name": "lr20", "yaml": yaml_text, "action": "run"})
    run = Run.objects.get(name="lr20")  # huey immediate: the real trainer ran
    assert run.status == RunStatus.FAILED, (run.status, run.message)
    points = list(MetricPoint.objects.filter(run=run).order_by("seq"))
    first_bad = next(
        p.step
        for p in points
        if any(isinstance(v, str) and v in ("nan", "inf", "-inf") for v in p.values.values())
        or (isinstance(p.values.get("loss"), float) and not math.isfinite(p.values["loss"]))
    )
    assert run.message.startswith(f"training diverged at step {first_bad}: "), run.message
    assert "lower learning_rate (20 now)" in run.message and "max_grad_norm" in run.message
    # The loop stopped at the divergence: no steps of NaN afterwards, and no 0.0 loss standing in for NaN.
    assert max(p.step for p in points) == first_bad
    assert not any(p.values.get("loss") == 0.0 for p in points)
    # No adapter is written or offered; the checkpoints kept hold finite weights, the last one is named.
    assert not (run.run_dir / "adapter").exists()
    assert not Artifact.objects.filter(run=run).exclude(kind="checkpoint").exists()
    kept = sorted(run.run_dir.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert kept and all(_finite_safetensors(c) for c in kept)
    assert f"{kept[-1].name} (step {kept[-1].name.split('-')[1]}) is the last checkpoint with finite weights" in (
        run.message
    )
    assert artifacts.playground_source(run) == kept[-1]
    # The health cell names the divergence and nothing the NaN made up (no "loss fell to 0").
    assert [a["code"] for a in run.health] == ["nonfinite"], run.health
    page = alice_client.get(f"/runs/{run.pk}/").content.decode()
    assert "training diverged at step" in page and "trivial or leaked" not in page


def _supervise_and_kill(run, when) -> None:
    """Supervise `run` in this thread (as a worker does) and SIGKILL its trainer once `when(run)` holds."""
    from webapp.runs import supervisor

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline:
            pids = trainer_pids(run)
            if pids and when(run):
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    supervisor.supervise(run.pk, ["test:cpu"])
    thread.join()
    run.refresh_from_db()


def test_an_attempt_killed_before_its_first_checkpoint_resumes_from_where_it_started(
    alice, alice_client, alice_dataset, monkeypatch
):
    from webapp.runs import tasks

    user, workspace = alice
    config = TrainingConfig.objects.create(
        workspace=workspace, name="long", yaml=GOOD.format(steps=40) + "save_steps: 2\n"
    )
    monkeypatch.setattr(tasks, "execute_run", lambda run_id: None)  # queued; supervised by hand below
    first = services.enqueue_run(workspace, user, config)
    _supervise_and_kill(first, lambda r: (r.run_dir / "checkpoints/checkpoint-2/trainer_state.json").exists())
    assert first.status == RunStatus.INTERRUPTED, first.message
    start = artifacts.latest_checkpoint(first)
    step = int(start.name.split("-")[1])

    second = services.resume_run(first, user)
    assert second.resume_checkpoint == str(start)
    _supervise_and_kill(second, lambda r: True)  # killed as soon as its trainer runs: it saved nothing
    assert second.status == RunStatus.INTERRUPTED and artifacts.latest_checkpoint(second) is None
    # The first run was resumed already (open its newest attempt); the attempt resumes from where it started.
    assert alice_client.post(f"/api/runs/{first.pk}/resume").status_code == 409
    assert alice_client.get(f"/runs/{second.pk}/").context["can_resume"]

    monkeypatch.setattr(tasks, "execute_run", lambda run_id: tasks._execute_run(run_id))  # huey immediate
    response = alice_client.post(f"/api/runs/{second.pk}/resume")
    assert response.status_code == 201, response.content
    third = Run.objects.get(pk=response.json()["id"])
    assert third.resume_checkpoint == str(start) and third.attempt == 3 and third.status == RunStatus.SUCCEEDED
    steps = [p.step for p in MetricPoint.objects.filter(run=third).order_by("seq") if "loss" in p.values]
    assert steps == list(range(1, 41)), steps  # the first attempt's steps up to its checkpoint, then the rest
    assert step < 40


def test_two_merges_and_a_playground_answer_at_once_all_succeed(alice, alice_client, alice_dataset):
    """The worker runs tasks in threads; building a model patches process-wide state (transformers' tie_weights,
    torch's default dtype), so two models loading at once left one untied: "Cannot copy out of meta tensor"."""
    import shutil

    from webapp.runs import tasks
    from webapp.runs.models import Generation

    user, workspace = alice
    alice_client.post("/configs/new/", {"name": "a", "yaml": GOOD.format(steps=2), "action": "run"})
    first = Run.objects.get(name="a")
    assert first.status == RunStatus.SUCCEEDED, first.message
    # A second finished run with the same adapter (copied: training it again would only cost time).
    second = Run.objects.create(
        workspace=workspace, config=first.config, name="b", config_yaml=first.config_yaml, status=RunStatus.SUCCEEDED
    )
    shutil.copytree(first.run_dir, second.run_dir, dirs_exist_ok=True)
    for attempt in range(3):  # the race needs the loads to overlap: a few rounds make a miss unlikely
        for run in (first, second):
            Artifact.objects.filter(run=run, kind="merged").delete()
            shutil.rmtree(run.run_dir / "merged", ignore_errors=True)
        generation = Generation.objects.create(
            run=first, author=user, prompt="What is 2 plus 2?", source=str(first.run_dir / "adapter")
        )
        start = threading.Barrier(3)

        def at_once(start, task, *args):
            start.wait()
            try:
                task.call_local(*args)
            finally:
                from django.db import connection

                connection.close()

        threads = [
            threading.Thread(target=at_once, args=(start, tasks._merge_adapter, first.pk)),
            threading.Thread(target=at_once, args=(start, tasks._merge_adapter, second.pk)),
            threading.Thread(target=at_once, args=(start, tasks._answer_prompt, generation.pk)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        generation.refresh_from_db()
        assert generation.status == "done", (attempt, generation.error)
        for run in (first, second):
            assert Artifact.objects.filter(run=run, kind="merged").count() == 1, (attempt, run.name)
            assert (run.run_dir / "merged" / "model.safetensors").exists()


@contextmanager
def _unwritable(folder: Path):
    """`folder` refuses new files, for real: by its mode for an ordinary user; for root, who ignores modes, by
    the immutable attribute (chattr +i: the kernel refuses even root, as a read-only mount does)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: nothing here refuses root's writes")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def _queued(alice, yaml_text: str, monkeypatch) -> Run:
    from webapp.runs import tasks

    user, workspace = alice
    config = TrainingConfig.objects.create(workspace=workspace, name="disk", yaml=yaml_text)
    monkeypatch.setattr(tasks, "execute_run", lambda run_id: None)  # queued; the worker's task runs below
    return services.enqueue_run(workspace, user, config)


def _work(run: Run) -> Run:
    from webapp.runs import tasks
    from webapp.runs.models import DeviceLease

    tasks._execute_run.call_local(run.pk)
    run.refresh_from_db()
    assert not DeviceLease.objects.filter(run=run).exists()  # whatever the fault, its device is free again
    return run


def test_a_run_folder_that_cannot_be_written_fails_before_its_trainer_starts(alice, alice_dataset, monkeypatch):
    run = _queued(alice, GOOD.format(steps=4), monkeypatch)
    with _unwritable(run.run_dir):
        run = _work(run)
    assert run.status == RunStatus.FAILED, run.message
    assert run.message.startswith("run folder not writable (") and str(run.run_dir) in run.message


def test_a_full_data_dir_fails_the_run_before_its_trainer_starts(alice, alice_dataset, monkeypatch, settings):
    from training.storage import free_mb

    run = _queued(alice, GOOD.format(steps=4), monkeypatch)
    free = free_mb(run.run_dir)
    settings.TRAINYARD_MIN_FREE_MB = free + 10**6  # the real free space, measured against a need it can't meet
    run = _work(run)
    assert run.status == RunStatus.FAILED, run.message
    said = int(run.message.split("(")[1].split(" MB free")[0])
    assert run.message.startswith("no space left on the data dir (") and abs(said - free) < 1000, run.message
    assert not run.log_path.exists()  # no trainer was started


def _full_checkpoint(run_dir: Path) -> None:
    # /dev/full answers every write with ENOSPC: the checkpoint's trainer_state.json is written on a full disk.
    (run_dir / "checkpoints/checkpoint-2").mkdir(parents=True)
    (run_dir / "checkpoints/checkpoint-2/trainer_state.json").symlink_to("/dev/full")


def _full_events(run_dir: Path) -> None:
    (run_dir / "events.jsonl").symlink_to("/dev/full")  # the trainer can't write a single event


@pytest.mark.parametrize(
    "fault, message",
    [
        (_full_checkpoint, "no space left on the disk of the run folder ("),
        (_full_events, "no space left on the disk of the run folder ("),
        ("read-only checkpoints", "run folder not writable ("),
    ],
    ids=["checkpoint-on-a-full-disk", "events-on-a-full-disk", "read-only-checkpoints"],
)
def test_a_disk_fault_while_training_fails_with_its_cause(alice, alice_dataset, monkeypatch, fault, message):
    run = _queued(alice, GOOD.format(steps=4) + "save_steps: 2\n", monkeypatch)
    if fault == "read-only checkpoints":
        (run.run_dir / "checkpoints").mkdir()
        with _unwritable(run.run_dir / "checkpoints"):
            run = _work(run)
        assert "writing checkpoints/checkpoint-2" in run.message
    else:
        fault(run.run_dir)
        run = _work(run)
    assert run.status == RunStatus.FAILED and run.message.startswith(message), run.message
    assert "exited with code" not in run.message
    if fault is _full_events:  # the reason came from the trainer's last log line, the events file being full
        assert "could not record it" in run.message
