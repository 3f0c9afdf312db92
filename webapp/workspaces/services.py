"""Use cases for workspaces and members."""

from __future__ import annotations

import hashlib
import secrets

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from webapp.http import download_name
from webapp.workspaces.models import ApiToken, Membership, Role, Workspace


def current_workspace(request) -> Workspace | None:
    """The workspace the user works in now: the token's (API), the one chosen this session, else their first."""
    if getattr(request, "api_workspace", None) is not None:
        return request.api_workspace
    user = request.user
    if not user.is_authenticated:
        return None
    visible = Workspace.objects.visible_to(user).order_by("id")
    chosen = request.session.get("workspace_id")
    return (visible.filter(id=chosen).first() if chosen else None) or visible.first()


@transaction.atomic
def create_user_with_workspace(username: str, password: str, workspace_name: str, role: str = Role.OWNER):
    """A user and (if new) a workspace they belong to; returns (user, workspace). Idempotent."""
    User = get_user_model()
    user, created = User.objects.get_or_create(username=username)
    if created or not user.has_usable_password():
        user.set_password(password)
        user.save()
    workspace, _ = Workspace.objects.get_or_create(name=workspace_name)
    Membership.objects.get_or_create(user=user, workspace=workspace, defaults={"role": role})
    return user, workspace


class WorkspaceNameTaken(ValueError):
    pass


@transaction.atomic
def create_workspace(user, name: str) -> Workspace:
    """A new workspace owned by `user` (anyone signed in may start one)."""
    name = " ".join(name.split())
    if not name or len(name) > 100:
        raise ValueError("give the workspace a name of 1 to 100 characters")
    if Workspace.objects.filter(name__iexact=name).exists():
        raise WorkspaceNameTaken(f"a workspace named “{name}” already exists; pick another name")
    workspace = Workspace.objects.create(name=name)
    Membership.objects.create(user=user, workspace=workspace, role=Role.OWNER)
    return workspace


def role_of(user, workspace) -> str | None:
    if not user.is_authenticated or workspace is None:
        return None
    return Membership.objects.filter(user=user, workspace=workspace).values_list("role", flat=True).first()


def can_write(user, workspace) -> bool:
    return role_of(user, workspace) in (Role.OWNER, Role.MEMBER)


def require_writer(user, workspace) -> None:
    """Viewers read; uploading, starting, cancelling, writing notes need member or owner."""
    if workspace is None:
        raise PermissionDenied("you are not in any workspace yet: create one, or ask a workspace owner to add you")
    if role_of(user, workspace) not in (Role.OWNER, Role.MEMBER):
        raise PermissionDenied("viewers of this workspace can read but not change anything")


def switch_workspace(request, workspace_id: int) -> Workspace:
    workspace = Workspace.objects.visible_to(request.user).filter(pk=workspace_id).first()
    if workspace is None:
        raise PermissionDenied("not a member of that workspace")
    request.session["workspace_id"] = workspace.pk
    return workspace


def _digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_api_token(user, workspace, name: str) -> tuple[ApiToken, str]:
    """A new token; the raw value is returned once and never stored."""
    if role_of(user, workspace) is None:
        raise PermissionDenied("not a member of that workspace")
    raw = "ty_" + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        workspace=workspace,
        user=user,
        name=download_name(name.strip())[:100] if name.strip() else "token",
        prefix=raw[:10],
        digest=_digest(raw),
    )
    return token, raw


def token_owner(raw: str) -> ApiToken | None:
    token = ApiToken.objects.select_related("user", "workspace").filter(digest=_digest(raw), revoked_at=None).first()
    if token is None or not token.user.is_active or role_of(token.user, token.workspace) is None:
        return None
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    return token


def revoke_api_token(user, token_id: int) -> bool:
    return ApiToken.objects.filter(pk=token_id, user=user, revoked_at=None).update(revoked_at=timezone.now()) == 1
