"""Config and run pages: thin handlers (parse, authorize, one service call, render)."""

from __future__ import annotations

from pathlib import Path

import yaml
from django.contrib import messages
from django.http import FileResponse, Http404, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from training.config import ConfigInvalid
from webapp.datasets.models import Dataset
from webapp.http import download_name, parse_id, parse_ids, safe_next
from webapp.runs import gpus, realtime, services
from webapp.runs.base_models import available_models
from webapp.runs.forms import CommonKeysForm
from webapp.runs.models import Run, RunNote, TrainingConfig
from webapp.runs.presets import PRESETS
from webapp.workspaces.services import can_write, current_workspace, require_writer

STARTER_PRESET = "lora-small"


def home(request):
    return redirect("run-list")


def config_list(request):
    workspace = current_workspace(request)
    return render(request, "runs/config_list.html", {"configs": TrainingConfig.objects.filter(workspace=workspace)})


def _starter_yaml(workspace, preset: str = STARTER_PRESET) -> str:
    dataset = Dataset.objects.filter(workspace=workspace).first()
    models = available_models()
    template = PRESETS.get(preset, PRESETS[STARTER_PRESET])[1]
    options = dataset.format_options if dataset else {}  # e.g. ShareGPT: field_messages, role/content keys
    layout = "".join(f"\n    {line}" for line in yaml.safe_dump(options).splitlines()) if options else ""
    return template.format(
        model=models[0] if models else "owner/model-id",
        dataset=dataset.name if dataset else "my-dataset",
        type=(dataset.format if dataset else "chat_template") + layout,
    )


def config_edit(request, pk: int | None = None):
    workspace = current_workspace(request)
    instance = get_object_or_404(TrainingConfig.objects.visible_to(request.user), pk=pk) if pk else None
    workspace = instance.workspace if instance else workspace
    name = instance.name if instance else ""
    yaml_text = instance.yaml if instance else _starter_yaml(workspace, request.GET.get("preset", STARTER_PRESET))
    source = (
        Run.objects.visible_to(request.user).filter(pk=parse_id(request.GET.get("from_run", ""))).first()
        if parse_id(request.GET.get("from_run", ""))
        else None
    )
    if source and not instance:  # "clone as new run": start from that run's config
        yaml_text, name = source.config_yaml, f"{source.name}-copy"
    errors, status, estimate = [], 200, None
    if request.method == "POST":
        name, yaml_text = request.POST.get("name", ""), request.POST.get("yaml", "")
        action = request.POST.get("action")
        try:
            if action == "apply_form":
                yaml_text = CommonKeysForm(yaml_text, request.POST).apply()
                messages.info(request, "The form's values are in the YAML below (not saved yet).")
            elif action == "validate":
                config, resolved = services.validate_config(workspace, yaml_text)
                estimate = services.memory_estimate(config, resolved)
                messages.success(request, "The config is valid.")
            else:
                require_writer(request.user, workspace)
                saved = services.save_config(workspace, request.user, name, yaml_text, instance)
                if action == "run":
                    run = services.enqueue_run(
                        workspace,
                        request.user,
                        saved,
                        priority=_int(request.POST, "priority"),
                        gpus=_int(request.POST, "gpus", 1),
                    )
                    return redirect("run-detail", pk=run.pk)
                messages.success(request, f"Saved “{saved.name}”.")
                return redirect("config-edit", pk=saved.pk)
        except ConfigInvalid as exc:
            errors, status = exc.errors, 400
    elif instance:
        try:
            config, resolved = services.validate_config(workspace, yaml_text)
            estimate = services.memory_estimate(config, resolved)
        except ConfigInvalid as exc:
            errors = exc.errors
    return render(
        request,
        "runs/config_edit.html",
        {
            "can_write": can_write(request.user, workspace),
            "config": instance,
            "name": name,
            "yaml": yaml_text,
            "errors": errors,
            "estimate": estimate,
            "datasets": Dataset.objects.filter(workspace=workspace),
            "models": available_models(),
            "presets": [(key, label) for key, (label, _) in PRESETS.items()],
            "form": CommonKeysForm(yaml_text),
        },
        status=status,
    )


def _int(data, key: str, default: int = 0) -> int:
    try:
        return int(data.get(key, default))
    except (TypeError, ValueError):
        return default


def config_export(request, pk: int):
    config = get_object_or_404(TrainingConfig.objects.visible_to(request.user), pk=pk)
    response = HttpResponse(config.yaml, content_type="application/yaml")
    response["Content-Disposition"] = f'attachment; filename="{download_name(config.name)}.yaml"'
    return response


