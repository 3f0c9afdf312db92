"""Dataset pages: list + upload, Hub import, detail, masked-label preview, rejected-lines download, delete."""

from __future__ import annotations

import random
from urllib.parse import urlencode

from django.contrib import messages
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from training.config import ConfigInvalid, parse_config
from training.formats import FORMATS
from webapp.base_models import available_models
from webapp.datasets import images
from webapp.datasets.deletion import CannotDelete, delete_dataset
from webapp.datasets.encoding import EncodeOptions
from webapp.datasets.intake import UploadRejected
from webapp.datasets.models import Dataset, HubImport
from webapp.datasets.preview import preview_row
from webapp.datasets.services import ImportRefused, import_hub_dataset, request_stats, upload_dataset
from webapp.datasets.storage import first_rows, rejected_lines_download, search_rows
from webapp.http import parse_id, safe_next
from webapp.runs.models import TrainingConfig
from webapp.workspaces.services import can_write, current_workspace, require_writer


@require_http_methods(["GET", "POST"])
def dataset_list(request):
    workspace = current_workspace(request)
    report, error = None, None
    if request.method == "POST":
        require_writer(request.user, workspace)
        upload = request.FILES.get("file")
        if upload is None:
            error = "choose a file to upload (JSONL, JSON, .jsonl.gz, Parquet, CSV, or a .zip of one with its images)"
        else:
            try:
                result = upload_dataset(
                    workspace,
                    request.user,
                    upload,
                    name=request.POST.get("name") or None,
                    format=request.POST.get("format") or None,
                    keep_valid=request.POST.get("keep_valid") == "on",
                )
            except UploadRejected as exc:
                error, report = str(exc), exc.report
            else:
                if result.duplicate:
                    messages.info(request, f"This file was already uploaded as “{result.dataset.name}”.")
                elif result.report.invalid:
                    messages.warning(
                        request,
                        f"Stored {result.report.rows} valid rows; "
                        f"{result.report.invalid} invalid {result.report.unit}s were left out.",
                    )
                else:
                    messages.success(request, f"Uploaded {result.dataset.rows} rows ({result.dataset.format}).")
                return redirect("dataset-detail", pk=result.dataset.pk)
    return _list_page(request, workspace, error=error, report=report)


def _list_page(request, workspace, **context):
    return render(
        request,
        "datasets/list.html",
        {
            "datasets": Dataset.objects.filter(workspace=workspace),
            "imports": HubImport.objects.filter(workspace=workspace).exclude(status=HubImport.Status.DONE)[:5],
            "formats": list(FORMATS),
            "form": {},
            **context,
        },
        status=400 if context.get("error") or context.get("import_error") else 200,
    )


@require_http_methods(["POST"])
def hub_import(request):
    """Queue a copy of a Hub dataset's split; its page shows the worker's progress."""
    workspace = current_workspace(request)
    require_writer(request.user, workspace)
    q = request.POST
    try:
        job = import_hub_dataset(
            workspace,
            request.user,
            q.get("hub_id", ""),
            config_name=q.get("config_name", ""),
            split=q.get("split", ""),
            name=q.get("name") or None,
        )
    except ImportRefused as exc:
        return _list_page(request, workspace, import_error=str(exc), form=q)
    return redirect("dataset-import", import_id=job.pk)


def hub_import_detail(request, import_id: int):
    job = get_object_or_404(HubImport.objects.visible_to(request.user), pk=import_id)
    return render(request, "datasets/import.html", {"job": job})


def hub_import_status(request, import_id: int):
    """JSON for the import page's progress bar."""
    job = get_object_or_404(HubImport.objects.visible_to(request.user), pk=import_id)
    return JsonResponse(import_status(job))


def import_status(job: HubImport) -> dict:
    return {
        "status": job.status,
        "rows_done": job.rows_done,
        "rows_total": job.rows_total,
        "error": job.error,
        "dataset_url": reverse("dataset-detail", args=[job.dataset_id]) if job.dataset_id else None,
    }


