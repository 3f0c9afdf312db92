"""The worker's start: heavy libraries imported once before any task runs (three tasks needing
transformers at once in a fresh worker all succeed), and warm trainers (webapp/runs/warm.py): started
ahead with a run's environment, handed a run, and then exactly a fresh trainer to whoever watches it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from tests.helpers import GOOD, ROOT, worker_env
from webapp.runs import gpus, warm

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _queue_client(name: str):
    from huey import RedisHuey, SqliteHuey

    if settings.REDIS_URL:
        return RedisHuey(name, url=settings.REDIS_URL)
    return SqliteHuey(name, filename=str(settings.DATA_DIR / "huey.sqlite3"))


def test_three_tasks_importing_transformers_at_once_in_a_fresh_worker_all_succeed(
    alice_dataset, tiny_model_dir, monkeypatch
):
    """Dataset statistics load a tokenizer with `from transformers import AutoTokenizer`; three of them
    started together in a fresh worker used to import transformers from three threads at once, and some
    failed with "cannot import name 'AutoTokenizer' from 'transformers'"."""
    from webapp.datasets import services
    from webapp.datasets.encoding import EncodeOptions
    from webapp.datasets.models import DatasetStats

    monkeypatch.setattr(services, "compute_dataset_stats", lambda stats_id: None)  # the worker below runs them
    stats = [
        services.request_stats(alice_dataset, EncodeOptions(model="tiny-chat", sequence_len=n)) for n in (64, 128, 256)
    ]
    queue = f"trainyard-test-{uuid.uuid4().hex[:8]}"
    client = _queue_client(queue)

    def _compute_dataset_stats(stats_id):  # stands for the real task: same registered name
        raise AssertionError("executed in the test process")

    _compute_dataset_stats.__module__ = "webapp.datasets.tasks"
    enqueue = client.task(name="_compute_dataset_stats")(_compute_dataset_stats)
    for s in stats:  # queued before the worker starts: its three threads take one each at once
        enqueue(s.pk)

    env = {**worker_env(), "TRAINYARD_QUEUE": queue, "TRAINYARD_WARM_TRAINERS": "0"}
    env.pop("TRAINYARD_HUEY_IMMEDIATE", None)
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "run_huey", "--workers", "3", "--no-periodic"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        ids = [s.pk for s in stats]
        while time.time() < deadline:
            done = DatasetStats.objects.filter(pk__in=ids, status__in=["done", "failed"])
            if done.count() == 3:
                break
            time.sleep(0.3)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        client.storage.flush_all()
    results = list(DatasetStats.objects.filter(pk__in=ids).values_list("status", "error"))
    assert [status for status, _ in results] == ["done"] * 3, results


# -- warm trainers ---------------------------------------------------------------------------------


def test_a_fresh_worker_hands_its_first_run_to_a_warm_trainer(alice, alice_dataset, monkeypatch, tmp_path):
    """The worker as `make run` starts it: its warm trainer (started with the environment the supervisor
    gives a run on the first device) takes the run, which trains as usual."""
    from webapp.runs import services, tasks
    from webapp.runs.models import Run, RunStatus, TrainingConfig

    user, workspace = alice
    config = TrainingConfig.objects.create(workspace=workspace, name="warm", yaml=GOOD.format(steps=3))
    monkeypatch.setattr(tasks, "execute_run", lambda run_id: None)
    run = services.enqueue_run(workspace, user, config)
    queue = f"trainyard-test-{uuid.uuid4().hex[:8]}"
    client = _queue_client(queue)

    def _execute_run(run_id):  # stands for the real task: same registered name, run by the worker
        raise AssertionError("executed in the test process")

    _execute_run.__module__ = "webapp.runs.tasks"
    client.task(name="_execute_run")(_execute_run)(run.pk)
    env = {**worker_env(), "TRAINYARD_QUEUE": queue, "TRAINYARD_GPUS": ""}
    env.pop("TRAINYARD_HUEY_IMMEDIATE", None)
    env.pop("TRAINYARD_WARM_TRAINERS", None)  # the default: one
    with (tmp_path / "worker.log").open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "manage.py", "run_huey", "--workers", "1", "--no-periodic"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and Run.objects.filter(pk=run.pk, status__in=["succeeded", "failed"]).count() == 0:
            time.sleep(0.3)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        client.storage.flush_all()
    run.refresh_from_db()
    output = (tmp_path / "worker.log").read_text()
    assert run.status == RunStatus.SUCCEEDED, (run.message, output[-3000:])
    assert run.points.count() >= 3
    assert f"{run.run_dir}: handed to warm trainer" in output, output[-3000:]


@pytest.fixture
def pool():
    trainers = warm.WarmTrainers(size=1)
    yield trainers
    trainers.stop_all()


def _ready(trainers: warm.WarmTrainers, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while trainers.idle_count() < 1:
        assert time.time() < deadline, "no warm trainer started"
        time.sleep(0.1)


def _train_command(run_dir, steps: int = 3):
    config = run_dir / "config.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(GOOD.format(steps=steps).replace("path: chat", f"path: {run_dir / 'chat.jsonl'}"))
    from training.demo import chat_rows

    (run_dir / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(40)))
    return [sys.executable, "-m", "training", "train", str(config), "--run-dir", str(run_dir)]


def test_a_warm_trainer_trains_the_run_and_is_replaced_after_it(pool, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("TRAINYARD_MODEL_DIRS", str(tiny_model_dir.parent))
    env = warm.trainer_env(gpus.inventory()[:1])
    pool.prewarm(env)
    _ready(pool)
    run_dir = tmp_path / "run"
    command = _train_command(run_dir)
    log = run_dir / "train.log"
    proc = pool.take(command, env, run_dir, log)
    assert proc is not None
    deadline = time.time() + 60
    while not (run_dir / "events.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    # ps and pgrep -f see the fresh trainer's command line (what tests/helpers.trainer_pids looks for).
    assert Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[: len(command)] == [
        a.encode() for a in command
    ]
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["state"] == "succeeded"
    assert sum(e["event"] == "metric" and "loss" in e["values"] for e in events) == 3
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert '"steps": 3' in log.read_text()  # the trainer's own output is in the run's log
    _ready(pool)  # a new one, once the run's trainer has exited
    assert pool.take(command, env, run_dir, log).pid != proc.pid


def test_only_a_plain_trainer_with_the_same_environment_is_warm(pool, tmp_path):
    env = warm.trainer_env(gpus.inventory()[:1])
    pool.prewarm(env)
    _ready(pool)
    command = _train_command(tmp_path / "run")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", *command[1:]]
    assert pool.take(launch, env, tmp_path, tmp_path / "log") is None  # several processes: always fresh
    assert pool.take(command, {**env, "CUDA_VISIBLE_DEVICES": "1"}, tmp_path, tmp_path / "log") is None
    assert pool.idle_count() == 1  # still there for the run it fits


def test_a_warm_trainer_is_stopped_by_its_process_group(pool, tmp_path, tiny_model_dir, monkeypatch):
    """Cancel and the reaper stop a trainer with killpg(pid): a warm one leads its own group too."""
    monkeypatch.setenv("TRAINYARD_MODEL_DIRS", str(tiny_model_dir.parent))
    env = warm.trainer_env(gpus.inventory()[:1])
    pool.prewarm(env)
    _ready(pool)
    run_dir = tmp_path / "run"
    proc = pool.take(_train_command(run_dir, steps=100000), env, run_dir, run_dir / "train.log")
    assert os.getpgid(proc.pid) == proc.pid
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM


def test_the_pool_keeps_its_size_and_starts_nothing_once_stopped(pool):
    first = warm.trainer_env(gpus.inventory()[:1])
    pool.prewarm(first)
    _ready(pool)
    older = pool._idle[0][1]
    second = {**first, "CUDA_VISIBLE_DEVICES": "1"}  # the device a run just left: the likelier next one
    pool.prewarm(second)
    deadline = time.time() + 30
    while older.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert older.poll() is not None and [env for env, _ in pool._idle] == [second]
    pool.stop_all()
    assert pool.idle_count() == 0
    pool.prewarm(first)  # a run ending while the worker stops
    time.sleep(1)
    assert pool.idle_count() == 0


KEEPER = """
import sys, time, django
django.setup()
from webapp.runs import gpus, warm
pool = warm.WarmTrainers(size=1)
pool.prewarm(warm.trainer_env(gpus.inventory()[:1]))
while not pool.idle_count():
    time.sleep(0.05)
