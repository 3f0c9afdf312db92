"""A sharded run is one gang: it gets all its devices at once or none, in queue order, and every one
of its ranks stops when the run is cancelled or its worker dies. Devices are fake (TRAINYARD_GPUS)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from webapp.runs import gpus, services, supervisor, tasks, watch
from webapp.runs.models import DeviceLease, Run, RunStatus

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def four_gpus(settings):
    settings.TRAINYARD_GPUS = "0,1,2,3"


def queued(workspace, gpus_: int, priority: int = 0) -> Run:
    return Run.objects.create(workspace=workspace, name=f"r{gpus_}", config_yaml="x", gpus=gpus_, priority=priority)


def start(run: Run) -> list[str] | None:
    """What the worker's task does: claim the devices and, if it got them, leave the queue."""
    devices = gpus.claim_devices(run)
    if devices:
        Run.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING)
    return devices


def finish(run: Run) -> None:
    Run.objects.filter(pk=run.pk).update(status=RunStatus.SUCCEEDED)
    gpus.release_gpus(run.pk)


def held(run: Run) -> int:
    return DeviceLease.objects.filter(run=run).count()


def test_two_pairs_and_a_four_share_four_gpus_without_deadlock(alice, four_gpus):
    a, b, big = queued(alice[1], 2), queued(alice[1], 2), queued(alice[1], 4)
    got_a, got_b = start(a), start(b)
    assert len(got_a) == len(got_b) == 2 and set(got_a).isdisjoint(got_b)
    assert start(big) is None and held(big) == 0  # nothing free: it holds nothing while it waits
    finish(a)
    assert start(big) is None and held(big) == 0  # two free are not four: still nothing held
    finish(b)
    assert len(start(big)) == 4 and held(big) == 4


def test_a_big_run_first_in_line_is_not_overtaken_by_smaller_later_runs(alice, four_gpus):
    running = queued(alice[1], 2)
    assert start(running)
    big = queued(alice[1], 4)
    small = queued(alice[1], 1)
    assert start(big) is None
    assert start(small) is None and held(small) == 0  # two devices are free, but the big run is first
    assert gpus.queue_position(big) == 1 and gpus.queue_position(small) == 2
    finish(running)
    assert len(start(big)) == 4
    assert start(small) is None  # now nothing is free
    finish(big)
    assert start(small)


def test_priority_goes_first_and_then_age(alice, four_gpus):
    old_big = queued(alice[1], 4)
    urgent_pair = queued(alice[1], 2, priority=5)
    assert start(old_big) is None  # the urgent run is first in line
    assert len(start(urgent_pair)) == 2
    assert start(old_big) is None  # waits for all four
    finish(urgent_pair)
    assert len(start(old_big)) == 4


def test_a_run_that_can_never_fit_is_refused_even_behind_others(alice, four_gpus):
    queued(alice[1], 2)
    with pytest.raises(ValueError, match="asks for 8 GPUs; this host has 4"):
        gpus.claim_devices(queued(alice[1], 8))


def test_losing_a_race_for_one_device_leaves_none_held(alice, four_gpus, monkeypatch):
    """Another worker takes one of the chosen devices between our look and our insert: the whole
    insert is rolled back, so the run never holds part of its gang."""
    other, run = queued(alice[1], 1), queued(alice[1], 3)
    Run.objects.filter(pk=other.pk).update(status=RunStatus.RUNNING)
    manager = type(DeviceLease.objects)
    real_bulk_create = manager.bulk_create

    def racing_bulk_create(self, objs, *args, **kwargs):
        if self.model is DeviceLease and objs and objs[0].run_id == run.pk:
            DeviceLease.objects.create(device=objs[-1].device, run=other)  # the other worker wins it
        return real_bulk_create(self, objs, *args, **kwargs)

    monkeypatch.setattr(manager, "bulk_create", racing_bulk_create)
    assert gpus.claim_devices(run) is None  # three were free when it looked; it lost one of them
    assert held(run) == 0  # and holds none of the other two (the other worker's row went with our
    # rolled-back transaction here, as both share this test's connection)


def test_the_worker_task_waits_in_line_then_starts_the_gang(alice, four_gpus, monkeypatch):
    """tasks._execute_run: a run that can't have its devices is looked at again later and holds
    none; once they are free it is supervised with all of them and they are released after."""
    started, again = [], []
    monkeypatch.setattr(supervisor, "supervise", lambda run_id, devices: started.append((run_id, list(devices))))
    monkeypatch.setattr(tasks._execute_run, "schedule", lambda args, delay: again.append(args[0]))
    blocker = queued(alice[1], 2)
    assert start(blocker)
    big = queued(alice[1], 4)
    tasks._execute_run.call_local(big.pk)
    assert again == [big.pk] and started == [] and held(big) == 0
    finish(blocker)
    tasks._execute_run.call_local(big.pk)
    assert started == [(big.pk, [f"{d}" for d in gpus.inventory()])]
    assert held(big) == 0  # released when supervise returned


FSDP_YAML = """\
base_model: tiny-chat
datasets:
  - path: chat
    type: chat_template
adapter: lora
lora_target_linear: true
fsdp_config:
  fsdp_version: 2
  transformer_layer_cls_to_wrap: LlamaDecoderLayer
"""


