"""What an API caller may see: their workspaces (session), or only the token's workspace (bearer)."""


def visible(request, queryset):
    rows = queryset.visible_to(request.user)
    workspace = getattr(request, "api_workspace", None)
    return rows.filter(workspace=workspace) if workspace is not None else rows
