"""Recording is idempotent and fenced: a range of the events file is stored once however often it
is read, only by the worker that holds the run, and a failed publish never causes a re-record; the
migration that brought this in drops the duplicates the old recorder left."""

from __future__ import annotations

import json

import pytest

from webapp.runs import realtime, recording
from webapp.runs.models import MetricPoint, Run, RunStatus

pytestmark = pytest.mark.django_db(transaction=True)


def write_events(run: Run, steps) -> int:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    with (run.run_dir / "events.jsonl").open("a") as f:
        for step in steps:
            event = {"event": "metric", "step": step, "time": step / 10, "values": {"loss": 1 / step}}
            f.write(json.dumps(event) + "\n")
    return (run.run_dir / "events.jsonl").stat().st_size


def test_a_range_read_twice_is_stored_once(alice):
    run = Run.objects.create(workspace=alice[1], name="r", config_yaml="x", status=RunStatus.RUNNING, holder="w1")
    end = write_events(run, range(1, 6))
    from training.events import read_located_events

    located, _ = read_located_events(run.run_dir / "events.jsonl", 0)
    batch = dict(events=[e for _, e in located], offsets=[o for o, _ in located])
    assert recording.record_events(run.pk, batch["events"], end, from_offset=0, holder="w1", offsets=batch["offsets"])
    assert not recording.record_events(run.pk, batch["events"], end, from_offset=0, offsets=batch["offsets"])
    assert recording.catch_up_events(run.pk) == {}  # the reaper's catch-up finds nothing left
    assert list(MetricPoint.objects.filter(run=run).values_list("step", flat=True)) == [1, 2, 3, 4, 5]


def test_a_worker_that_lost_its_run_writes_nothing(alice):
    run = Run.objects.create(workspace=alice[1], name="r", config_yaml="x", status=RunStatus.RUNNING, holder="reaper")
    end = write_events(run, [1])
    event = {"event": "metric", "step": 1, "time": 0.1, "values": {}}
    assert not recording.record_events(run.pk, [event], end, from_offset=0, holder="paused-worker")
    assert not MetricPoint.objects.filter(run=run).exists()
    assert Run.objects.get(pk=run.pk).events_offset == 0


def test_a_failed_publish_neither_raises_nor_records_again(alice, monkeypatch, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"

    def down(run_id, points):
        raise ConnectionError("Redis is down")

    monkeypatch.setattr(realtime, "publish_points", down)
    run = Run.objects.create(workspace=alice[1], name="r", config_yaml="x", status=RunStatus.RUNNING)
    end = write_events(run, [1, 2])
    assert recording.catch_up_events(run.pk) == {}
    assert Run.objects.get(pk=run.pk).events_offset == end  # the offset moved with the commit
    assert MetricPoint.objects.filter(run=run).count() == 2


def test_the_migration_drops_duplicates_left_by_the_old_recorder(alice):
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    before, after = [("runs", "0004_playground")], executor.loader.graph.leaf_nodes("runs")
    executor.migrate(before)
    try:
        apps = executor.loader.project_state(before).apps
        OldRun, OldPoint = apps.get_model("runs", "Run"), apps.get_model("runs", "MetricPoint")
        run = OldRun.objects.create(workspace_id=alice[1].pk, name="r", config_yaml="x", status="succeeded")
        recorded = [(1, 0.5), (2, 0.7), (1, 0.5), (2, 0.7), (3, 0.9), (1, 0.5)]  # steps 1, 2 recorded again
        for seq, (step, at) in enumerate(recorded):
            OldPoint.objects.create(run=run, seq=seq, step=step, time=at, values={"loss": step})
        OldPoint.objects.create(run=run, seq=6, step=3, time=1.1, values={"eval_loss": 2})  # same step, other event
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(after)
    kept = MetricPoint.objects.filter(run_id=run.pk).order_by("seq").values_list("seq", "step")
    assert list(kept) == [(0, 1), (1, 2), (4, 3), (6, 3)]