def dataset_detail(request, pk: int):
    dataset = get_object_or_404(Dataset.objects.visible_to(request.user), pk=pk)
    models = images.models_for(dataset, available_models())
    options = EncodeOptions.from_query(request.GET, models)
    stats = request_stats(dataset, options) if options.model else None
    return render(
        request,
        "datasets/detail.html",
        {
            "can_write": can_write(request.user, dataset.workspace),
            "dataset": dataset,
            "rows": [images.row_images_summary(r) for r in first_rows(dataset, 5)],
            "options": options,
            "models": models,
            "stats": stats,
        },
    )


def dataset_stats(request, pk: int):
    """JSON for the dataset page's progress bar and charts."""
    dataset = get_object_or_404(Dataset.objects.visible_to(request.user), pk=pk)
    options = EncodeOptions.from_query(request.GET, images.models_for(dataset, available_models()))
    stats = dataset.stats.filter(key=options.key()).first()
    if stats is None:
        return JsonResponse({"status": "missing"}, status=404)
    return JsonResponse(
        {
            "status": stats.status,
            "rows_done": stats.rows_done,
            "rows": dataset.rows,
            "result": stats.result,
            "error": stats.error,
            "sequence_len": options.sequence_len,
        }
    )


def dataset_preview(request, pk: int):
    dataset = get_object_or_404(Dataset.objects.visible_to(request.user), pk=pk)
    models = images.models_for(dataset, available_models())
    q = request.GET
    try:
        index = int(q.get("row", 0))
    except ValueError:
        index = 0
    if q.get("random"):
        index = random.randrange(dataset.rows)
    index = min(max(index, 0), dataset.rows - 1)
    options = EncodeOptions.from_query(q, models)
    configs = TrainingConfig.objects.filter(workspace=dataset.workspace)
    config_id = parse_id(q.get("config", ""))
    chosen = configs.filter(pk=config_id).first() if config_id else None
    config_note = None
    if chosen:
        try:
            options = EncodeOptions.from_config(
                parse_config(chosen.yaml, allow_trust_remote_code=True), dataset.name, models
            )
        except (ConfigInvalid, ValueError) as exc:
            config_note = f"config “{chosen.name}” can't be used here: {exc}"
    compare = q.get("compare") == "1"
    other = EncodeOptions.from_query(q, models, prefix="b_") if compare else None
    columns, error = [], None
    if not options.model:
        error = "no model is available to tokenize with: run `make run` (it builds the demo model) or add one"
    else:
        try:
            columns = [("A", options, preview_row(dataset, index, options))]
            if other:
                columns.append(("B", other, preview_row(dataset, index, other)))
        except (ValueError, OSError) as exc:
            error = str(exc)
    search = q.get("q", "").strip()
    stats = dataset.stats.filter(key=options.key(), status="done").first()
    base = {k: v for k, v in q.items() if k not in ("row", "random")}
    return render(
        request,
        "datasets/preview.html",
        {
            "dataset": dataset,
            "columns": columns,
            "error": error,
            "options": options,
            "other": other,
            "models": models,
            "index": index,
            "compare": compare,
            "search": search,
            "matches": search_rows(dataset, search) if search else None,
            "dropped_rows": stats.result.get("dropped_rows", [])[:200] if stats and q.get("dropped") else None,
            "base_query": urlencode(base),
            "options_query": urlencode(options.as_query()),
            "configs": configs,
            "chosen": chosen,
            "config_note": config_note,
        },
    )


def dataset_rejected(request, pk: int):
    return rejected_lines_download(get_object_or_404(Dataset.objects.visible_to(request.user), pk=pk))


@require_POST
def dataset_delete(request, pk: int):
    """Delete a dataset no active run trains on (writers), then go back to the list."""
    dataset = get_object_or_404(Dataset.objects.visible_to(request.user), pk=pk)
    require_writer(request.user, dataset.workspace)
    try:
        delete_dataset(dataset)
    except CannotDelete as exc:
        messages.error(request, f"“{dataset.name}” was not deleted: {exc}.")
        return redirect(safe_next(request, request.META.get("HTTP_REFERER"), reverse("dataset-list")))
    messages.info(request, f"Deleted “{dataset.name}”.")
    return redirect("dataset-list")
