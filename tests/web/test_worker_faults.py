"""Faults of the worker side (issue 14), each reproduced with real processes: a worker killed after
its trainer succeeded, a Redis outage while recording, a worker paused past its heartbeat timeout
while its trainer trains on, a worker killed or politely stopped. The trainer is the stand-in
(tests/stand_in_trainer.py): these faults need a process that writes events, not a trained model.
Timings are printed (`pytest -s`) and written down in docs/faults.md."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from django.conf import settings

from tests.helpers import ROOT, worker_env
from webapp.runs import reaper, services
from webapp.runs.lifecycle import CannotResume
from webapp.runs.models import Artifact, DeviceLease, MetricPoint, Run, RunStatus
from webapp.runs.processes import ProcessName

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

STAND_IN = ROOT / "tests" / "stand_in_trainer.py"
BOOT = (  # a worker process whose trainers are the stand-in
    "import sys, django; django.setup(); from webapp.runs import supervisor; "
    f"supervisor.command = lambda run, devices: [sys.executable, {str(STAND_IN)!r}, '--run-dir', str(run.run_dir)]; "
)
DEVICE = f"{socket.gethostname()}:cpu"


def make_run(workspace, name="r") -> Run:
    run = Run.objects.create(workspace=workspace, name=name, config_yaml="x")
    run.run_dir.mkdir(parents=True, exist_ok=True)
    return run


def holding_worker(run: Run, **env) -> subprocess.Popen:
    """A worker process that takes the run and holds it while it trains (what a huey thread runs)."""
    code = BOOT + f"from webapp.runs import tasks; tasks._execute_run.call_local({run.pk})"
    environment = {**worker_env(), "TRAINYARD_GPUS": "", **env}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=environment, start_new_session=True)


def worker_command(queue: str, log_path, **env) -> subprocess.Popen:
    """`manage.py worker` on a queue of its own (its reaper thread included)."""
    code = BOOT + "from django.core.management import call_command; call_command('worker', workers=2)"
    environment = {**worker_env(), "TRAINYARD_QUEUE": queue, "TRAINYARD_GPUS": "", **env}
    environment["TRAINYARD_WARM_TRAINERS"] = "0"  # the stand-in trainer is started fresh
    environment.pop("TRAINYARD_HUEY_IMMEDIATE", None)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=environment, stdout=log, stderr=log, start_new_session=True
        )


def enqueue(queue: str, run: Run) -> None:
    from huey import RedisHuey, SqliteHuey

    client = (
        RedisHuey(queue, url=settings.REDIS_URL)
        if settings.REDIS_URL
        else SqliteHuey(queue, filename=str(settings.DATA_DIR / "huey.sqlite3"))
    )

    def _execute_run(run_id):  # stands for the real task: same registered name, run by the worker
        raise AssertionError("executed in the test process")

    _execute_run.__module__ = "webapp.runs.tasks"
    client.task(name="_execute_run")(_execute_run)(run.pk)


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)


def status(run: Run) -> str:
    return Run.objects.values_list("status", flat=True).get(pk=run.pk)


def steps_recorded(run: Run) -> int:
    return MetricPoint.objects.filter(run=run).count()


def trainer_of(run: Run) -> ProcessName:
    return wait_for(lambda: ProcessName.parse(Run.objects.get(pk=run.pk).trainer), 20, "the trainer started")


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_recorded_once(run: Run) -> None:
    rows = list(MetricPoint.objects.filter(run=run).values_list("step", "offset"))
    assert len(rows) == len({s for s, _ in rows}) == len({o for _, o in rows}), rows


def test_a_worker_killed_after_its_trainer_succeeded_leaves_the_run_succeeded(alice, alice_client):
    """Killed between the trainer's `succeeded` and recording it: the run was shown `interrupted`,
    its adapter not downloadable, and a resume trained on past the end."""
    run = make_run(alice[1])
    worker = holding_worker(run, STAND_IN_STEPS="30")
    try:
        wait_for(lambda: steps_recorded(run) >= 3, 30, "training")
        os.killpg(worker.pid, signal.SIGSTOP)  # the worker can no longer read what its trainer writes
        events = run.run_dir / "events.jsonl"
        wait_for(lambda: '"succeeded"' in events.read_text(), 20, "the trainer succeeded")
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    finally:
        stop(worker)
    assert status(run) == RunStatus.RUNNING  # nobody has noticed yet
    assert reaper.reap() == 1  # what every worker's reaper does every few seconds
    run.refresh_from_db()
    assert (run.status, run.message) == (RunStatus.SUCCEEDED, "final loss 0.0333"), run.message
    assert run.current_step == 30 and steps_recorded(run) == 30
    adapter = Artifact.objects.get(run=run, kind="adapter")
    download = alice_client.get(f"/runs/{run.pk}/artifacts/{adapter.pk}/download/")
    assert download.status_code == 200 and b"adapter/adapter_model.safetensors" in b"".join(download.streaming_content)
    with pytest.raises(CannotResume, match="this one is succeeded"):
        services.resume_run(run, alice[0])


def test_a_redis_outage_while_recording_stores_each_metric_once(alice):
    """Scaled mode with Redis down: the rows committed, the publish failed, and the worker recorded
    the same events again every second (steps stored up to 11 times). Publishing is best-effort."""
    run = make_run(alice[1])
    with socket.socket() as s:  # a port nothing listens on: every publish fails
        s.bind(("127.0.0.1", 0))
        dead_redis = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    worker = holding_worker(run, REDIS_URL=dead_redis, STAND_IN_STEPS="40")
    try:
        wait_for(lambda: worker.poll() is not None, 60, "the worker finished the run")
    finally:
        stop(worker)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.message
    assert steps_recorded(run) == 40
    assert_recorded_once(run)


def test_a_paused_worker_is_fenced_off_before_its_device_is_given_to_the_next_run(alice, tmp_path):
    """SIGSTOP a worker past its heartbeat timeout: another worker of the host kills its trainer
    before freeing the device (the next run never shares it), ends the run interrupted, and the
    thawed worker finds its lease taken and writes nothing more."""
    fast = {"TRAINYARD_HEARTBEAT_TIMEOUT": "2", "TRAINYARD_REAP_SECONDS": "0.5", "STAND_IN_STEP_SECONDS": "0.05"}
    first, second = make_run(alice[1], "first"), make_run(alice[1], "second")
    queue = f"trainyard-test-{uuid.uuid4().hex[:8]}"
    paused = holding_worker(first, STAND_IN_STEPS="2000", **fast)
    other = worker_command(queue, tmp_path / "worker.log", STAND_IN_STEPS="2000", **fast)
    try:
        wait_for(lambda: steps_recorded(first) >= 3, 30, "the first run trains")
        trainer = trainer_of(first)
        enqueue(queue, second)  # waits for the device the first run holds
        looked_after = Run.objects.filter(pk=second.pk, heartbeat_at__isnull=False).exists
        wait_for(looked_after, 60, "the other worker's task waits for the device")
        assert status(second) == RunStatus.QUEUED
        os.killpg(paused.pid, signal.SIGSTOP)  # the worker only: its trainer leads a group of its own
        paused_at = time.monotonic()
        wait_for(lambda: status(first) == RunStatus.INTERRUPTED, 15, "the paused worker's run ended")
        ended = time.monotonic() - paused_at
        assert not trainer.alive()  # stopped before its device was freed
        wait_for(lambda: status(second) == RunStatus.RUNNING, 15, "the next run started on the device")
        started = time.monotonic() - paused_at
        assert not trainer.alive()
        recorded = steps_recorded(first)
        os.killpg(paused.pid, signal.SIGCONT)
        wait_for(lambda: paused.poll() is not None, 10, "the thawed worker gave up the run")
        first.refresh_from_db()
        assert first.status == RunStatus.INTERRUPTED and "stopped reporting" in first.message
        assert steps_recorded(first) == recorded  # the thawed worker wrote nothing
        assert_recorded_once(first)
        assert list(DeviceLease.objects.values_list("device", "run")) == [(DEVICE, second.pk)]
        print(f"\npaused worker: run interrupted, its trainer stopped after {ended:.1f} s (heartbeat timeout 2 s),")
        print(f"  the next run started on the device after {started:.1f} s")
    finally:
        stop(paused, other)


def test_a_worker_paused_in_the_middle_of_recording_is_stopped_to_free_the_run(alice):
    """Paused inside its recording transaction, a worker holds the run's row (with SQLite, every
    write of the site): the reaper can't take the run over, so it stops that worker of its host."""
    run = make_run(alice[1])
    code = (
        "import os, signal, django; django.setup(); from django.db import transaction; "
        "from django.utils import timezone; from webapp.runs.models import Run; "
        "from webapp.runs.processes import this_process; "
        f"old = timezone.now() - timezone.timedelta(hours=1); runs = Run.objects.filter(pk={run.pk}); "
        "runs.update(status='running', holder=str(this_process()), heartbeat_at=old); "
        "atomic = transaction.atomic(); atomic.__enter__(); runs.update(events_offset=1); "
        "os.kill(os.getpid(), signal.SIGSTOP)"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=worker_env(), start_new_session=True)
    try:
        holder = wait_for(lambda: ProcessName.parse(Run.objects.get(pk=run.pk).holder), 30, "the worker holds it")
        wait_for(lambda: open(f"/proc/{worker.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", 30, "paused")
        began = time.monotonic()
        assert reaper.reap() == 0  # the row is locked: its worker is stopped instead
        # After the take-over's own lock wait (2 s), not SQLite's 30 s busy timeout: with IMMEDIATE
        # transactions BEGIN waited under the default (31 s before; CI's 15 s window was missed).
        assert time.monotonic() - began < 10
        assert worker.wait(timeout=10) == -signal.SIGKILL and not holder.alive()
        assert reaper.reap() == 1
        run.refresh_from_db()
        assert run.status == RunStatus.INTERRUPTED and run.events_offset == 0  # its write was rolled back
    finally:
        stop(worker)


def test_a_killed_worker_is_noticed_by_another_worker_of_the_host_within_seconds(alice, tmp_path):
    run = make_run(alice[1])
    queue = f"trainyard-test-{uuid.uuid4().hex[:8]}"
    killed = holding_worker(run, STAND_IN_STEPS="2000", STAND_IN_STEP_SECONDS="0.05")
    other = worker_command(queue, tmp_path / "worker.log")  # default reaper period: every 5 s
    try:
        wait_for(lambda: steps_recorded(run) >= 3, 30, "training")
        wait_for(lambda: "consumer started" in (tmp_path / "worker.log").read_text(), 30, "the other worker started")
        trainer = trainer_of(run)
        os.killpg(killed.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: status(run) == RunStatus.INTERRUPTED and not DeviceLease.objects.exists(), 15, "noticed")
        seconds = time.monotonic() - killed_at
        assert not trainer.alive()
        assert "worker process died" in Run.objects.get(pk=run.pk).message
        print(f"\nkill -9 of a worker: run interrupted and device free after {seconds:.1f} s (reaper every 5 s)")
    finally:
        stop(killed, other)


def test_a_worker_that_starts_ends_its_dead_predecessors_runs_at_once(alice, tmp_path):
    run = make_run(alice[1])
    killed = holding_worker(run, STAND_IN_STEPS="2000", STAND_IN_STEP_SECONDS="0.05")
    restarted = None
    try:
        wait_for(lambda: steps_recorded(run) >= 3, 30, "training")
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        time.sleep(1)
        assert status(run) == RunStatus.RUNNING  # no worker is left to notice
        started_at = time.monotonic()
        restarted = worker_command(f"trainyard-test-{uuid.uuid4().hex[:8]}", tmp_path / "worker.log")
        wait_for(lambda: status(run) == RunStatus.INTERRUPTED and not DeviceLease.objects.exists(), 30, "noticed")
        seconds = time.monotonic() - started_at
        print(f"\nworker restarted after a kill -9: run interrupted and device free {seconds:.1f} s after its start")
    finally:
        stop(killed, *([restarted] if restarted else []))


def test_sigterm_of_a_worker_records_its_runs_interrupted(alice, tmp_path):
    run = make_run(alice[1])
    queue = f"trainyard-test-{uuid.uuid4().hex[:8]}"
    worker = worker_command(queue, tmp_path / "worker.log", STAND_IN_STEPS="2000", STAND_IN_STEP_SECONDS="0.05")
    try:
        enqueue(queue, run)
        wait_for(lambda: steps_recorded(run) >= 3, 30, "training")
        trainer = trainer_of(run)
        os.kill(worker.pid, signal.SIGTERM)
        stopped_at = time.monotonic()
        wait_for(lambda: status(run) == RunStatus.INTERRUPTED, 15, "the run recorded interrupted")
        seconds = time.monotonic() - stopped_at
        assert worker.wait(timeout=15) == 0
        run.refresh_from_db()
        assert "worker was stopped" in run.message and not trainer.alive()
        assert not DeviceLease.objects.exists()
        print(f"\nSIGTERM of a worker: run interrupted after {seconds:.1f} s")
    finally:
        stop(worker)
