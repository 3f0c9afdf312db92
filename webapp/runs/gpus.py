"""GPU inventory of this host and exclusive allocation of devices to runs (a lock row per device)."""

from __future__ import annotations

import os
import socket
from functools import lru_cache

from django.conf import settings
from django.db import IntegrityError, transaction

from webapp.runs.models import DeviceLease, Run


@lru_cache(maxsize=1)
def _cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def inventory() -> list[str]:
    """This host's devices: TRAINYARD_GPUS ("0,1,3" or a count), else the CUDA devices torch sees;
    without any GPU the CPU is one device, so runs still queue one at a time."""
    host = socket.gethostname()
    from webapp.workspaces.models import SiteSettings

    spec = (SiteSettings.current().allowed_gpus or settings.TRAINYARD_GPUS or "").strip()
    if spec:
        ids = (
            [str(i) for i in range(int(spec))]
            if spec.isdigit() and "," not in spec
            else [x.strip() for x in spec.split(",") if x.strip()]
        )
    else:
        ids = [str(i) for i in range(_cuda_count())]
    return [f"{host}:cuda:{i}" for i in ids] or [f"{host}:cpu"]


def claim_devices(run: Run) -> list[str] | None:
    """The run's devices, all of them at once, if it is first in line and they are free now; else
    None and it holds nothing. A sharded run is one gang: its ranks start together or not at all, so
    two runs never each hold part of what the other waits for (no deadlock). Only the first in line
    (priority, then age) may take devices, so a big run that is first is never overtaken by smaller
    later runs onto devices freed one by one (no starvation); it waits until its count is free.
    ValueError when the host can never give the run its count."""
    if queue_position(run) != 1:
        if run.gpus > len(inventory()):
            raise ValueError(f"the run asks for {run.gpus} GPUs; this host has {len(inventory())}")
        return None
    return allocate_gpus(run, run.gpus)


def allocate_gpus(run: Run, count: int) -> list[str] | None:
    """Take `count` free devices of this host for the run in one transaction, or None (holding
    none) if not enough are free now or another worker took one of them first."""
    devices = inventory()
    if count > len(devices):
        raise ValueError(f"the run asks for {count} GPUs; this host has {len(devices)}")
    held = set(DeviceLease.objects.filter(device__in=devices).values_list("device", flat=True))
    free = [d for d in devices if d not in held][:count]
    if len(free) < count:
        return None
    try:
        with transaction.atomic():
            DeviceLease.objects.bulk_create([DeviceLease(device=d, run=run) for d in free])
    except IntegrityError:  # another worker took one of them first
        return None
    return free


def release_gpus(run_id: int) -> None:
    DeviceLease.objects.filter(run_id=run_id).delete()


def cuda_visible_devices(devices: list[str]) -> str:
    """ "host:cuda:3" -> "3"; empty for the CPU, so the training process sees no GPU. Device ids
    are CUDA ordinals as the worker sees them: a worker started with CUDA_VISIBLE_DEVICES=2,3 calls
    its GPUs 0 and 1, and its trainers get 2 and 3."""
    ids = [d.rsplit(":", 1)[1] for d in devices if ":cuda:" in d]
    own = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    if own:
        ids = [own[int(i)] if i.isdigit() and int(i) < len(own) else i for i in ids]
    return ",".join(ids)


def queue_position(run: Run) -> int:
    """1 for the next run to start; runs with higher priority, then older ones, go first."""
    from django.db.models import Q

    ahead = Run.objects.filter(status="queued").filter(
        Q(priority__gt=run.priority)
        | Q(priority=run.priority, created_at__lt=run.created_at)
        | Q(priority=run.priority, created_at=run.created_at, pk__lt=run.pk)
    )
    return ahead.count() + 1
