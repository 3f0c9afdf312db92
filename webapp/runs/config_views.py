"""Config pages: list, edit (validate, estimate, save, run), export. Thin handlers over
`configs` (checks, save) and `services` (start a run)."""

from __future__ import annotations

import yaml
from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from training.config import ConfigInvalid
from webapp.base_models import available_models
from webapp.datasets.models import Dataset
from webapp.http import parse_id
from webapp.runs import configs, services
from webapp.runs.forms import CommonKeysForm
from webapp.runs.models import Run, TrainingConfig
from webapp.runs.presets import PRESETS
from webapp.workspaces.services import can_write, current_workspace, require_writer

STARTER_PRESET = "lora-small"


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
    errors, status, estimate, warnings, lora_linear = [], 200, None, [], None
    if request.method == "POST":
        name, yaml_text = request.POST.get("name", ""), request.POST.get("yaml", "")
        action = request.POST.get("action")
        try:
            if action == "apply_form":
                yaml_text = CommonKeysForm(yaml_text, request.POST).apply()
                messages.info(request, "The form's values are in the YAML below (not saved yet).")
            elif action == "validate":
                config, resolved = configs.validate_config(workspace, yaml_text)
                estimate, warnings = configs.memory_estimate(config, resolved), config.warnings
                lora_linear = configs.lora_target_linear_note(config)
                messages.success(request, "The config is valid.")
            else:
                require_writer(request.user, workspace)
                saved = configs.save_config(workspace, request.user, name, yaml_text, instance)
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
            config, resolved = configs.validate_config(workspace, yaml_text)
            estimate, warnings = configs.memory_estimate(config, resolved), config.warnings
            lora_linear = configs.lora_target_linear_note(config)
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
            "warnings": warnings,
            "lora_linear": lora_linear,
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
    return configs.yaml_download(get_object_or_404(TrainingConfig.objects.visible_to(request.user), pk=pk))


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
