"""The notebook-style run page: health alerts from planted metrics, notes, config diff, logs, history."""

from __future__ import annotations

import pytest

from webapp.runs import realtime, recording
from webapp.runs.models import MetricPoint, Run, RunStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def running(alice):
    run = Run.objects.create(
        workspace=alice[1], name="r", config_yaml="base_model: a\nlora_r: 8\n", status=RunStatus.RUNNING
    )
    run.run_dir.mkdir(parents=True, exist_ok=True)
    return run


def test_a_planted_nan_raises_a_health_alert_on_the_page(alice_client, running):
    events = [
        {"event": "metric", "step": i, "time": float(i), "values": {"loss": 3.0, "grad_norm": 1.0}} for i in range(1, 5)
    ]
    events.append({"event": "metric", "step": 5, "time": 5.0, "values": {"loss": "nan", "grad_norm": "nan"}})
    recording.record_events(running.pk, events, 100)
    running.refresh_from_db()
    assert [a["code"] for a in running.health] == ["nonfinite"]
    page = alice_client.get(f"/runs/{running.pk}/").content.decode()
    assert 'class="alert critical"' in page and "is nan at step 5" in page


def test_notes_render_markdown_without_scripts(alice_client, running):
    alice_client.post(f"/runs/{running.pk}/notes/", {"text": "**lr too high** <script>alert(1)</script>"})
    page = alice_client.get(f"/runs/{running.pk}/").content.decode()
    assert "<strong>lr too high</strong>" in page and "<script>alert(1)" not in page
    assert "alice" in page.split('id="notes"')[1]


def test_config_diff_against_another_run(alice_client, alice, running):
    other = Run.objects.create(workspace=alice[1], name="o", config_yaml="base_model: a\nlora_r: 16\n")
    page = alice_client.get(f"/runs/{running.pk}/?diff={other.pk}").content.decode()
    assert '<span class="remove">-lora_r: 16</span>' in page and '<span class="add">+lora_r: 8</span>' in page


def test_full_log_downloads_and_the_page_shows_its_tail(alice_client, running):
    running.log_path.write_text("".join(f"line {i}\n" for i in range(40_000)))
    page = alice_client.get(f"/runs/{running.pk}/").content.decode()
    assert "line 39999" in page and "line 1\n" not in page and "earlier lines in the full log" in page
    full = b"".join(alice_client.get(f"/runs/{running.pk}/log.txt").streaming_content).decode()
    assert full.startswith("line 0\n") and full.endswith("line 39999\n")


def test_history_of_a_long_run_is_downsampled_but_live_points_are_not(running):
    MetricPoint.objects.bulk_create(
        [
            MetricPoint(run=running, seq=i, step=i + 1, time=float(i), values={"loss": 9.0 if i == 7777 else 2.0})
            for i in range(20_000)
        ]
    )
    history = realtime.history(running.pk, -1)
    assert len(history) <= realtime.HISTORY_POINTS + 10
    assert any(p["values"]["loss"] == 9.0 for p in history)
    assert len(realtime.points_after(running.pk, 19_000)) == 999


def test_clone_as_new_run_starts_a_config_from_the_run(alice_client, running):
    page = alice_client.get(f"/configs/new/?from_run={running.pk}").content.decode()
    assert "lora_r: 8" in page and 'value="r-copy"' in page


def test_compare_overlays_runs_and_diffs_their_configs(alice_client, alice, bob_client, running):
    other = Run.objects.create(workspace=alice[1], name="o", config_yaml="base_model: a\nlora_r: 16\n")
    for run, loss in ((running, 2.0), (other, 3.0)):
        MetricPoint.objects.create(run=run, seq=0, step=1, time=0.0, values={"loss": loss})
    page = alice_client.get(f"/runs/compare/?ids={running.pk}&ids={other.pk}").content.decode()
    assert f"run {running.pk} · r" in page and '"loss": 3.0' in page and 'id="config-diff"' in page
    assert "+lora_r: 16" in page
    assert f"run {running.pk} · r" not in bob_client.get(f"/runs/compare/?ids={running.pk}").content.decode()


def test_resume_skips_a_checkpoint_left_half_written(running):
    from webapp.runs.artifacts import latest_checkpoint

    for step, complete in ((10, True), (20, False)):
        folder = running.run_dir / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(running).name == "checkpoint-10"


def test_status_messages_carry_what_the_header_shows(alice):
    """A page opened while queued follows the run: queue place while queued, start time once running."""
    from django.utils import timezone

    first, second = (
        Run.objects.create(workspace=alice[1], name=n, config_yaml="x", status=RunStatus.QUEUED) for n in "ab"
    )
    queued = realtime.status_of(second)
    assert queued["queue_position"] == 2 and queued["started_at"] is None
    Run.objects.filter(pk=first.pk).update(status=RunStatus.RUNNING, started_at=timezone.now())
    first.refresh_from_db()
    assert realtime.status_of(second)["queue_position"] == 1
    running = realtime.status_of(first)
    assert running["queue_position"] is None and running["started_at"] == first.started_at.timestamp()


def test_a_starting_run_says_what_its_trainer_is_doing(alice):
    """The trainer's `preparing` stages become the run's message (what the page header shows, live over
    the status payload) while it starts; `running` clears it; an ended run keeps its outcome."""
    run = Run.objects.create(workspace=alice[1], name="s", config_yaml="x", status=RunStatus.STARTING)
    stage = {"event": "status", "state": "preparing", "stage": "loading_model", "time": 1.0}
    saying = "loading the model (300 rows tokenized into 300 samples)"
    recording.record_events(run.pk, [{**stage, "message": saying}], 10)
    run.refresh_from_db()
    assert realtime.status_of(run)["message"] == saying
    recording.record_events(run.pk, [{"event": "status", "state": "running", "total_steps": 5, "time": 2.0}], 20)
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING and run.message == ""
    Run.objects.filter(pk=run.pk).update(status=RunStatus.FAILED, message="out of memory")
    recording.record_events(run.pk, [{**stage, "message": "late"}], 30)
    assert Run.objects.get(pk=run.pk).message == "out of memory"
