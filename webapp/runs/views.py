"""Run pages: thin handlers (parse, authorize, one service call, render). Config pages: config_views.py."""

from __future__ import annotations

from django.contrib import messages
from django.http import FileResponse, Http404, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from webapp.http import parse_id, parse_ids, safe_next
from webapp.runs import artifacts, configs, gpus, realtime, services
from webapp.runs.models import MERGE_UNDER_WAY, Run, TrainingConfig
from webapp.workspaces.services import can_write, current_workspace, require_writer


def home(request):
    return redirect("run-list")


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
            "config_diff": configs.config_diff(diff_with, run) if diff_with else None,
            "notes": run.notes.select_related("author"),
            "generations": run.generations.all()[:5],
            "has_adapter": (run.run_dir / "adapter").is_dir(),
            "has_merged": run.artifacts.filter(kind="merged").exists(),
            "merge_under_way": run.merge_state in MERGE_UNDER_WAY,
            "examples": run.data_summary.get("examples", []),
            "base_model": configs.run_base_model(run),
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
            "can_resume": run.status in ("interrupted", "failed", "cancelled") and artifacts.resumable_checkpoint(run),
            "estimate": configs.run_memory_estimate(run),
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
            "config_diff": configs.config_diff(chosen[0], chosen[1]) if len(chosen) >= 2 else None,
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
    except artifacts.NothingToTry as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse({"id": generation.pk, "status": generation.status})


def run_generation(request, pk: int, generation_id: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    return JsonResponse(get_object_or_404(run.generations, pk=generation_id).payload())


@require_POST
def run_note(request, pk: int):
    run = get_object_or_404(Run.objects.visible_to(request.user), pk=pk)
    require_writer(request.user, run.workspace)
    services.add_note(run, request.user, request.POST.get("text", ""))
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
    """Delete a config or run of the workspace (writers), then go back to its list (datasets: their own view)."""
    from webapp.runs import deletion

    model, remove, listing = {
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
    return artifacts.download(run, get_object_or_404(run.artifacts, pk=artifact_id))
