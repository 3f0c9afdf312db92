"""Run and config use cases, shared by pages, API and CLI. The only code that changes a run's status."""

from __future__ import annotations

import logging
import shutil
import uuid
import zipfile
from pathlib import Path

import yaml
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from training import sharding
from training.config import ConfigError, ConfigInvalid, TrainConfig, check_environment, parse_config
from webapp.datasets.models import Dataset
from webapp.http import name_problem
from webapp.runs import realtime
from webapp.runs.base_models import resolve_base_model
from webapp.runs.models import ACTIVE_STATES, Artifact, MetricPoint, Run, RunStatus, TrainingConfig

log = logging.getLogger("trainyard.runs")


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
            if config:
                resolved["datasets"][i]["path"] = str(dataset.path)
    if config and not settings.REDIS_URL:
        # One machine: the web host's GPU and packages are the worker's. Scaled out (Redis), workers
        # may run on other hosts: each checks its own machine when the run starts and fails it with
        # the same message (training.cli.cmd_train), so a CPU-only web host refuses nothing here.
        errors += check_environment(config)
    if config and resolved.get("base_model"):  # the model's own limits, read from its config.json (resolved folder)
        from training.architectures import check_against_model

        errors += [e for e in check_against_model(config, resolved["base_model"]) if e not in errors]
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
    from training.memory import ModelShape, estimate

    source = resolved.get("base_model", config.base_model)
    path = Path(source) / "config.json"
    if not path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
        except Exception:
            cached = None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return estimate(config, ModelShape.from_config_json(path), bf16=config.bf16 is not False)
    except (KeyError, ValueError):
        return None


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


MAX_GPUS_PER_RUN = 64


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


def enqueue_run(
    workspace, user, config: TrainingConfig, name: str | None = None, *, gpus: int = 1, priority: int = 0
) -> Run:
    """Validate again (datasets may have gone), freeze the config into the run folder, queue after commit."""
    from webapp.runs.tasks import execute_run

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
        transaction.on_commit(lambda: execute_run(run.pk))
    return run


def latest_checkpoint(run: Run) -> Path | None:
    """The newest *complete* checkpoint: a process killed while saving leaves a folder without
    trainer_state.json (written last), which can't be resumed from."""
    folder = run.run_dir / "checkpoints"
    found = [
        p
        for p in (folder.glob("checkpoint-*") if folder.is_dir() else [])
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()
    ]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


class CannotResume(ValueError):
    pass


def resume_run(run: Run, user) -> Run:
    """A new attempt that starts from the run's last checkpoint, with its metrics up to there."""
    from webapp.runs.tasks import execute_run

    if run.status not in (RunStatus.INTERRUPTED, RunStatus.FAILED, RunStatus.CANCELLED):
        raise CannotResume(f"only an interrupted, failed or cancelled run can be resumed (this one is {run.status})")
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise CannotResume("this run saved no checkpoint (set save_steps in the config): start a new run instead")
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
        transaction.on_commit(lambda: execute_run(new.pk))
    return new


def transition(run_id: int, from_states, to_state: str, **fields) -> bool:
    """Move a run only if it is still in one of `from_states` (a conditional UPDATE: no lost race)."""
    if to_state in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.INTERRUPTED):
        fields.setdefault("finished_at", timezone.now())
    return Run.objects.filter(pk=run_id, status__in=list(from_states)).update(status=to_state, **fields) == 1


def cancel_run(run: Run) -> bool:
    """Queued runs end at once; starting/running ones are flagged and their worker kills the process."""
    if transition(run.pk, [RunStatus.QUEUED], RunStatus.CANCELLED, message="cancelled before it started"):
        return True
    return (
        Run.objects.filter(pk=run.pk, status__in=[RunStatus.STARTING, RunStatus.RUNNING]).update(cancel_requested=True)
        == 1
    )


def record_events(run_id: int, events: list[dict], new_offset: int) -> None:
    """Turn training events into rows (worker only). Idempotent per byte offset of events.jsonl."""
    run = Run.objects.get(pk=run_id)
    points, seq, fields = [], run.next_seq, {}
    for event in events:
        kind = event.get("event")
        if kind == "metric":
            points.append(
                MetricPoint(
                    run=run,
                    seq=seq,
                    step=int(event.get("step", 0)),
                    time=float(event.get("time", 0)),
                    values=event.get("values", {}),
                )
            )
            seq += 1
            fields["current_step"] = max(int(event.get("step", 0)), fields.get("current_step", run.current_step))
        elif kind == "status" and event.get("state") == "running":
            fields["total_steps"] = event.get("total_steps")
            transition(run_id, [RunStatus.STARTING], RunStatus.RUNNING)
        elif kind == "data":
            fields["data_summary"] = {k: v for k, v in event.items() if k not in ("event", "time")}
        elif kind == "artifact" and event.get("kind") == "checkpoint":
            Artifact.objects.get_or_create(
                run=run,
                kind="checkpoint",
                path=event["path"],
                defaults={"size": folder_size(run.run_dir / event["path"])},
            )
    ending = any(e.get("event") == "status" and e.get("state") in ("succeeded", "failed") for e in events)
    if points or ending:
        fields["health"] = _updated_health(run, points, seq, ending)
    with transaction.atomic():
        MetricPoint.objects.bulk_create(points)
        Run.objects.filter(pk=run_id).update(
            events_offset=new_offset, next_seq=seq, heartbeat_at=timezone.now(), **fields
        )
        published = [realtime.Point(seq=p.seq, step=p.step, time=p.time, values=p.values) for p in points]
        transaction.on_commit(lambda: realtime.publish_points(run_id, published))


