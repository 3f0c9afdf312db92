"""Dataset pages: list + upload, detail, masked-label preview, rejected-lines download."""

from __future__ import annotations

import random

from django.contrib import messages
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods

from training.formats import FORMATS
from webapp.datasets.models import Dataset
from webapp.datasets.preview import PreviewOptions, preview_row
from webapp.datasets.services import UploadRejected, first_rows, upload_dataset
from webapp.runs.base_models import available_models
from webapp.workspaces.services import current_workspace


@require_http_methods(["GET", "POST"])
def dataset_list(request):
    workspace = current_workspace(request)
    report, error = None, None
    if request.method == "POST":
        upload = request.FILES.get("file")
        if upload is None:
            error = "choose a JSONL file to upload"
        else:
            try:
                result = upload_dataset(workspace, request.user, upload, name=request.POST.get("name") or None,
                                        format=request.POST.get("format") or None,
                                        keep_valid=request.POST.get("keep_valid") == "on")
            except UploadRejected as exc:
                error, report = str(exc), exc.report
            else:
                if result.duplicate:
                    messages.info(request, f"This file was already uploaded as “{result.dataset.name}”.")
                elif result.report.invalid:
                    messages.warning(request, f"Stored {result.report.rows} valid rows; "
                                              f"{result.report.invalid} invalid lines were left out.")
                else:
                    messages.success(request, f"Uploaded {result.dataset.rows} rows ({result.dataset.format}).")
                return redirect("dataset-detail", pk=result.dataset.pk)
    datasets = Dataset.objects.filter(workspace=workspace)
    return render(request, "datasets/list.html", {
        "datasets": datasets, "report": report, "error": error, "formats": list(FORMATS),
    }, status=400 if error else 200)


def dataset_detail(request, pk: int):
    dataset = get_object_or_404(Dataset.objects.visible_to(request.user), pk=pk)
    return render(request, "datasets/detail.html", {"dataset": dataset, "rows": first_rows(dataset, 5)})


def dataset_preview(request, pk: int):
    dataset = get_object_or_404(Dataset.objects.visible_to(request.user), pk=pk)
    models = available_models()
    q = request.GET
    try:
        index = int(q.get("row", 0))
        sequence_len = max(16, int(q.get("sequence_len", 512)))
    except ValueError:
        index, sequence_len = 0, 512
    if q.get("random"):
        index = random.randrange(dataset.rows)
    index = min(max(index, 0), dataset.rows - 1)
    roles = [r for r in q.get("roles", "assistant").replace(" ", "").split(",") if r]
    options = PreviewOptions(
        model=q.get("model") or (models[0] if models else ""),
        train_on_inputs=q.get("train_on_inputs") == "on",
        roles_to_train=roles,
        train_on_eos=q.get("train_on_eos") if q.get("train_on_eos") in ("all", "turn", "last", "none") else "turn",
        sequence_len=sequence_len,
    )
    preview, error = None, None
    if not options.model:
        error = "no model is available to tokenize with: run `make run` (it builds the demo model) or add one"
    else:
        try:
            preview = preview_row(dataset, index, options)
        except (ValueError, OSError) as exc:
            error = str(exc)
    return render(request, "datasets/preview.html", {
        "dataset": dataset, "preview": preview, "error": error, "options": options, "models": models,
        "index": index, "roles": ",".join(roles),
    })


def dataset_rejected(request, pk: int):
    dataset = get_object_or_404(Dataset.objects.visible_to(request.user), pk=pk)
    if not dataset.rejected_path.exists():
        raise Http404("no rejected lines")
    return FileResponse(dataset.rejected_path.open("rb"), as_attachment=True,
                        filename=f"{dataset.name}.rejected.jsonl")
