"""Deleting a dataset (writers only; the entry points check the role).

A dataset goes once no active run of its workspace trains on it. Its file is content-addressed and may
be shared with an upload in another workspace, so it is removed only with the last dataset that points
at it. Runs are only read here (which active ones name the dataset), through the runs app's models.
"""

from __future__ import annotations

import yaml
from django.db import transaction

from webapp.datasets.models import Dataset
from webapp.datasets.storage import files_of
from webapp.runs.models import ACTIVE_STATES, Run


class CannotDelete(ValueError):
    pass


def datasets_named_by(config_yaml: str) -> set[str]:
    """The `path`s of a config's `datasets:` entries (none if the YAML doesn't parse)."""
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
        if dataset.name in datasets_named_by(r.config_yaml)
    ]
    if busy:
        raise CannotDelete(f"run {busy[0]} is training on it; cancel it or wait for it to end")
    with transaction.atomic():
        shared = Dataset.objects.filter(sha256=dataset.sha256).exclude(pk=dataset.pk).exists()
        files = files_of(dataset, content=not shared)
        dataset.delete()  # its statistics go with it
    for path in files:
        path.unlink(missing_ok=True)
