"""Huey tasks for datasets: statistics over the whole file (with progress, cached per option set) and Hub imports."""

from __future__ import annotations

import logging

from huey.contrib.djhuey import db_task

from training.sources import SourceError
from webapp.datasets.encoding import EncodeOptions
from webapp.datasets.hub import run_import
from webapp.datasets.intake import UploadRejected
from webapp.datasets.models import DatasetStats, HubImport
from webapp.datasets.stats import compute_stats

log = logging.getLogger("trainyard.datasets")


def compute_dataset_stats(stats_id: int) -> None:
    """Public entry: queue the computation (after the creating transaction commits)."""
    _compute_dataset_stats(stats_id)


@db_task()
def _compute_dataset_stats(stats_id: int) -> None:
    claimed = DatasetStats.objects.filter(pk=stats_id, status=DatasetStats.Status.PENDING).update(
        status=DatasetStats.Status.RUNNING
    )
    if not claimed:
        return  # gone, or another worker has it
    stats = DatasetStats.objects.select_related("dataset").get(pk=stats_id)
    # What the page or API validated, stored with as_query(): read back as it was (the model included;
    # make_encoder refuses one that is no longer a model folder here, and the stats fail saying so).
    options = EncodeOptions.from_query(stats.options, [stats.options.get("model", "")])

    def progress(rows: int) -> None:
        DatasetStats.objects.filter(pk=stats_id).update(rows_done=rows)

    try:
        result = compute_stats(stats.dataset, options, progress)
    except Exception as exc:  # keep the reason for the page; the user can ask again
        log.exception("stats %s failed", stats_id)
        DatasetStats.objects.filter(pk=stats_id).update(status=DatasetStats.Status.FAILED, error=str(exc)[:2000])
        return
    DatasetStats.objects.filter(pk=stats_id).update(
        status=DatasetStats.Status.DONE, result=result, rows_done=result["rows"]
    )


def import_from_hub(import_id: int) -> None:
    """Public entry: queue a Hub import (after the creating transaction commits)."""
    _import_from_hub(import_id)


@db_task()
def _import_from_hub(import_id: int) -> None:
    claimed = HubImport.objects.filter(pk=import_id, status=HubImport.Status.PENDING).update(
        status=HubImport.Status.RUNNING
    )
    if not claimed:
        return  # gone, or another worker has it
    try:
        run_import(import_id)
    except (SourceError, UploadRejected) as exc:  # not in the cache, no valid row, ...: said as it is
        HubImport.objects.filter(pk=import_id).update(status=HubImport.Status.FAILED, error=str(exc)[:2000])
    except Exception as exc:
        log.exception("hub import %s failed", import_id)
        HubImport.objects.filter(pk=import_id).update(
            status=HubImport.Status.FAILED, error=f"{type(exc).__name__}: {exc}"[:2000]
        )
