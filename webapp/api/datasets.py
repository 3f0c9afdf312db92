"""/api/datasets: streamed upload with the validation report, Hub import, list, get, preview of row N."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from django.shortcuts import get_object_or_404
from ninja import File, Form, Query, Router, Schema
from ninja.files import UploadedFile

from training.formats import FORMATS
from webapp.api.access import visible
from webapp.base_models import available_models
from webapp.datasets.deletion import CannotDelete, delete_dataset
from webapp.datasets.encoding import EncodeOptions
from webapp.datasets.intake import UploadRejected
from webapp.datasets.models import Dataset, HubImport
from webapp.datasets.preview import preview_row
from webapp.datasets.services import ImportRefused, import_hub_dataset, request_stats, upload_dataset
from webapp.datasets.storage import read_row, rejected_lines_download
from webapp.workspaces.services import current_workspace, require_writer

router = Router(tags=["datasets"])
# The format registry's names, so the schema lists them and a client never sends one that is refused.
FormatName = Literal[tuple(FORMATS)]


class DatasetOut(Schema):
    id: int
    name: str
    format: str
    original_filename: str  # as uploaded: a Parquet or CSV file is stored as JSONL rows
    rows: int
    rejected_rows: int
    size: int
    sha256: str
    created_at: datetime


class Problem(Schema):
    line: int
    field: str
    message: str
    unit: str = "line"  # how `line` counts: "line" (JSONL, JSON array items) or "row" (Parquet, CSV)


class UploadOut(Schema):
    dataset: DatasetOut
    duplicate: bool
    rejected_lines: int


class UploadError(Schema):
    message: str
    field: str = ""  # the part of the request at fault: file (its rows, size, packaging), name, format
    valid_rows: int = 0
    problems: list[Problem] = []
    counts: dict[str, int] = {}


class TokenOut(Schema):
    id: int
    text: str
    label: int
    trained: bool
    special: bool
    part: str
    thinking: bool = False  # part of a reasoning trace
    sample: int = 0  # which of the row's samples: a completion row over sequence_len is cut into several


class PreviewOut(Schema):
    row: int
    tokens: list[TokenOut]
    trained: int
    dropped: str | None
    warnings: list[str]


@router.post("/", response={201: UploadOut, 200: UploadOut, 400: UploadError})
def upload(
    request,
    file: UploadedFile = File(...),
    name: str | None = Form(None),
    format: FormatName = Form(None, description="the rows' format (default: told by the first row)"),
    keep_valid: bool = Form(False),
):
    workspace = current_workspace(request)
    require_writer(request.user, workspace)
    try:
        result = upload_dataset(workspace, request.user, file, name=name, format=format, keep_valid=keep_valid)
    except UploadRejected as exc:
        report = exc.report
        return 400, UploadError(
            message=str(exc),
            field=exc.field,
            valid_rows=report.rows if report else 0,
            problems=[
                Problem(line=p.line, field=p.field, message=p.message, unit=p.unit)
                for p in (report.problems if report else [])
            ],
            counts=dict(report.counts) if report else {},
        )
    status = 200 if result.duplicate else 201
    return status, UploadOut(dataset=result.dataset, duplicate=result.duplicate, rejected_lines=result.report.invalid)


class HubImportIn(Schema):
    hub_id: str  # owner/name
    config_name: str = ""  # the dataset's configuration (subset), if it has several
    split: str = "train"  # datasets' slicing: train[:10%], train[100:200]
    name: str | None = None  # the dataset's name here (default: from the id)


class HubImportOut(Schema):
    id: int
    hub_id: str
    config_name: str
    split: str
    status: str  # pending | running | done | failed
    rows_done: int
    rows_total: int | None
    dataset_id: int | None  # the stored dataset, once done
    error: str


@router.post("/import", response={202: HubImportOut, 400: UploadError})
def import_from_hub(request, payload: HubImportIn):
    """Queue a copy of a Hub dataset's split into an ordinary dataset (a worker loads and stores it);
    ask `GET /imports/{id}` until `status` is done. Offline, a dataset in no local cache is refused here."""
    workspace = current_workspace(request)
    require_writer(request.user, workspace)
    try:
        job = import_hub_dataset(
            workspace, request.user, payload.hub_id, config_name=payload.config_name, split=payload.split,
            name=payload.name,
        )  # fmt: skip
    except ImportRefused as exc:
        return 400, UploadError(message=str(exc))
    return 202, job


@router.get("/imports/{import_id}", response=HubImportOut)
def get_import(request, import_id: int):
    return get_object_or_404(visible(request, HubImport.objects), pk=import_id)


@router.get("/", response=list[DatasetOut])
def list_datasets(request):
    return visible(request, Dataset.objects)


@router.get("/{dataset_id}", response=DatasetOut)
def get_dataset(request, dataset_id: int):
    return get_object_or_404(visible(request, Dataset.objects), pk=dataset_id)


@router.get("/{dataset_id}/rows/{row}/preview", response={200: PreviewOut, 400: UploadError})
def preview(request, dataset_id: int, row: int, query: Query[EncodeOptions]):
    dataset = get_object_or_404(visible(request, Dataset.objects), pk=dataset_id)
    if not 0 <= row < dataset.rows:
        return 400, UploadError(message=f"row must be between 0 and {dataset.rows - 1}")
    try:
        result = preview_row(dataset, row, query.for_models(available_models()))
    except (ValueError, OSError) as exc:  # no model folder here, a tokenizer without a chat template, ...
        return 400, UploadError(message=f"can't preview with these options: {exc}")
    return PreviewOut(
        row=result.row,
        tokens=[TokenOut(**t.__dict__) for t in result.tokens],
        trained=result.trained,
        dropped=result.dropped,
        warnings=result.warnings,
    )


@router.delete("/{dataset_id}", response={204: None, 409: UploadError})
def delete(request, dataset_id: int):
    """Delete a dataset no active run trains on (its file goes with the last dataset sharing it)."""
    dataset = get_object_or_404(visible(request, Dataset.objects), pk=dataset_id)
    require_writer(request.user, dataset.workspace)
    try:
        delete_dataset(dataset)
    except CannotDelete as exc:
        return 409, UploadError(message=str(exc))
    return 204, None


class StatsOut(Schema):
    status: str  # pending | running | done | failed
    rows_done: int
    rows: int
    result: dict
    error: str


@router.post("/{dataset_id}/stats", response=StatsOut)
def stats(request, dataset_id: int, query: Query[EncodeOptions]):
    """Token statistics under a tokenizer and options (lengths, trained ratio, drops), computed once by
    a worker: ask, then ask again until `status` is done. The page's charts come from the same numbers."""
    dataset = get_object_or_404(visible(request, Dataset.objects), pk=dataset_id)
    row = request_stats(dataset, query.for_models(available_models()))
    return StatsOut(status=row.status, rows_done=row.rows_done, rows=dataset.rows, result=row.result, error=row.error)


@router.get("/{dataset_id}/rows/{row}", response={200: dict, 400: UploadError})
def get_row(request, dataset_id: int, row: int):
    """Row N (0-based) as stored, read by its byte offset."""
    dataset = get_object_or_404(visible(request, Dataset.objects), pk=dataset_id)
    if not 0 <= row < dataset.rows:
        return 400, UploadError(message=f"row must be between 0 and {dataset.rows - 1}")
    return 200, read_row(dataset, row)


@router.get("/{dataset_id}/rejected", response={200: None})
def rejected(request, dataset_id: int):
    """The lines refused at upload (when valid rows were kept), as JSONL."""
    return rejected_lines_download(get_object_or_404(visible(request, Dataset.objects), pk=dataset_id))
