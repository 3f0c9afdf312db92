"""Deleting configs and runs (writers only; the entry points check the role). Datasets: webapp/datasets/deletion.py.

Nothing in use goes: a run is deleted once it has ended (and any merge of its adapter too); a
config at any time, since its runs keep their own frozen copy of the YAML.
"""

from __future__ import annotations

import shutil

from django.db import transaction

from webapp.runs.models import ACTIVE_STATES, MERGE_UNDER_WAY, Run, TrainingConfig


class CannotDelete(ValueError):
    pass


def delete_config(config: TrainingConfig) -> None:
    config.delete()  # its runs keep their own frozen copy of the YAML


def delete_run(run: Run) -> None:
    if run.status in ACTIVE_STATES:
        raise CannotDelete(f"the run is {run.status}: cancel it first")
    if run.merge_state in MERGE_UNDER_WAY:
        raise CannotDelete("a merge of its adapter is under way: delete the run once it has ended")
    folder = run.run_dir
    with transaction.atomic():
        ended = Run.objects.filter(pk=run.pk).exclude(status__in=ACTIVE_STATES)
        if not ended.exists():
            raise CannotDelete("the run has started again meanwhile")
        if not ended.exclude(merge_state__in=MERGE_UNDER_WAY).exists():
            raise CannotDelete("a merge of its adapter is under way: delete the run once it has ended")
        run.delete()  # metrics, artifacts, notes and playground answers go with it
    shutil.rmtree(folder, ignore_errors=True)
