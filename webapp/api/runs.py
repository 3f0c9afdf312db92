"""/api/runs: create, list with filters, get, cancel, resume, metrics (downsampled), logs, artifacts."""

from __future__ import annotations

from datetime import datetime

from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from ninja import Field, Router, Schema

from training.config import ConfigInvalid
from webapp.api.access import visible
from webapp.runs import realtime, services
from webapp.runs.artifacts import download as download_artifact
from webapp.runs.models import Run, RunStatus, TrainingConfig
from webapp.workspaces.services import require_writer

router = Router(tags=["runs"])


class RunOut(Schema):
    id: int
    name: str
    status: str
    message: str
    current_step: int
    total_steps: int | None
    created_at: datetime
    merge_state: str = Field(description="the adapter's merge into its base model: queued, merging, failed, or blank")
    merge_error: str = Field(description="why the last merge failed")


class PointOut(Schema):
    seq: int
    step: int
    time: float
    values: dict


class RunIn(Schema):
    config_id: int
    name: str | None = Field(None, max_length=200)
    gpus: int = Field(1, ge=1, le=64)
    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first")


class Message(Schema):
    message: str
    errors: list[dict] = []


class ArtifactOut(Schema):
    id: int
    kind: str
    path: str
    size: int
    download_url: str


@router.post("/", response={201: RunOut, 404: Message, 422: Message})
def create_run(request, body: RunIn):
    config = visible(request, TrainingConfig.objects).filter(pk=body.config_id).first()
    if config is None:
        return 404, Message(message=f"no config {body.config_id} in this workspace")
    require_writer(request.user, config.workspace)
    try:
        return 201, services.enqueue_run(
            config.workspace, request.user, config, body.name, gpus=body.gpus, priority=body.priority
        )
    except ConfigInvalid as exc:
        return 422, Message(
            message="invalid config", errors=[{"path": e.path, "message": e.message} for e in exc.errors]
        )


@router.get("/", response=list[RunOut])
def list_runs(request, status: RunStatus | None = None, name: str | None = None):
    runs = visible(request, Run.objects)
    if status:
        runs = runs.filter(status=status)
    if name:  # no name holds a NUL (PostgreSQL text can't), and one in a query must not be a server error
        runs = runs.filter(name__icontains=name.replace("\x00", ""))
    return runs


@router.post("/{run_id}/cancel", response={200: RunOut, 409: Message})
def cancel(request, run_id: int):
    run = get_object_or_404(visible(request, Run.objects), pk=run_id)
    require_writer(request.user, run.workspace)
    if not services.cancel_run(run):
        return 409, Message(message=f"the run has already ended ({run.status})")
    run.refresh_from_db()
    return 200, run


@router.post("/{run_id}/resume", response={201: RunOut, 409: Message})
def resume(request, run_id: int):
    run = get_object_or_404(visible(request, Run.objects), pk=run_id)
    require_writer(request.user, run.workspace)
    try:
        return 201, services.resume_run(run, request.user)
    except services.CannotResume as exc:
        return 409, Message(message=str(exc))


@router.get("/{run_id}/logs", response={200: None})
def logs(request, run_id: int, offset: int = 0):
    run = get_object_or_404(visible(request, Run.objects), pk=run_id)
    payload = realtime.log_after(run, max(offset, 0), max_bytes=1024 * 1024)
    response = HttpResponse(payload["text"] if payload else "", content_type="text/plain; charset=utf-8")
    response["X-Next-Offset"] = str(payload["offset"] if payload else offset)
    return response


@router.get("/{run_id}/artifacts", response=list[ArtifactOut])
def artifacts(request, run_id: int):
    run = get_object_or_404(visible(request, Run.objects), pk=run_id)
    return [
        ArtifactOut(
            id=a.pk, kind=a.kind, path=a.path, size=a.size, download_url=f"/api/runs/{run.pk}/artifacts/{a.pk}/download"
        )
        for a in run.artifacts.all()
    ]


