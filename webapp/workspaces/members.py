"""Owners add, re-role and remove members of their workspace."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect, render

from webapp.workspaces.models import Membership, Role
from webapp.workspaces.services import current_workspace, role_of


def members(request):
    workspace = current_workspace(request)
    is_owner = role_of(request.user, workspace) == Role.OWNER
    if request.method == "POST":
        if not is_owner:
            raise PermissionDenied("only owners manage members")
        action, role = request.POST.get("action"), request.POST.get("role", Role.MEMBER)
        if role not in Role.values:
            role = Role.MEMBER
        if action == "add":
            user = get_user_model().objects.filter(username=request.POST.get("username", "").strip()).first()
            if user is None:
                messages.error(request, "No user with that name (an admin creates accounts in /admin/).")
            else:
                Membership.objects.update_or_create(user=user, workspace=workspace, defaults={"role": role})
                messages.success(request, f"{user.username} is now {role} of {workspace.name}.")
        elif action in ("role", "remove"):
            membership = Membership.objects.filter(workspace=workspace, pk=request.POST.get("membership")).first()
            owners = Membership.objects.filter(workspace=workspace, role=Role.OWNER)
            if membership is None:
                messages.error(request, "No such member.")
            elif membership.role == Role.OWNER and owners.count() == 1 and (action == "remove" or role != Role.OWNER):
                messages.error(request, "A workspace keeps at least one owner.")
            elif action == "remove":
                membership.delete()
                messages.info(request, f"Removed {membership.user.username}.")
            else:
                Membership.objects.filter(pk=membership.pk).update(role=role)
        return redirect("members")
    return render(
        request,
        "members.html",
        {
            "memberships": Membership.objects.filter(workspace=workspace)
            .select_related("user")
            .order_by("user__username"),
            "is_owner": is_owner,
            "roles": Role.values,
        },
    )
