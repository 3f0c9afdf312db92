"""Use cases for workspaces and members."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.db import transaction

from webapp.workspaces.models import Membership, Role, Workspace


def current_workspace(request) -> Workspace | None:
    """The workspace the user works in now: the one chosen this session, else their first."""
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
