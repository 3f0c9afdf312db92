"""/api/configs: create, validate without saving, list, get, export as plain axolotl YAML."""

from __future__ import annotations

from datetime import datetime

from django.shortcuts import get_object_or_404
from ninja import Router, Schema

from training.config import ConfigInvalid
from webapp.api.access import visible
from webapp.runs import configs
from webapp.runs.models import TrainingConfig
from webapp.workspaces.services import current_workspace, require_writer

router = Router(tags=["configs"])


class ConfigIn(Schema):
    name: str
    yaml: str


class YamlIn(Schema):
    yaml: str


class ConfigOut(Schema):
    id: int
    name: str
    yaml: str
    updated_at: datetime


class FieldError(Schema):
    path: str
    message: str


class Invalid(Schema):
    message: str
    errors: list[FieldError]


class Valid(Schema):
    valid: bool
    memory_estimate_gib: float | None


def _invalid(exc: ConfigInvalid) -> Invalid:
    return Invalid(message="invalid config", errors=[FieldError(path=e.path, message=e.message) for e in exc.errors])


@router.post("/validate", response={200: Valid, 422: Invalid})
def validate(request, body: YamlIn):
    try:
        config, resolved = configs.validate_config(current_workspace(request), body.yaml)
    except ConfigInvalid as exc:
        return 422, _invalid(exc)
    estimate = configs.memory_estimate(config, resolved)
    return Valid(valid=True, memory_estimate_gib=estimate.total_gib if estimate else None)


@router.post("/", response={201: ConfigOut, 422: Invalid})
def create(request, body: ConfigIn):
    workspace = current_workspace(request)
    require_writer(request.user, workspace)
    try:
        return 201, configs.save_config(workspace, request.user, body.name, body.yaml)
    except ConfigInvalid as exc:
        return 422, _invalid(exc)


@router.get("/", response=list[ConfigOut])
def list_configs(request):
    return visible(request, TrainingConfig.objects)


@router.get("/{config_id}", response=ConfigOut)
def get_config(request, config_id: int):
    return get_object_or_404(visible(request, TrainingConfig.objects), pk=config_id)


@router.get("/{config_id}/export", response={200: None})
def export(request, config_id: int):
    return configs.yaml_download(get_object_or_404(visible(request, TrainingConfig.objects), pk=config_id))


@router.delete("/{config_id}", response={204: None})
def delete(request, config_id: int):
    """Delete a config; runs made from it keep their own copy of the YAML."""
    from webapp.runs.deletion import delete_config

    config = get_object_or_404(visible(request, TrainingConfig.objects), pk=config_id)
    require_writer(request.user, config.workspace)
    delete_config(config)
    return 204, None
