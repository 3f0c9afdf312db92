"""Dataset use cases, shared by the pages, the API and `setup_demo`: upload a file, import a Hub split,
ask for statistics. The ones that need a worker queue it after the transaction commits."""

from __future__ import annotations

import os

from django.db import transaction

from training import sources
from training.formats import FORMATS
from webapp.datasets.encoding import EncodeOptions
from webapp.datasets.intake import UploadRejected, UploadResult, store_dataset, upload_limit
from webapp.datasets.models import Dataset, DatasetStats, HubImport
from webapp.datasets.storage import hub_cache_dir
from webapp.datasets.tasks import compute_dataset_stats, import_from_hub
from webapp.http import name_problem


class ImportRefused(ValueError):
    pass


def upload_dataset(
    workspace, user, file, *, name: str | None = None, format: str | None = None, keep_valid: bool = False
) -> UploadResult:
    """Validate and store an uploaded file. Nothing is kept unless it is stored whole.

    Raises UploadRejected with the report when lines are invalid and `keep_valid` is off.
    """
    size = getattr(file, "size", None) or 0
    limit = upload_limit()
    if size > limit:
        raise UploadRejected(f"the file is {size:,} bytes, over this server's {limit:,}-byte limit")
    if name and name_problem(name.strip()):
        raise UploadRejected(f"the dataset name {name_problem(name.strip())}", field="name")
    if format and format not in FORMATS:
        raise UploadRejected(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}", field="format")
    filename = os.path.basename(getattr(file, "name", "") or "dataset.jsonl")  # a label, never a path
    file.seek(0)
    return store_dataset(workspace, user, file, size, filename, name=name, format=format, keep_valid=keep_valid)


def import_hub_dataset(
    workspace, user, hub_id: str, *, config_name: str = "", split: str = "train", name: str | None = None
) -> HubImport:
    """Queue a copy of a Hub dataset's split (a worker loads it through training.sources and stores it as
    an ordinary Dataset). What can be refused now is: a malformed id or split, a bad name, and, offline,
    a dataset in no local cache (the worker would only find that out)."""
    hub_id, config_name, split = hub_id.strip(), (config_name or "").strip(), (split or "").strip() or "train"
    if not sources.HUB_ID.match(hub_id):
        raise ImportRefused(f"{hub_id!r} is not a Hub dataset id (owner/name, e.g. mlabonne/FineTome-100k)")
    try:
        sources.validate_split(split)
    except ValueError as exc:
        raise ImportRefused(str(exc)) from None
    if name and name_problem(name.strip()):
        raise ImportRefused(f"the dataset name {name_problem(name.strip())}")
    try:
        sources.check_hub_cache(hub_id, hub_cache_dir())
    except sources.SourceError as exc:
        raise ImportRefused(str(exc)) from None
    job = HubImport.objects.create(
        workspace=workspace,
        created_by=user,
        hub_id=hub_id,
        config_name=config_name,
        split=split,
        name=(name or "").strip(),
    )
    transaction.on_commit(lambda: import_from_hub(job.pk))
    return job


def request_stats(dataset: Dataset, options: EncodeOptions) -> DatasetStats:
    """The cached statistics for these options, queued for the worker if missing (or failed before)."""
    stats, created = DatasetStats.objects.get_or_create(
        dataset=dataset, key=options.key(), defaults={"options": options.as_query()}
    )
    if created or stats.status == DatasetStats.Status.FAILED:
        DatasetStats.objects.filter(pk=stats.pk).update(status=DatasetStats.Status.PENDING, error="", rows_done=0)
        transaction.on_commit(lambda: compute_dataset_stats(stats.pk))
    return stats
