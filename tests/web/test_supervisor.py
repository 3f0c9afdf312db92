"""The worker's supervisor rides out a database hiccup, keeps beating while it packages artifacts,
the reaper ends a dead worker's run, and no queued run is ever left without a task."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from django.utils import timezone

from webapp.runs import lifecycle, processes, reaper, recording, tasks
from webapp.runs import watch as runwatch
from webapp.runs.models import MetricPoint, Run, RunStatus

pytestmark = pytest.mark.django_db(transaction=True)

TRAINER = """
import json, sys, time
with open(sys.argv[1], "a") as f:
    for step in range(1, 6):
        f.write(json.dumps({"event": "metric", "step": step, "time": step, "values": {"loss": 1.0 / step}}) + "\\n")
        f.flush()
        time.sleep(0.05)
    f.write(json.dumps({"event": "status", "state": "succeeded", "message": "ok"}) + "\\n")
"""


def test_a_failing_write_is_retried_and_nothing_is_lost(alice, monkeypatch):
    holder = str(processes.this_process())
    run = Run.objects.create(workspace=alice[1], name="r", config_yaml="x", status=RunStatus.RUNNING, holder=holder)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    events = run.run_dir / "events.jsonl"
    real, calls = recording.record_events, []

    def flaky(run_id, batch, offset, **kw):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("database is locked")
        return real(run_id, batch, offset, **kw)

    monkeypatch.setattr(recording, "record_events", flaky)
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(events)])
    watch = runwatch.Watch(run.pk, holder, proc, 0, events)
    watch.run()
    run.refresh_from_db()
    assert (proc.returncode, watch.cancelled, run.outcome["state"]) == (0, False, "succeeded")
    assert len(calls) >= 2
    assert list(MetricPoint.objects.filter(run=run).values_list("step", flat=True)) == [1, 2, 3, 4, 5]


def test_packaging_keeps_the_run_alive(alice, settings):
    run = Run.objects.create(workspace=alice[1], name="r", config_yaml="x", status=RunStatus.RUNNING)
    old = timezone.now() - timezone.timedelta(hours=1)
    Run.objects.filter(pk=run.pk).update(heartbeat_at=old)
    settings.TRAINYARD_HEARTBEAT_TIMEOUT = 0.2  # beats every 0.05 s
    with lifecycle.beating(run.pk):
        time.sleep(0.4)  # a long zip
    run.refresh_from_db()
    assert run.heartbeat_at > old + timezone.timedelta(minutes=59)
    assert reaper.reap(max_age_seconds=30) == 0


def test_a_queued_run_without_a_task_is_handed_to_the_queue_again(alice, monkeypatch):
    handed = []
    monkeypatch.setattr(tasks, "execute_run", handed.append)
    long_ago = timezone.now() - timezone.timedelta(minutes=10)
    orphan = Run.objects.create(workspace=alice[1], name="orphan", config_yaml="x")
    waiting = Run.objects.create(workspace=alice[1], name="waiting", config_yaml="x")
    fresh = Run.objects.create(workspace=alice[1], name="fresh", config_yaml="x")
    Run.objects.filter(pk__in=[orphan.pk, waiting.pk]).update(created_at=long_ago)
    Run.objects.filter(pk=waiting.pk).update(heartbeat_at=timezone.now())  # its task beats while it waits
    assert tasks.requeue_orphaned_runs() == 1 and handed == [orphan.pk]
    assert tasks.requeue_orphaned_runs() == 0  # handed over once, not every minute
    assert fresh.pk not in handed


def test_a_queue_that_cannot_be_reached_leaves_the_run_queued(alice, monkeypatch):
    def down(run_id):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(tasks, "_execute_run", down)
    run = Run.objects.create(workspace=alice[1], name="r", config_yaml="x")
    tasks.execute_run(run.pk)  # no exception reaches the page that created the run
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED


def test_health_sees_streaks_across_batches_and_trends_when_the_run_ends(alice):
    from training.health import MIN_STEPS_FOR_TRENDS

    run = Run.objects.create(workspace=alice[1], name="r", config_yaml="x", status=RunStatus.RUNNING)
    for step in range(1, 5):  # the worker records a point or two at a time
        event = {"event": "metric", "step": step, "time": float(step), "values": {"loss": 2.0, "grad_norm": 0.0}}
        recording.record_events(run.pk, [event], step)
    run.refresh_from_db()
    assert "zero_grad" in {a["code"] for a in run.health}

    flat = Run.objects.create(workspace=alice[1], name="flat", config_yaml="x", status=RunStatus.RUNNING)
    steps = MIN_STEPS_FOR_TRENDS + 5  # far fewer points than a periodic trend check waits for
    for step in range(1, steps + 1):
        event = {"event": "metric", "step": step, "time": float(step), "values": {"loss": 2.0, "grad_norm": 1.0}}
        recording.record_events(flat.pk, [event], step)
    flat.refresh_from_db()
    assert "flat_loss" not in {a["code"] for a in flat.health}
    recording.record_events(flat.pk, [{"event": "status", "state": "succeeded"}], steps + 1)
    flat.refresh_from_db()
    assert "flat_loss" in {a["code"] for a in flat.health}


def test_a_dead_workers_run_is_interrupted_by_the_reaper_with_no_page_open(alice):
    """No page is involved (pages only read): the reaper, a thread of every worker, records what the
    dead worker left unread, ends the run interrupted and frees its device."""
    import socket

    from webapp.runs.models import DeviceLease

    run = Run.objects.create(workspace=alice[1], name="r", config_yaml="x", status=RunStatus.RUNNING)
    Run.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - timezone.timedelta(minutes=5))
    DeviceLease.objects.create(device=f"{socket.gethostname()}:cpu", run=run)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "events.jsonl").write_text('{"event": "metric", "step": 7, "time": 1.0, "values": {"loss": 1.0}}\n')
    tasks.reap_once()
    run.refresh_from_db()
    assert run.status == RunStatus.INTERRUPTED and "stopped reporting" in run.message
    assert list(MetricPoint.objects.filter(run=run).values_list("step", flat=True)) == [7]
    assert not DeviceLease.objects.exists()


def test_after_a_database_outage_old_heartbeats_end_no_run(alice):
    """Every heartbeat is old when the database comes back: a reaper that could not reach it either
    waits a whole timeout before it trusts them (tasks._reap_forever), and meanwhile ends only runs
    whose worker process is gone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_name = processes.ProcessName.of(gone.pid)
    gone.wait()
    long_ago = timezone.now() - timezone.timedelta(hours=1)
    silent = Run.objects.create(workspace=alice[1], name="silent", config_yaml="x", status=RunStatus.RUNNING)
    dead = Run.objects.create(workspace=alice[1], name="dead", config_yaml="x", status=RunStatus.RUNNING)
    Run.objects.filter(pk=silent.pk).update(heartbeat_at=long_ago, holder=str(processes.this_process()))
    Run.objects.filter(pk=dead.pk).update(heartbeat_at=long_ago, holder=str(gone_name))
    assert reaper.reap(trust_heartbeats=False) == 1
    assert Run.objects.get(pk=silent.pk).status == RunStatus.RUNNING
    assert Run.objects.get(pk=dead.pk).status == RunStatus.INTERRUPTED
    assert reaper.reap() == 1  # trusted again: the silent one ends too


def test_a_worker_whose_run_was_taken_over_stops_writing(alice):
    run = Run.objects.create(workspace=alice[1], name="r", config_yaml="x", status=RunStatus.RUNNING, holder="reaper")
    run.run_dir.mkdir(parents=True, exist_ok=True)
    events = run.run_dir / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(events)])
    with pytest.raises(runwatch.LeaseLost):
        runwatch.Watch(run.pk, "paused-worker", proc, 0, events).run()
    proc.wait()
    assert not MetricPoint.objects.filter(run=run).exists()
