"""Template context: the current workspace, for the header."""

from webapp.workspaces.services import current_workspace


def workspace(request):
    return {"workspace": current_workspace(request) if hasattr(request, "user") else None}
