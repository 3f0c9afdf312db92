"""An uploaded dataset: an immutable, content-addressed JSONL file plus what we learned reading it."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import models

from webapp.workspaces.models import OwnedQuerySet, Workspace


def dataset_dir() -> Path:
    path = settings.DATA_DIR / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Dataset(models.Model):
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=200, help_text="what configs call it in `datasets: - path:`")
    original_filename = models.CharField(max_length=255, blank=True)
    sha256 = models.CharField(max_length=64)
    size = models.BigIntegerField()
    format = models.CharField(max_length=32)
    format_options = models.JSONField(
        default=dict, blank=True, help_text="dataset options its rows need, e.g. ShareGPT's field_messages"
    )
    rows = models.IntegerField()
    rejected_rows = models.IntegerField(default=0, help_text="lines dropped at upload (keep valid rows)")
    images = models.IntegerField(default=0, help_text="images stored in the rows (image + text rows)")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["workspace", "name"], name="dataset_name_unique_in_workspace"),
            models.UniqueConstraint(fields=["workspace", "sha256"], name="dataset_content_unique_in_workspace"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def path(self) -> Path:
        return dataset_dir() / f"{self.sha256}.jsonl"

    @property
    def index_path(self) -> Path:
        return dataset_dir() / f"{self.sha256}.idx"

    @property
    def rejected_path(self) -> Path:
        # Per dataset, never per content: two workspaces' uploads can share clean content (and its
        # file) while their rejected lines differ.
        return dataset_dir() / "rejected" / f"{self.pk}.jsonl"


class DatasetStats(models.Model):
    """Token statistics of a dataset under one tokenizer and option set, computed once by a worker."""

    class Status(models.TextChoices):
        """pending -> running -> done | failed (failed ones are recomputed when asked again)."""

        PENDING = "pending"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="stats")
    key = models.CharField(max_length=64, help_text="hash of the model and options")
    options = models.JSONField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    rows_done = models.IntegerField(default=0)
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["dataset", "key"], name="stats_unique_per_options")]


class HubImport(models.Model):
    """A Hub dataset being copied into an ordinary (immutable, content-addressed) Dataset by a worker."""

    class Status(models.TextChoices):
        """pending -> running -> done | failed (a failed import is asked again as a new one)."""

        PENDING = "pending"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="hub_imports")
    hub_id = models.CharField(max_length=200)
    config_name = models.CharField(max_length=200, blank=True, help_text="the dataset's configuration (subset)")
    split = models.CharField(max_length=200, default="train")
    name = models.CharField(max_length=200, blank=True, help_text="the dataset's name here (default: from the id)")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    rows_done = models.IntegerField(default=0)
    rows_total = models.IntegerField(null=True, blank=True, help_text="known once the split is loaded")
    dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = OwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
