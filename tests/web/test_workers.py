"""Two real huey workers share one queue (SqliteHuey, or RedisHuey + PostgreSQL when configured):
every run executes exactly once, and runs on the one device of this host never overlap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from django.conf import settings

from tests.helpers import GOOD, ROOT, worker_env
from webapp.runs import services
from webapp.runs.models import Run, RunStatus, TrainingConfig

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CONFIG = GOOD.format(steps=5)


def queue_client(name: str):
    from huey import RedisHuey, SqliteHuey

    if settings.REDIS_URL:
        return RedisHuey(name, url=settings.REDIS_URL)
    return SqliteHuey(name, filename=str(settings.DATA_DIR / "huey.sqlite3"))


def test_two_workers_share_the_queue_and_never_overlap_on_one_device(alice, alice_dataset, monkeypatch):
    from webapp.runs import tasks

    user, workspace = alice
    config = TrainingConfig.objects.create(workspace=workspace, name="short", yaml=CONFIG)
    monkeypatch.setattr(tasks, "execute_run", lambda run_id: None)
    runs = [services.enqueue_run(workspace, user, config) for _ in range(3)]

    queue = f"trainyard-test-{uuid.uuid4().hex[:8]}"
    client = queue_client(queue)

    def _execute_run(run_id):  # stands for the real task: same registered name, run by the workers
        raise AssertionError("executed in the test process")

    _execute_run.__module__ = "webapp.runs.tasks"
    enqueue = client.task(name="_execute_run")(_execute_run)
    for run in runs:
        enqueue(run.pk)

    env = {**worker_env(), "TRAINYARD_QUEUE": queue, "TRAINYARD_GPUS": ""}
    env.pop("TRAINYARD_HUEY_IMMEDIATE", None)
    workers = [
        subprocess.Popen(
            [sys.executable, "manage.py", "run_huey", "--workers", "1", "--no-periodic"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if Run.objects.filter(pk__in=[r.pk for r in runs], status__in=["succeeded", "failed"]).count() == 3:
                break
            time.sleep(0.5)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=30)
        client.storage.flush_all()
    done = list(Run.objects.filter(pk__in=[r.pk for r in runs]).order_by("started_at"))
    assert [r.status for r in done] == [RunStatus.SUCCEEDED] * 3, [(r.status, r.message) for r in done]
    for earlier, later in zip(done, done[1:]):
        assert earlier.finished_at <= later.started_at  # one device: one run at a time
    for run in done:
        starts = [
            e
            for e in map(json.loads, (run.run_dir / "events.jsonl").read_text().splitlines())
            if e.get("event") == "status" and e.get("state") == "running"
        ]
        assert len(starts) == 1  # executed exactly once
        assert run.devices and run.devices[0].endswith(":cpu")
    assert os.environ.get("TRAINYARD_HUEY_IMMEDIATE") == "1"  # the test process itself never ran them
