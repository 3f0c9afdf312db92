"""Device inventory and exclusive allocation: two runs never hold the same device."""

from __future__ import annotations

import pytest

from webapp.runs import gpus, reaper
from webapp.runs.models import DeviceLease, Run, RunStatus
from webapp.runs.supervisor import command

pytestmark = pytest.mark.django_db


def make_run(workspace, **fields):
    return Run.objects.create(workspace=workspace, name="r", config_yaml="x", **fields)


def test_inventory_from_setting_or_cpu(settings):
    settings.TRAINYARD_GPUS = "0,2"
    assert [d.split(":", 1)[1] for d in gpus.inventory()] == ["cuda:0", "cuda:2"]
    settings.TRAINYARD_GPUS = "3"
    assert [d.split(":", 1)[1] for d in gpus.inventory()] == ["cuda:0", "cuda:1", "cuda:2"]
    settings.TRAINYARD_GPUS = ""
    assert gpus.inventory()[0].endswith(":cpu")  # no CUDA here: the CPU is the one device


def test_two_runs_never_hold_the_same_device(alice, settings):
    settings.TRAINYARD_GPUS = "0,1"
    a, b, c = (make_run(alice[1]) for _ in range(3))
    got_a = gpus.allocate_gpus(a, 1)
    got_b = gpus.allocate_gpus(b, 1)
    assert got_a and got_b and set(got_a).isdisjoint(got_b)
    assert gpus.allocate_gpus(c, 1) is None  # both taken
    gpus.release_gpus(a.pk)
    assert gpus.allocate_gpus(c, 1) == got_a
    assert DeviceLease.objects.count() == 2


def test_a_run_asking_more_gpus_than_the_host_has_is_refused(alice, settings):
    settings.TRAINYARD_GPUS = "0,1"
    with pytest.raises(ValueError, match="asks for 4 GPUs; this host has 2"):
        gpus.allocate_gpus(make_run(alice[1]), 4)


def test_cuda_visible_devices_and_multi_gpu_launch(alice, settings):
    settings.TRAINYARD_GPUS = "0,1,2,3"
    run = make_run(alice[1])
    assert gpus.cuda_visible_devices(["h:cuda:1", "h:cuda:3"]) == "1,3"
    assert gpus.cuda_visible_devices(["h:cpu"]) == ""
    single = command(run, ["h:cuda:1"])
    multi = command(run, ["h:cuda:1", "h:cuda:3"])
    assert single[1:4] == ["-m", "training", "train"]
    assert multi[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "2"]
    assert multi[5] == "--main_process_port" and multi[6].isdigit()  # its own port: runs side by side


def test_a_worker_limited_to_some_gpus_maps_its_ordinals_back(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpus.cuda_visible_devices(["h:cuda:0", "h:cuda:1"]) == "2,3"
    assert gpus.cuda_visible_devices(["h:cuda:1"]) == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")
    assert gpus.cuda_visible_devices(["h:cuda:1"]) == "GPU-bbbb"


def test_queue_position_follows_priority_then_age(alice):
    first, second = make_run(alice[1]), make_run(alice[1])
    urgent = make_run(alice[1], priority=5)
    make_run(alice[1], status=RunStatus.RUNNING)
    assert [gpus.queue_position(r) for r in (urgent, first, second)] == [1, 2, 3]


def test_leases_of_runs_that_ended_are_released(alice, settings):
    settings.TRAINYARD_GPUS = "0"
    run = make_run(alice[1])
    gpus.allocate_gpus(run, 1)
    Run.objects.filter(pk=run.pk).update(status=RunStatus.INTERRUPTED)
    assert reaper.free_devices_of_ended_runs() == 1
