"""Training configs: site policy (trust_remote_code), validation against the workspace and this
server, the memory estimate, saving, and the reads of a run's frozen config (base model, diff)."""

from __future__ import annotations

import yaml
from django.conf import settings

from training.config import ConfigError, ConfigInvalid, TrainConfig, check_environment, check_model, parse_config
from webapp.base_models import resolve_base_model
from webapp.datasets.models import Dataset
from webapp.http import name_problem
from webapp.runs.models import Run, TrainingConfig


def trust_remote_code_allowed() -> bool:
    from webapp.workspaces.models import SiteSettings

    return settings.TRAINYARD_ALLOW_TRUST_REMOTE_CODE or SiteSettings.current().allow_trust_remote_code


def validate_config(workspace, yaml_text: str) -> tuple[TrainConfig, dict]:
    """Parse and check a config against this workspace and server. Returns (config, resolved dict),
    where the resolved dict names real files; raises ConfigInvalid listing every problem by key path."""
    errors: list[ConfigError] = []
    config = None
    try:
        config = parse_config(yaml_text, allow_trust_remote_code=trust_remote_code_allowed())
    except ConfigInvalid as exc:
        errors += exc.errors
    raw = yaml.safe_load(yaml_text) if not (errors and errors[0].message.startswith("invalid YAML")) else None
    raw = raw if isinstance(raw, dict) else {}
    # Workspace checks run on the raw mapping too, so one round trip shows every problem.
    resolved = config.model_dump(exclude_none=True) if config else {}
    if isinstance(raw.get("base_model"), str):
        try:
            resolved["base_model"] = resolve_base_model(raw["base_model"])
        except ValueError as exc:
            errors.append(ConfigError("base_model", str(exc)))
    names = sorted(Dataset.objects.filter(workspace=workspace).values_list("name", flat=True))
    for i, entry in enumerate(raw.get("datasets") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        dataset = Dataset.objects.filter(workspace=workspace, name=entry["path"]).first()
        if dataset is None:
            known = ", ".join(names) or "none uploaded yet"
            errors.append(
                ConfigError(f"datasets[{i}].path", f"no dataset named {entry['path']!r} in this workspace ({known})")
            )
        else:
            errors += _layout_errors(i, entry, dataset)
            if dataset.images and not raw.get("processor_type"):  # its image parts would be refused row by row
                errors.append(
                    ConfigError(
                        f"datasets[{i}].path",
                        f"dataset {dataset.name!r} has images in its rows: train on them with processor_type: "
                        "AutoProcessor and skip_prepare_dataset: true, on a vision-language model",
                    )
                )
            if config:
                resolved["datasets"][i]["path"] = str(dataset.path)
    if config and resolved.get("base_model"):
        config.base_model = resolved["base_model"]  # the checks below read the model's own config.json
    if config and not settings.REDIS_URL:
        # One machine: the web host's GPU and packages are the worker's. Scaled out (Redis), workers
        # may run on other hosts: each checks its own machine when the run starts and fails it with
        # the same message (training.cli.cmd_train), so a CPU-only web host refuses nothing here.
        errors += check_environment(config)
    elif config:
        errors += check_model(config)  # the machine is each worker's to check; the model is the same everywhere
    if errors:
        raise ConfigInvalid(errors)
    return config, resolved


def _layout_errors(i: int, entry: dict, dataset: Dataset) -> list[ConfigError]:
    """A dataset whose rows need options (ShareGPT's `conversations` with from/value) used by an
    entry that doesn't set them: every row would fail, so say which keys to add, as axolotl names them."""
    if entry.get("type", "chat_template") != "chat_template":
        return []
    errors = []
    for key, value in dataset.format_options.items():
        if entry.get(key) != value:
            shown = yaml.safe_dump({key: value}, default_flow_style=True).strip()[1:-1]
            errors.append(
                ConfigError(
                    f"datasets[{i}].{key}",
                    f"dataset {dataset.name!r} is laid out differently from the default: add {shown} to this entry",
                )
            )
    return errors


def memory_estimate(config: TrainConfig, resolved: dict):
    """The GPU memory estimate for a validated config, or None when the model's shape is unknown here."""
    from training.architectures import read_model_config
    from training.memory import ModelShape, estimate

    model_config = read_model_config(resolved.get("base_model", config.base_model))
    if model_config is None:
        return None
    try:
        return estimate(config, ModelShape.from_config(model_config), bf16=config.bf16 is not False)
    except (KeyError, ValueError):
        return None


def lora_target_linear_note(config: TrainConfig) -> dict | None:
    """What `lora_target_linear` adapts on this model ({what, regex}), for the config page: on a vision-language
    model the language model only, and the regex PEFT is given (training/architectures.py)."""
    from training.architectures import describe_lora_target_linear

    described = describe_lora_target_linear(config)
    return {"what": described[0], "regex": described[1]} if described else None


def run_base_model(run: Run) -> str:
    """The model the run trained on, as it was resolved (absolute folder or hub id)."""
    try:
        return str(yaml.safe_load((run.run_dir / "config.yaml").read_text()).get("base_model", ""))
    except (OSError, yaml.YAMLError, AttributeError):
        return ""


def run_memory_estimate(run: Run):
    try:
        resolved = yaml.safe_load((run.run_dir / "config.yaml").read_text())
        return memory_estimate(parse_config(resolved, allow_trust_remote_code=True), resolved)
    except (OSError, ConfigInvalid, yaml.YAMLError):
        return None


def save_config(workspace, user, name: str, yaml_text: str, instance: TrainingConfig | None = None) -> TrainingConfig:
    validate_config(workspace, yaml_text)
    name = name.strip()
    problem = name_problem(name)
    if problem:
        raise ConfigInvalid([ConfigError("name", f"a config name {problem}")])
    clash = TrainingConfig.objects.filter(workspace=workspace, name=name)
    if instance:
        clash = clash.exclude(pk=instance.pk)
    if clash.exists():
        raise ConfigInvalid([ConfigError("name", f"a config named {name!r} already exists in this workspace")])
    if instance is None:
        return TrainingConfig.objects.create(workspace=workspace, name=name, yaml=yaml_text, created_by=user)
    instance.name, instance.yaml = name, yaml_text
    instance.save()
    return instance


def config_diff(old: Run, new: Run) -> list[tuple[str, str]]:
    """Line diff of two runs' configs: (kind, line) with kind in add / remove / same / hunk."""
    import difflib

    lines = difflib.unified_diff(
        old.config_yaml.splitlines(), new.config_yaml.splitlines(), f"run {old.pk}", f"run {new.pk}", lineterm="", n=3
    )
    out = []
    for line in list(lines)[2:]:
        kind = {"+": "add", "-": "remove", "@": "hunk"}.get(line[:1], "same")
        out.append((kind, line))
    return out


def yaml_download(config: TrainingConfig):
    """A config's YAML exactly as written, as a download (the page and the API serve the same)."""
    from django.http import HttpResponse

    from webapp.http import download_name

    response = HttpResponse(config.yaml, content_type="application/yaml")
    response["Content-Disposition"] = f'attachment; filename="{download_name(config.name)}.yaml"'
    return response