@require_POST
def config_run(request, pk: int):
    config = get_object_or_404(TrainingConfig.objects.visible_to(request.user), pk=pk)
    require_writer(request.user, config.workspace)
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
    log = realtime.log_tail(run)
    others = Run.objects.filter(workspace=run.workspace).exclude(pk=run.pk)[:50]
    diff_with = (
        Run.objects.filter(workspace=run.workspace, pk=parse_id(request.GET.get("diff", ""))).first()
        if parse_id(request.GET.get("diff", ""))
        else None
    )
    return render(
        request,
        "runs/run_detail.html",
        {
            "can_write": can_write(request.user, run.workspace),
            "others": others,
            "diff_with": diff_with,
            "config_diff": services.config_diff(diff_with, run) if diff_with else None,
            "notes": run.notes.select_related("author"),
            "generations": run.generations.all()[:5],
            "has_adapter": (run.run_dir / "adapter").is_dir(),
            "has_merged": run.artifacts.filter(kind="merged").exists(),
            "examples": run.data_summary.get("examples", []),
            "base_model": services.run_base_model(run),
            "run": run,
            "status": realtime.status_of(run),
            "log_text": log["text"] if log else "",
            "run_info": {
                "id": run.pk,
                "logOffset": log["offset"] if log else 0,
                "startedAt": run.started_at.timestamp() if run.started_at else None,
                "finishedAt": run.finished_at.timestamp() if run.finished_at else None,
            },
            "artifacts": run.artifacts.all(),
            "queue_position": gpus.queue_position(run) if run.status == "queued" else None,
            "can_resume": run.status in ("interrupted", "failed", "cancelled") and services.latest_checkpoint(run),
            "estimate": services.run_memory_estimate(run),
            "peak_memory_mb": max(
                (p.values.get("memory_mb", 0) for p in run.points.all() if "memory_mb" in p.values), default=None
            ),
        },
    )


def run_compare(request):
    """Overlay the charts of chosen runs of the workspace and diff their configs."""
    workspace = current_workspace(request)
    runs = list(Run.objects.filter(workspace=workspace))
    ids = parse_ids(request.GET.getlist("ids"))
    chosen = sorted((r for r in runs if r.pk in ids), key=lambda r: r.pk)  # older first: diffs read forward
    series = {r.pk: {"name": f"run {r.pk} · {r.name}", "points": realtime.history(r.pk, -1)} for r in chosen}
    return render(
        request,
        "runs/compare.html",
        {
            "runs": runs,
            "chosen": chosen,
            "ids": ids,
            "series": series,
            "config_diff": services.config_diff(chosen[0], chosen[1]) if len(chosen) >= 2 else None,
        },
    )


@require_POST
def run_merge(request, pk: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    require_writer(request.user, run.workspace)
    try:
        services.request_merge(run)
    except services.CannotMerge as exc:
        messages.warning(request, str(exc))
    else:
        messages.info(request, "Merging in a worker: the merged model appears under Artifacts when it is ready.")
    return redirect(reverse("run-detail", args=[run.pk]) + "#artifacts")


@require_POST
def run_playground(request, pk: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    require_writer(request.user, run.workspace)
    try:
        generation = services.ask_playground(run, request.user, request.POST.get("prompt", ""))
    except services.NothingToTry as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse({"id": generation.pk, "status": generation.status})


def run_generation(request, pk: int, generation_id: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    g = get_object_or_404(run.generations, pk=generation_id)
    return JsonResponse(
        {
            "id": g.pk,
            "status": g.status,
            "prompt": g.prompt,
            "base": g.base_text,
            "tuned": g.tuned_text,
            "error": g.error,
            "source": Path(g.source).name,
        }
    )


@require_POST
def run_note(request, pk: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    require_writer(request.user, run.workspace)
    text = request.POST.get("text", "").strip()
    if text:
        RunNote.objects.create(run=run, author=request.user, text=text[:20000])
    return redirect(reverse("run-detail", args=[run.pk]) + "#notes")


def run_log(request, pk: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    if not run.log_path.exists():
        raise Http404("no log yet")
    return FileResponse(
        run.log_path.open("rb"), as_attachment=True, filename=f"run-{run.pk}.log", content_type="text/plain"
    )


@require_POST
def run_resume(request, pk: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    require_writer(request.user, run.workspace)
    try:
        new = services.resume_run(run, request.user)
    except services.CannotResume as exc:
        messages.error(request, str(exc))
        return redirect("run-detail", pk=run.pk)
    return redirect("run-detail", pk=new.pk)


@require_POST
def run_cancel(request, pk: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    require_writer(request.user, run.workspace)
    if services.cancel_run(run):
        messages.info(request, "Cancelling the run.")
    else:
        messages.warning(request, "The run has already ended.")
    return redirect("run-detail", pk=run.pk)


@require_POST
def delete_view(request, kind: str, pk: int):
    """Delete a dataset, config or run of the workspace (writers), then go back to its list."""
    from webapp.runs import deletion

    model, remove, listing = {
        "datasets": (Dataset, deletion.delete_dataset, "dataset-list"),
        "configs": (TrainingConfig, deletion.delete_config, "config-list"),
        "runs": (Run, deletion.delete_run, "run-list"),
    }[kind]
    thing = get_object_or_404(model.objects.visible_to(request.user), pk=pk)
    require_writer(request.user, thing.workspace)
    try:
        remove(thing)
    except deletion.CannotDelete as exc:
        messages.error(request, f"“{thing.name}” was not deleted: {exc}.")
        return redirect(safe_next(request, request.META.get("HTTP_REFERER"), reverse(listing)))
    messages.info(request, f"Deleted “{thing.name}”.")
    return redirect(listing)


def artifact_download(request, pk: int, artifact_id: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    return artifact_file(run, get_object_or_404(run.artifacts, pk=artifact_id))


def artifact_file(run: Run, artifact) -> FileResponse:
    """The artifact as a download (shared by the page and the API); folders are zipped once."""
    path = (run.run_dir / artifact.path).resolve()
    if not path.is_relative_to(run.run_dir.resolve()) or not path.exists():
        raise Http404("artifact file missing")
    if path.is_dir():  # a checkpoint: zipped on first download, then served from disk
        target = path.with_name(path.name + ".zip")
        path = target if target.exists() else services.zip_folder(path, target, path.name)
    return FileResponse(path.open("rb"), as_attachment=True, filename=f"run-{run.pk}-{path.name}")
