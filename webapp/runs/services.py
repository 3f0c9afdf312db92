"""Run use cases, shared by pages, API and CLI: each validates, writes, and queues its job after commit.

Status changes go through `lifecycle`, config checks through `configs`, files through `artifacts`.
"""

from __future__ import annotations

import shutil

import yaml
from django.db import transaction

from training import sharding
from training.config import ConfigError, ConfigInvalid
from webapp.http import name_problem
from webapp.runs import lifecycle, tasks
from webapp.runs.artifacts import NothingToTry, playground_source
from webapp.runs.configs import validate_config
from webapp.runs.lifecycle import CannotResume
from webapp.runs.models import MERGE_UNDER_WAY, Generation, MergeState, MetricPoint, Run, RunNote, TrainingConfig

MAX_GPUS_PER_RUN = 64


def enqueue_run(
    workspace, user, config: TrainingConfig, name: str | None = None, *, gpus: int = 1, priority: int = 0
) -> Run:
    """Validate again (datasets may have gone), freeze the config into the run folder, queue after commit."""
    parsed, resolved = validate_config(workspace, config.yaml)
    if not 1 <= gpus <= MAX_GPUS_PER_RUN:
        raise ConfigInvalid([ConfigError("gpus", f"a run asks for 1 to {MAX_GPUS_PER_RUN} devices")])
    sharding.refuse_too_few_devices(parsed, gpus)  # fsdp / deepspeed on one device: nothing to shard over
    if not -1000 <= priority <= 1000:
        raise ConfigInvalid([ConfigError("priority", "priority goes from -1000 to 1000")])
    if name and name_problem(name.strip()):
        raise ConfigInvalid([ConfigError("name", f"a run name {name_problem(name.strip())}")])
    with transaction.atomic():
        run = Run.objects.create(
            workspace=workspace,
            config=config,
            name=name or config.name,
            config_yaml=config.yaml,
            created_by=user,
            gpus=gpus,
            priority=priority,
        )
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        transaction.on_commit(lambda: tasks.execute_run(run.pk))
    return run


def resume_run(run: Run, user) -> Run:
    """A new attempt that starts from the run's last checkpoint, with its metrics up to there."""
    checkpoint = lifecycle.resume_point(run)
    step = int(checkpoint.name.split("-")[-1])
    with transaction.atomic():
        # One attempt per run: the row lock makes a double click (or two users) wait, then see it.
        Run.objects.select_for_update().filter(pk=run.pk).first()
        if run.resumes.exists():
            raise CannotResume("this run was already resumed: open its newest attempt")
        new = Run.objects.create(
            workspace=run.workspace,
            config=run.config,
            name=run.name,
            config_yaml=run.config_yaml,
            created_by=user,
            gpus=run.gpus,
            priority=run.priority,
            attempt=run.attempt + 1,
            resumed_from=run,
            resume_checkpoint=str(checkpoint),
            current_step=step,
            total_steps=run.total_steps,
        )
        new.run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(run.run_dir / "config.yaml", new.run_dir / "config.yaml")
        kept = MetricPoint.objects.filter(run=run, step__lte=step).order_by("seq")
        MetricPoint.objects.bulk_create(
            [MetricPoint(run=new, seq=i, step=p.step, time=p.time, values=p.values) for i, p in enumerate(kept)]
        )
        Run.objects.filter(pk=new.pk).update(next_seq=kept.count())
        transaction.on_commit(lambda: tasks.execute_run(new.pk))
    return new


def cancel_run(run: Run) -> bool:
    """Queued runs end at once; a starting/running one is flagged, and its worker asks the trainer to
    stop at the next step, then stops it (SIGTERM, then SIGKILL) if it does not."""
    return lifecycle.request_cancel(run.pk)


class CannotMerge(ValueError):
    pass


def request_merge(run: Run) -> None:
    """Merge the adapter into the base model in a worker, as a downloadable artifact."""
    if not (run.run_dir / "adapter").is_dir():
        raise CannotMerge("only a finished LoRA/QLoRA run has an adapter to merge")
    if run.artifacts.filter(kind="merged").exists():
        raise CannotMerge("the merged model is already there")
    # Conditional, so two clicks at once queue one merge; a failed merge may be asked for again.
    queued = (
        Run.objects.filter(pk=run.pk)
        .exclude(merge_state__in=MERGE_UNDER_WAY)
        .update(merge_state=MergeState.QUEUED, merge_error="", merge_holder="")
    )
    if not queued:
        raise CannotMerge("a merge of this run is already under way: the merged model appears under Artifacts")
    transaction.on_commit(lambda: tasks.merge_adapter(run.pk))


def ask_playground(run: Run, user, prompt: str) -> Generation:
    """Queue a prompt for the base model and the tuned one (NothingToTry: no prompt, or nothing trained yet)."""
    prompt = prompt.strip()
    if not prompt:
        raise NothingToTry("type a prompt first")
    generation = Generation.objects.create(
        run=run, author=user, prompt=prompt[:4000], source=str(playground_source(run))
    )
    transaction.on_commit(lambda: tasks.answer_prompt(generation.pk))
    return generation


NOTE_MAX_CHARS = 20000


def add_note(run: Run, user, text: str) -> RunNote | None:
    """A note on a run's page (None for blank text: nothing to keep). The caller checked the writer's role."""
    text = text.strip()[:NOTE_MAX_CHARS]
    return RunNote.objects.create(run=run, author=user, text=text) if text else None
