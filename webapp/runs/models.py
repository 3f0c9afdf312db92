"""Training configs, runs (a state machine), their metric points and artifacts."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import models

from webapp.workspaces.models import OwnedQuerySet, Workspace


class TrainingConfig(models.Model):
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="configs")
    name = models.CharField(max_length=200)
    yaml = models.TextField()
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = OwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-updated_at"]
        constraints = [models.UniqueConstraint(fields=["workspace", "name"], name="config_name_unique_in_workspace")]

    def __str__(self) -> str:
        return self.name


class RunStatus(models.TextChoices):
    """Allowed transitions, made only by `webapp.runs.lifecycle` with conditional UPDATEs:

    queued -> starting | cancelled
    starting -> running | failed | cancelled | interrupted
    running -> succeeded | failed | cancelled | interrupted
    """

    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


class MergeState(models.TextChoices):
    """The merge of a run's adapter into its base model (a worker task, on request): blank when none
    was asked for or it ended well (the merged model is then an artifact), else

    queued -> merging -> failed (with merge_error; asking again starts over) | blank
    A worker that dies while merging leaves `merging`: the reaper marks it failed (reaper.py)."""

    NONE = "", "none"
    QUEUED = "queued"
    MERGING = "merging"
    FAILED = "failed"


MERGE_UNDER_WAY = (MergeState.QUEUED, MergeState.MERGING)
ACTIVE_STATES = (RunStatus.QUEUED, RunStatus.STARTING, RunStatus.RUNNING)
FINAL_STATES = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.INTERRUPTED)


class Run(models.Model):
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="runs")
    config = models.ForeignKey(TrainingConfig, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs")
    name = models.CharField(max_length=200)
    config_yaml = models.TextField(help_text="the config as the user wrote it, frozen at enqueue time")
    status = models.CharField(max_length=12, choices=RunStatus.choices, default=RunStatus.QUEUED, db_index=True)
    message = models.TextField(blank=True, help_text="one line: why it failed, or how it ended")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    current_step = models.IntegerField(default=0)
    total_steps = models.IntegerField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)
    events_offset = models.BigIntegerField(default=0, help_text="bytes of events.jsonl already turned into rows")
    next_seq = models.IntegerField(default=0)
    data_summary = models.JSONField(default=dict, blank=True)
    gpus = models.PositiveSmallIntegerField(default=1, help_text="devices the run needs")
    priority = models.SmallIntegerField(default=0, help_text="higher runs first")
    devices = models.JSONField(default=list, blank=True, help_text="devices it ran on")
    attempt = models.PositiveSmallIntegerField(default=1)
    resumed_from = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="resumes")
    resume_checkpoint = models.CharField(max_length=500, blank=True, help_text="checkpoint folder it starts from")
    health = models.JSONField(default=list, blank=True, help_text="alerts from training.health, kept by the worker")
    # Fencing (webapp/runs/processes.py, reaper.py): the worker that holds the run writes only while
    # `holder` still names it; the reaper stops `trainer` before the run's devices are freed.
    holder = models.CharField(max_length=300, blank=True, help_text="the worker process supervising it")
    trainer = models.CharField(max_length=300, blank=True, help_text="its training process")
    outcome = models.JSONField(
        default=dict, blank=True, help_text="the trainer's own final status event, once recorded"
    )

    merge_state = models.CharField(max_length=10, choices=MergeState.choices, default=MergeState.NONE, blank=True)
    merge_error = models.TextField(blank=True, help_text="why the last merge failed")
    merge_holder = models.CharField(max_length=300, blank=True, help_text="the worker process merging it")

    objects = OwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.status})"

    @property
    def run_dir(self) -> Path:
        return settings.DATA_DIR / "runs" / str(self.pk)

    @property
    def log_path(self) -> Path:
        return self.run_dir / "train.log"

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATES


class DeviceLease(models.Model):
    """A device held by a run. The unique device column is the lock, across workers and hosts."""

    device = models.CharField(max_length=200, unique=True)  # "host:cuda:0", or "host:cpu" without GPUs
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="leases")
    acquired_at = models.DateTimeField(auto_now_add=True)


class MetricPoint(models.Model):
    """One `metric` event: a step's values (loss, learning_rate, ...). `seq` orders events of a run;
    `offset` is where the event's line starts in the run's events.jsonl, so an event is stored once
    however often it is read (null for points a resumed attempt copied from its parent)."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="points")
    seq = models.IntegerField()
    step = models.IntegerField()
    time = models.FloatField()
    values = models.JSONField()
    offset = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["seq"]
        constraints = [
            models.UniqueConstraint(fields=["run", "seq"], name="metric_seq_unique_in_run"),
            models.UniqueConstraint(fields=["run", "offset"], name="metric_event_recorded_once"),
        ]


class Artifact(models.Model):
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="artifacts")
    kind = models.CharField(max_length=20)  # adapter | model | checkpoint
    path = models.CharField(max_length=500, help_text="relative to the run directory")
    size = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]


class RunNote(models.Model):
    """Markdown notes by workspace members on a run's page."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="notes")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    text = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]

    @property
    def html(self) -> str:
        import markdown
        import nh3

        # Markdown from users is rendered, then sanitized: no script, no inline handlers.
        return nh3.clean(markdown.markdown(self.text, extensions=["fenced_code", "tables"]))


class Generation(models.Model):
    """A playground prompt, answered by a worker with the base model and with base + adapter."""

    class Status(models.TextChoices):
        """pending -> done | failed"""

        PENDING = "pending"
        DONE = "done"
        FAILED = "failed"

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="generations")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    prompt = models.TextField()
    source = models.CharField(max_length=500, blank=True, help_text="adapter or checkpoint folder used")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    base_text = models.TextField(blank=True)
    tuned_text = models.TextField(blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def payload(self) -> dict:
        """What the page's script and the API both answer for this generation (the folder's name, not its path)."""
        from pathlib import PurePath

        return {
            "id": self.pk,
            "status": self.status,
            "prompt": self.prompt,
            "base": self.base_text,
            "tuned": self.tuned_text,
            "error": self.error,
            "source": PurePath(self.source).name,
        }
