"""Workspaces own everything; `visible_to(user)` is the one privacy rule every query goes through."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class WorkspaceQuerySet(models.QuerySet):
    def visible_to(self, user) -> WorkspaceQuerySet:
        if not user.is_authenticated:
            return self.none()
        return self.filter(memberships__user=user)


class Workspace(models.Model):
    name = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = WorkspaceQuerySet.as_manager()

    def __str__(self) -> str:
        return self.name


class Role(models.TextChoices):
    OWNER = "owner"
    MEMBER = "member"
    VIEWER = "viewer"


class Membership(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "workspace"], name="one_membership_per_workspace")]


class OwnedQuerySet(models.QuerySet):
    """For models with a `workspace` field: rows of the workspaces the user belongs to."""

    def visible_to(self, user):
        if not user.is_authenticated:
            return self.none()
        return self.filter(workspace__memberships__user=user)


class ApiToken(models.Model):
    """A bearer token for the API and the CLI. Only its sha256 is stored; the token is shown once."""

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="tokens")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, help_text="the token's first characters, to tell tokens apart")
    digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = OwnedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]


class SiteSettings(models.Model):
    """Server-wide settings an admin edits in /admin/ (one row). Empty values fall back to the environment."""

    allowed_gpus = models.CharField(
        max_length=200,
        blank=True,
        help_text='GPU ids runs may use on each host, e.g. "0,1"; empty: TRAINYARD_GPUS or all',
    )
    max_upload_mb = models.PositiveIntegerField(
        null=True, blank=True, help_text="largest dataset upload; empty: TRAINYARD_MAX_UPLOAD_BYTES"
    )
    allow_trust_remote_code = models.BooleanField(
        default=False, help_text="let configs run code shipped with a model (trust_remote_code: true)"
    )

    class Meta:
        verbose_name = verbose_name_plural = "site settings"

    def __str__(self) -> str:
        return "Site settings"

    @classmethod
    def current(cls) -> SiteSettings:
        return cls.objects.get_or_create(pk=1)[0]
