"""/api/runs: list, get, metrics."""

from __future__ import annotations

from datetime import datetime

from django.shortcuts import get_object_or_404
from ninja import Router, Schema

from webapp.api.access import visible
from webapp.runs import realtime
from webapp.runs.models import Run

router = Router(tags=["runs"])


class RunOut(Schema):
    id: int
    name: str
    status: str
    message: str
    current_step: int
    total_steps: int | None
    created_at: datetime


class PointOut(Schema):
    seq: int
    step: int
    time: float
    values: dict


@router.get("/", response=list[RunOut])
def list_runs(request):
    return visible(request, Run.objects)


@router.get("/{run_id}", response=RunOut)
def get_run(request, run_id: int):
    return get_object_or_404(visible(request, Run.objects), pk=run_id)


@router.get("/{run_id}/metrics", response=list[PointOut])
def run_metrics(request, run_id: int, after: int = -1):
    run = get_object_or_404(visible(request, Run.objects), pk=run_id)
    return realtime.points_after(run.pk, after)
