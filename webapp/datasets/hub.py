"""The worker's side of a Hub import: load the split through training.sources, write its rows as JSON
lines with progress, and store them as an ordinary Dataset (validated as an upload is)."""

from __future__ import annotations

import tempfile

from training import sources
from webapp.datasets.intake import store_dataset
from webapp.datasets.models import HubImport, dataset_dir
from webapp.datasets.storage import hub_cache_dir
from webapp.http import MAX_NAME, download_name


def run_import(import_id: int) -> None:
    """Do one claimed (running) import to the end; a SourceError or UploadRejected says why it failed."""
    job = HubImport.objects.select_related("workspace", "created_by").get(pk=import_id)
    cache = sources.check_hub_cache(job.hub_id, hub_cache_dir())
    table = sources.load_hub_dataset(job.hub_id, job.split, None, cache, name=job.config_name or None)
    total = len(table)
    HubImport.objects.filter(pk=import_id).update(rows_total=total)
    every = max(1, min(1000, total // 50))  # ~50 progress writes, at most one per 1000 rows
    with tempfile.NamedTemporaryFile("w+b", dir=dataset_dir(), suffix=".hub.part") as rows:
        for number, row in enumerate(table, start=1):
            rows.write(sources.json_line(row))
            if number % every == 0:
                HubImport.objects.filter(pk=import_id).update(rows_done=number)
        size = rows.tell()
        rows.seek(0)
        label = job.hub_id + (f" ({job.config_name})" if job.config_name else "") + f" [{job.split}]"
        base = job.name or download_name(job.hub_id.split("/")[-1] + (f"-{job.config_name}" if job.config_name else ""))
        result = store_dataset(
            job.workspace, job.created_by, rows, size, label[:255], name=base[: MAX_NAME - 10], keep_valid=True
        )
    HubImport.objects.filter(pk=import_id).update(status=HubImport.Status.DONE, dataset=result.dataset, rows_done=total)
