"""The worker's own disk checks of a run: before its trainer starts (a full data dir, a run folder that can't
be written) and when a trainer exits without saying why (it could not write its events file)."""

from __future__ import annotations

from django.conf import settings

from training.storage import folder_problem
from webapp.runs.models import Run

LOG_TAIL_BYTES = 64 * 1024


def problem_before_start(run: Run) -> str | None:
    """Why `run` can't start here (its folder can't be written, its disk has less free than
    TRAINYARD_MIN_FREE_MB), else None. A trainer started anyway would die on its first write with only a
    traceback, or the worker on opening the run's log."""
    return folder_problem(run.run_dir, settings.TRAINYARD_MIN_FREE_MB)


def why_exited(run_id: int) -> str | None:
    """Why a trainer exited with an error and no final status: the disk, looked at now, or the reason the trainer
    printed as its last `error:` line (training/cli.py) when it could not write it to its events file."""
    run = Run.objects.filter(pk=run_id).first()
    if run is None:
        return None
    problem = folder_problem(run.run_dir, settings.TRAINYARD_MIN_FREE_MB)
    if problem:
        return problem
    try:
        with run.log_path.open("rb") as log:
            log.seek(max(0, log.seek(0, 2) - LOG_TAIL_BYTES))
            lines = log.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    said = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return f"{said[-1]} (the trainer could not record it; see the log)" if said else None