@router.get("/{run_id}/artifacts/{artifact_id}/download", response={200: None})
def download(request, run_id: int, artifact_id: int):
    run = get_object_or_404(visible(request, Run.objects), pk=run_id)
    return download_artifact(run, get_object_or_404(run.artifacts, pk=artifact_id))


@router.get("/{run_id}", response=RunOut)
def get_run(request, run_id: int):
    return get_object_or_404(visible(request, Run.objects), pk=run_id)


@router.get("/{run_id}/metrics", response=list[PointOut])
def run_metrics(request, run_id: int, after: int = -1, max_points: int = realtime.HISTORY_POINTS):
    run = get_object_or_404(visible(request, Run.objects), pk=run_id)
    return realtime.history(run.pk, after, max_points=min(max(max_points, 10), 100_000))


@router.delete("/{run_id}", response={204: None, 409: Message})
def delete(request, run_id: int):
    """Delete an ended run with its metrics, logs and artifacts."""
    from webapp.runs.deletion import CannotDelete, delete_run

    run = get_object_or_404(visible(request, Run.objects), pk=run_id)
    require_writer(request.user, run.workspace)
    try:
        delete_run(run)
    except CannotDelete as exc:
        return 409, Message(message=str(exc))
    return 204, None


class NoteIn(Schema):
    text: str = Field(min_length=1, max_length=20000)


class NoteOut(Schema):
    id: int
    text: str
    author: str
    created_at: datetime


@router.get("/{run_id}/notes", response=list[NoteOut])
def notes(request, run_id: int):
    run = get_object_or_404(visible(request, Run.objects), pk=run_id)
    return [
        NoteOut(id=n.pk, text=n.text, author=n.author.username if n.author else "", created_at=n.created_at)
        for n in run.notes.select_related("author").order_by("created_at")
    ]


@router.post("/{run_id}/notes", response={201: NoteOut, 400: Message})
def add_note(request, run_id: int, body: NoteIn):
    run = get_object_or_404(visible(request, Run.objects), pk=run_id)
    require_writer(request.user, run.workspace)
    note = services.add_note(run, request.user, body.text)
    if note is None:
        return 400, Message(message="text: a note needs some text")
    return 201, NoteOut(id=note.pk, text=note.text, author=request.user.username, created_at=note.created_at)


@router.post("/{run_id}/merge", response={202: Message, 409: Message})
def merge(request, run_id: int):
    """Merge the adapter into its base model in a worker; the merged model appears among the artifacts."""
    run = get_object_or_404(visible(request, Run.objects), pk=run_id)
    require_writer(request.user, run.workspace)
    try:
        services.request_merge(run)
    except services.CannotMerge as exc:
        return 409, Message(message=str(exc))
    return 202, Message(message="merging in a worker: poll the run (merge_state) and its artifacts")


class PromptIn(Schema):
    prompt: str = Field(min_length=1, max_length=8000)


class GenerationOut(Schema):
    id: int
    status: str
    prompt: str
    base: str
    tuned: str
    error: str
    source: str  # the adapter or checkpoint folder's name


def _generation(g) -> GenerationOut:
    return GenerationOut(**g.payload())


@router.post("/{run_id}/playground", response={202: GenerationOut, 400: Message})
def playground(request, run_id: int, body: PromptIn):
    """Answer a prompt with the base model and with the trained one, in a worker: poll the result."""
    run = get_object_or_404(visible(request, Run.objects), pk=run_id)
    require_writer(request.user, run.workspace)
    try:
        generation = services.ask_playground(run, request.user, body.prompt)
    except services.NothingToTry as exc:
        return 400, Message(message=str(exc))
    return 202, _generation(generation)


@router.get("/{run_id}/playground/{generation_id}", response=GenerationOut)
def generation(request, run_id: int, generation_id: int):
    run = get_object_or_404(visible(request, Run.objects), pk=run_id)
    return _generation(get_object_or_404(run.generations, pk=generation_id))
