"""A worker killed mid-run: its trainer dies with it, the run ends interrupted with its metrics and
checkpoints, and resuming it as a new attempt finishes the training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import GOOD, ROOT, trainer_pids, worker_env
from webapp.runs import reaper, services
from webapp.runs.models import MetricPoint, RunStatus, TrainingConfig

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
CONFIG = GOOD.format(steps=300) + "save_steps: 20\n"


def test_killed_worker_leaves_run_interrupted_and_resume_finishes(alice, alice_dataset, monkeypatch):
    from webapp.runs import tasks

    user, workspace = alice
    config = TrainingConfig.objects.create(workspace=workspace, name="long", yaml=CONFIG)
    monkeypatch.setattr(tasks, "execute_run", lambda run_id: None)  # queue it; a real worker process takes it
    run = services.enqueue_run(workspace, user, config)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); from webapp.runs.supervisor import supervise; "
            f"supervise({run.pk}, ['test:cpu'])",
        ],
        cwd=ROOT,
        env=worker_env(),
        start_new_session=True,
    )
    checkpoint = run.run_dir / "checkpoints" / "checkpoint-20"
    deadline = time.time() + 120
    while not (checkpoint / "trainer_state.json").exists() and time.time() < deadline and worker.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), (run.run_dir / "train.log").read_text()[-3000:]
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    for _ in range(50):  # the trainer gets SIGKILL when its worker dies
        if not trainer_pids(run):
            break
        time.sleep(0.1)
    assert trainer_pids(run) == []

    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING  # nobody has noticed yet
    assert reaper.reap() == 1  # its worker's pid is gone: no heartbeat timeout to wait
    run.refresh_from_db()
    assert run.status == RunStatus.INTERRUPTED and "resume it" in run.message
    recorded = MetricPoint.objects.filter(run=run).count()
    assert recorded >= 20

    monkeypatch.setattr(tasks, "execute_run", lambda run_id: tasks._execute_run(run_id))  # huey immediate
    resumed = services.resume_run(run, user)
    resumed.refresh_from_db()
    assert resumed.status == RunStatus.SUCCEEDED, (resumed.message, resumed.log_path.read_text()[-3000:])
    assert resumed.attempt == 2 and resumed.resumed_from_id == run.pk
    steps = [p.step for p in MetricPoint.objects.filter(run=resumed) if "loss" in p.values]
    assert steps[:20] == list(range(1, 21)) and steps[-1] == 300 and len(steps) == len(set(steps))
    assert "Resuming" in resumed.log_path.read_text() or steps[20] == 21
