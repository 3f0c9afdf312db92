"""Template context: the current workspace and the others the user may switch to, for the header."""

from webapp.workspaces.models import Workspace
from webapp.workspaces.services import current_workspace


def workspace(request):
    if not hasattr(request, "user") or not request.user.is_authenticated:
        return {"workspace": None, "my_workspaces": []}
    return {"workspace": current_workspace(request), "my_workspaces": Workspace.objects.visible_to(request.user)}