def test_a_sharded_run_on_one_device_is_refused_when_queued(alice, alice_dataset, monkeypatch):
    from training.config import ConfigInvalid
    from webapp.runs.models import TrainingConfig

    monkeypatch.setattr(tasks, "execute_run", lambda run_id: None)
    user, workspace = alice
    config = TrainingConfig.objects.create(workspace=workspace, name="c", yaml=FSDP_YAML)
    with pytest.raises(ConfigInvalid, match="fsdp shards the model over several devices, but this run gets 1"):
        services.enqueue_run(workspace, user, config, gpus=1)
    assert not Run.objects.exists()
    assert services.enqueue_run(workspace, user, config, gpus=2).gpus == 2


def test_a_sharded_run_launches_through_accelerate_with_its_generated_config(alice, alice_dataset, monkeypatch):
    import yaml

    from webapp.runs.models import TrainingConfig

    monkeypatch.setattr(tasks, "execute_run", lambda run_id: None)
    user, workspace = alice
    config = TrainingConfig.objects.create(workspace=workspace, name="c", yaml=FSDP_YAML)
    run = services.enqueue_run(workspace, user, config, gpus=2)
    command = supervisor.command(run, ["h:cuda:0", "h:cuda:1"])
    assert command[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    generated = yaml.safe_load(Path(command[4]).read_text())
    assert generated["distributed_type"] == "FSDP" and generated["num_processes"] == 2
    assert generated["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("--main_process_port") + 2 : command.index("--main_process_port") + 5] == [
        "-m",
        "training",
        "train",
    ]


RANK = """
import os, sys, time
from training.sharding import die_with_launcher
die_with_launcher()
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pid"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(120)
"""


def _launch_ranks(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """Two ranks through accelerate launch, started as the worker starts a trainer."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--main_process_port"]
    cmd += [str(supervisor._free_port()), str(script), str(tmp_path)]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, preexec_fn=supervisor._die_with_parent,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(tmp_path.glob("rank*.pid"))) < 2:
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
    assert len(pids) == 2, "the ranks did not start"
    return proc, pids


def _gone(pids: list[int], within: float = 15) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(")")[-1].split()[0] != "Z":
                        alive.append(pid)
            except (ProcessLookupError, FileNotFoundError):
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_cancel_stops_every_rank(tmp_path):
    proc, pids = _launch_ranks(tmp_path)
    watch.kill_group(proc)  # what the supervisor does on cancel
    assert _gone(pids)


@pytest.mark.slow
def test_a_launcher_killed_outright_takes_its_ranks_with_it(tmp_path):
    """The worker dies: PR_SET_PDEATHSIG kills the launcher with SIGKILL, which can't forward it;
    the ranks (each in a session of its own) must still go, not hold their devices."""
    proc, pids = _launch_ranks(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _gone(pids)


@pytest.mark.slow
def test_a_sharded_run_trains_through_the_worker_on_two_fake_devices(alice, alice_dataset, settings):
    """The whole path: queued with gpus: 2, both devices leased at once, accelerate launch with the
    generated config, two FSDP2 ranks on the CPU, per-rank metrics recorded, one adapter folder."""
    from webapp.runs.models import MetricPoint, TrainingConfig

    settings.TRAINYARD_GPUS = "0,1"
    user, workspace = alice
    yaml_text = FSDP_YAML + "sequence_len: 128\nmicro_batch_size: 2\nmax_steps: 3\nlearning_rate: 0.003\n"
    config = TrainingConfig.objects.create(workspace=workspace, name="c", yaml=yaml_text)
    run = services.enqueue_run(workspace, user, config, gpus=2)  # huey runs it now (immediate mode)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, (run.message, run.log_path.read_text()[-3000:])
    assert len(run.devices) == 2 and not DeviceLease.objects.filter(run=run).exists()
    ranks = [p.values for p in MetricPoint.objects.filter(run=run) if "param_share_rank1" in p.values]
    assert ranks and 0.4 <= ranks[0]["param_share_rank0"] <= 0.6 and 0.4 <= ranks[0]["param_share_rank1"] <= 0.6
    assert (run.run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_cancelling_a_sharded_run_stops_both_ranks_and_frees_both_devices(alice, alice_dataset, monkeypatch, settings):
    import threading

    from tests.helpers import trainer_pids
    from webapp.runs.models import TrainingConfig

    settings.TRAINYARD_GPUS = "0,1"
    monkeypatch.setattr(tasks, "execute_run", lambda run_id: None)
    user, workspace = alice
    yaml_text = FSDP_YAML + "sequence_len: 128\nmicro_batch_size: 1\nmax_steps: 5000\nlearning_rate: 0.001\n"
    config = TrainingConfig.objects.create(workspace=workspace, name="c", yaml=yaml_text)
    run = services.enqueue_run(workspace, user, config, gpus=2)
    seen_ranks = []

    def cancel_when_running():
        deadline = time.time() + 180
        while time.time() < deadline:
            r = Run.objects.get(pk=run.pk)
            if r.status == RunStatus.RUNNING and r.current_step > 2:
                seen_ranks.extend(trainer_pids(r))  # the launcher's trainer and both ranks
                services.cancel_run(r)
                return
            time.sleep(0.2)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    tasks._execute_run.call_local(run.pk)
    canceller.join()
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED and run.current_step < 5000
    assert len(seen_ranks) >= 2  # it was running sharded when cancelled
    assert _gone(seen_ranks) and trainer_pids(run) == []
    assert not DeviceLease.objects.exists()
