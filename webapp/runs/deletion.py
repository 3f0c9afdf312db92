"""Deleting datasets, configs and runs (writers only; the entry points check the role).

Nothing in use goes: a run is deleted once it has ended, a dataset once no active run of its
workspace trains on it. A dataset's file is content-addressed and may be shared with an upload in
another workspace, so it is removed only with the last dataset that points at it.
"""

from __future__ import annotations

import shutil

import yaml
from django.db import transaction

from webapp.datasets.models import Dataset
from webapp.runs.models import ACTIVE_STATES, Run, TrainingConfig


class CannotDelete(ValueError):
    pass


def _datasets_named_by(config_yaml: str) -> set[str]:
    try:
        data = yaml.safe_load(config_yaml)
    except yaml.YAMLError:
        return set()
    entries = data.get("datasets") if isinstance(data, dict) else None
    return {e["path"] for e in entries or [] if isinstance(e, dict) and isinstance(e.get("path"), str)}


def delete_dataset(dataset: Dataset) -> None:
    busy = [
        r.pk
        for r in Run.objects.filter(workspace=dataset.workspace, status__in=ACTIVE_STATES)
        if dataset.name in _datasets_named_by(r.config_yaml)
    ]
    if busy:
        raise CannotDelete(f"run {busy[0]} is training on it; cancel it or wait for it to end")
    files = [dataset.rejected_path]
    with transaction.atomic():
        shared = Dataset.objects.filter(sha256=dataset.sha256).exclude(pk=dataset.pk).exists()
        if not shared:
            files += [dataset.path, dataset.index_path]
        dataset.delete()  # its statistics go with it
    for path in files:
        path.unlink(missing_ok=True)


def delete_config(config: TrainingConfig) -> None:
    config.delete()  # its runs keep their own frozen copy of the YAML


def delete_run(run: Run) -> None:
    if run.status in ACTIVE_STATES:
        raise CannotDelete(f"the run is {run.status}: cancel it first")
    folder = run.run_dir
    with transaction.atomic():
        if not Run.objects.filter(pk=run.pk).exclude(status__in=ACTIVE_STATES).exists():
            raise CannotDelete("the run has started again meanwhile")
        run.delete()  # metrics, artifacts, notes and playground answers go with it
    shutil.rmtree(folder, ignore_errors=True)