print(pool._idle[0][1].pid, flush=True)
time.sleep(600)
"""


def test_a_warm_trainer_dies_with_its_worker():
    worker = subprocess.Popen(
        [sys.executable, "-c", KEEPER],
        cwd=ROOT,
        env={**worker_env(), "DJANGO_SETTINGS_MODULE": "webapp.settings"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        trainer = int(worker.stdout.readline())
        os.kill(trainer, 0)  # alive
    finally:
        worker.kill()
        worker.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(trainer, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"warm trainer {trainer} outlived its worker")


def test_an_idle_worker_looks_at_its_queue_at_least_every_quarter_second(monkeypatch):
    """A run queued on an idle worker waited up to 10 s before a trainer started (huey's polling backs off to
    10 s on SQLite, which can't wake a worker). With Redis a worker's read blocks and wakes at once."""
    from huey.contrib.djhuey import HUEY

    if settings.REDIS_URL:
        from huey import RedisHuey

        assert RedisHuey(settings.QUEUE_NAME, url=settings.REDIS_URL).storage.blocking
        return
    consumer = HUEY.create_consumer(workers=1, **settings.HUEY.get("consumer", {}))
    worker = consumer.worker_threads[0][0]
    waits = []
    monkeypatch.setattr(worker.stop_flag, "wait", waits.append)
    monkeypatch.setattr(HUEY, "dequeue", lambda: None)  # an empty queue for a long while
    for _ in range(200):
        worker.loop()
    assert len(waits) == 200 and max(waits) <= 0.25


WEB = """
import sys, time
import webapp.asgi  # what uvicorn loads
started = time.time()
while "torch.cuda" not in sys.modules and time.time() - started < 30:  # no request made
    time.sleep(0.05)
print("torch.cuda" in sys.modules)
"""


def test_the_web_server_imports_torch_in_the_background_for_the_first_config_check():
    """Checking a config against this machine imports torch (~6 s): the first "Start run" after a start took
    that long. The web server imports it in a background thread as it starts (embedded mode)."""
    env = {k: v for k, v in worker_env().items() if k != "REDIS_URL"}
    out = subprocess.run([sys.executable, "-c", WEB], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
