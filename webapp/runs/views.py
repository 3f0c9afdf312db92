"""Config and run pages: thin handlers (parse, authorize, one service call, render)."""

from __future__ import annotations

from django.contrib import messages
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from training.config import ConfigInvalid
from webapp.datasets.models import Dataset
from webapp.runs import gpus, realtime, services
from webapp.runs.base_models import available_models
from webapp.runs.models import Run, TrainingConfig
from webapp.workspaces.services import current_workspace

STARTER_YAML = """\
# Axolotl-style config. `datasets: - path:` names a dataset of this workspace;
# `base_model` names a model folder on this server or a hub id.
base_model: {model}
datasets:
  - path: {dataset}
    type: {type}
sequence_len: 256
adapter: lora
lora_r: 8
lora_alpha: 16
lora_target_linear: true
micro_batch_size: 4
gradient_accumulation_steps: 1
max_steps: 60
learning_rate: 0.003
lr_scheduler: cosine
warmup_steps: 5
val_set_size: 0.05
eval_steps: 20
"""


def home(request):
    return redirect("run-list")


def config_list(request):
    workspace = current_workspace(request)
    return render(request, "runs/config_list.html", {"configs": TrainingConfig.objects.filter(workspace=workspace)})


def _starter_yaml(workspace) -> str:
    dataset = Dataset.objects.filter(workspace=workspace).first()
    models = available_models()
    return STARTER_YAML.format(model=models[0] if models else "owner/model-id",
                               dataset=dataset.name if dataset else "my-dataset",
                               type=dataset.format if dataset else "chat_template")


def config_edit(request, pk: int | None = None):
    workspace = current_workspace(request)
    instance = get_object_or_404(TrainingConfig.objects.visible_to(request.user), pk=pk) if pk else None
    name = instance.name if instance else ""
    yaml_text = instance.yaml if instance else _starter_yaml(workspace)
    errors, status = [], 200
    if request.method == "POST":
        name, yaml_text = request.POST.get("name", ""), request.POST.get("yaml", "")
        try:
            if request.POST.get("action") == "validate":
                services.validate_config(workspace, yaml_text)
                messages.success(request, "The config is valid.")
            else:
                saved = services.save_config(workspace, request.user, name, yaml_text, instance)
                if request.POST.get("action") == "run":
                    run = services.enqueue_run(workspace, request.user, saved)
                    return redirect("run-detail", pk=run.pk)
                messages.success(request, f"Saved “{saved.name}”.")
                return redirect("config-edit", pk=saved.pk)
        except ConfigInvalid as exc:
            errors, status = exc.errors, 400
    return render(request, "runs/config_edit.html", {
        "config": instance, "name": name, "yaml": yaml_text, "errors": errors,
        "datasets": Dataset.objects.filter(workspace=workspace), "models": available_models(),
    }, status=status)


@require_POST
def config_run(request, pk: int):
    config = get_object_or_404(TrainingConfig.objects.visible_to(request.user), pk=pk)
    try:
        run = services.enqueue_run(config.workspace, request.user, config)
    except ConfigInvalid as exc:
        messages.error(request, f"Can't start: {exc}")
        return redirect("config-edit", pk=config.pk)
    return redirect("run-detail", pk=run.pk)


def run_list(request):
    workspace = current_workspace(request)
    return render(request, "runs/run_list.html", {"runs": Run.objects.filter(workspace=workspace)})


def run_detail(request, pk: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    log = realtime.log_after(run, 0)
    return render(request, "runs/run_detail.html", {
        "run": run, "status": realtime.status_of(run), "log_text": log["text"] if log else "",
        "log_offset": log["offset"] if log else 0, "artifacts": run.artifacts.all(),
        "queue_position": gpus.queue_position(run) if run.status == "queued" else None,
        "can_resume": run.status in ("interrupted", "failed", "cancelled") and services.latest_checkpoint(run),
    })


@require_POST
def run_resume(request, pk: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    try:
        new = services.resume_run(run, request.user)
    except services.CannotResume as exc:
        messages.error(request, str(exc))
        return redirect("run-detail", pk=run.pk)
    return redirect("run-detail", pk=new.pk)


@require_POST
def run_cancel(request, pk: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    if services.cancel_run(run):
        messages.info(request, "Cancelling the run.")
    else:
        messages.warning(request, "The run has already ended.")
    return redirect("run-detail", pk=run.pk)


def artifact_download(request, pk: int, artifact_id: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    artifact = get_object_or_404(run.artifacts, pk=artifact_id)
    path = (run.run_dir / artifact.path).resolve()
    if not path.is_relative_to(run.run_dir.resolve()) or not path.is_file():
        raise Http404("artifact file missing")
    return FileResponse(path.open("rb"), as_attachment=True, filename=f"run-{run.pk}-{path.name}")
