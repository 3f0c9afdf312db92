"""Template context: the current workspace, the others the user may switch to, and whether the user
may change things in it (viewers get no write buttons; the views refuse them anyway)."""

from webapp.workspaces.models import Workspace
from webapp.workspaces.services import can_write, current_workspace


def workspace(request):
    if not hasattr(request, "user") or not request.user.is_authenticated:
        return {"workspace": None, "my_workspaces": [], "can_write": False}
    current = current_workspace(request)
    return {
        "workspace": current,
        "my_workspaces": Workspace.objects.visible_to(request.user),
        "can_write": can_write(request.user, current),
    }