TREND_EVERY = 50  # metric points between re-assessments of the loss trend
POINT_CONTEXT = 5  # earlier points looked at with each batch (zero-grad streaks span batches)


def _updated_health(run: Run, new_points: list[MetricPoint], seq: int, ending: bool = False) -> list[dict]:
    """Point alerts (NaN, spikes, a run of zero grad norms) from the new points and the few before
    them, so a streak split across two batches still counts; trend alerts every TREND_EVERY points
    and when the run ends, from a strided view of the history (a bounded read, however long the run)."""
    from training.health import assess

    alerts = {a["code"]: a for a in run.health}
    before = reversed(
        MetricPoint.objects.filter(run=run).order_by("-seq").values_list("step", "values")[:POINT_CONTEXT]
    )
    recent = [{"step": s, "values": v} for s, v in before] + [{"step": p.step, "values": p.values} for p in new_points]
    for alert in assess(recent):
        if alert.code not in ("flat_loss", "collapse", "overfit"):
            alerts.setdefault(alert.code, alert.as_dict())
    if ending or seq // TREND_EVERY != run.next_seq // TREND_EVERY:
        stride = max(1, seq // 2000)
        history = MetricPoint.objects.filter(run=run).order_by("seq").values_list("seq", "step", "values")
        series = [{"step": s, "values": v} for q, s, v in history.iterator() if q % stride == 0]
        series += [{"step": p.step, "values": p.values} for p in new_points]
        trends = {a.code: a.as_dict() for a in assess(series) if a.code in ("flat_loss", "collapse", "overfit")}
        alerts = {k: v for k, v in alerts.items() if k not in ("flat_loss", "collapse", "overfit")} | trends
    return list(alerts.values())


def catch_up_events(run_id: int) -> None:
    """Record what a dead worker had not read yet from the run's events file (idempotent by offset)."""
    from training.events import read_events

    run = Run.objects.get(pk=run_id)
    events, offset = read_events(run.run_dir / "events.jsonl", run.events_offset)
    if events:
        record_events(run_id, [e for e in events if e.get("event") != "status"], offset)


def finish_run(run_id: int, state: str, message: str) -> bool:
    ok = transition(run_id, ACTIVE_STATES, state, message=message[:2000])
    if ok:
        log.info("run %s ended %s: %s", run_id, state, message)
    return ok


def zip_folder(folder: Path, target: Path, arcname: str) -> Path:
    """Zip a folder next to itself (written aside, then renamed: never a half zip)."""
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.part")  # two zips at once never collide
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, Path(arcname) / path.relative_to(folder))
    tmp.replace(target)
    return target


def package_artifacts(run: Run, kinds=("adapter", "model", "merged")) -> list[Artifact]:
    """Zip the adapter (or full model, or merged model) folder with its tokenizer, for download."""
    made = []
    for kind in kinds:
        folder = run.run_dir / kind
        if folder.is_dir():
            target = zip_folder(folder, run.run_dir / f"{kind}.zip", kind)
            made.append(Artifact.objects.create(run=run, kind=kind, path=target.name, size=target.stat().st_size))
    return made


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


class CannotMerge(ValueError):
    pass


def request_merge(run: Run) -> None:
    """Merge the adapter into the base model in a worker, as a downloadable artifact."""
    from webapp.runs.tasks import merge_adapter

    if not (run.run_dir / "adapter").is_dir():
        raise CannotMerge("only a finished LoRA/QLoRA run has an adapter to merge")
    if run.artifacts.filter(kind="merged").exists():
        raise CannotMerge("the merged model is already there")
    transaction.on_commit(lambda: merge_adapter(run.pk))


class NothingToTry(ValueError):
    pass


def playground_source(run: Run) -> Path:
    """What the playground loads: the final adapter (or model), else the latest checkpoint."""
    for name in ("adapter", "model"):
        if (run.run_dir / name).is_dir():
            return run.run_dir / name
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise NothingToTry("nothing to try yet: no adapter and no checkpoint (set save_steps to try during training)")
    return checkpoint


def ask_playground(run: Run, user, prompt: str):
    from webapp.runs.models import Generation
    from webapp.runs.tasks import answer_prompt

    prompt = prompt.strip()
    if not prompt:
        raise NothingToTry("type a prompt first")
    generation = Generation.objects.create(
        run=run, author=user, prompt=prompt[:4000], source=str(playground_source(run))
    )
    transaction.on_commit(lambda: answer_prompt(generation.pk))
    return generation


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


def bump_heartbeat(run_id: int) -> None:
    Run.objects.filter(pk=run_id).update(heartbeat_at=timezone.now())


def mark_stale_runs_interrupted(max_age_seconds: int | None = None, run_id: int | None = None) -> int:
    """Runs whose worker stopped beating (killed, host lost) end `interrupted`, logs and metrics kept."""
    age = settings.TRAINYARD_HEARTBEAT_TIMEOUT if max_age_seconds is None else max_age_seconds
    cutoff = timezone.now() - timezone.timedelta(seconds=age)
    stale = Run.objects.filter(status__in=[RunStatus.STARTING, RunStatus.RUNNING], heartbeat_at__lt=cutoff)
    if run_id is not None:
        stale = stale.filter(pk=run_id)
    count = 0
    for run_id in stale.values_list("pk", flat=True):
        catch_up_events(run_id)
        count += finish_run(
            run_id,
            RunStatus.INTERRUPTED,
            "the worker stopped reporting (killed or lost); logs, "
            "metrics and checkpoints up to then are kept: resume it",
        )
    return count
