"""Every page needs a login, and a workspace to act in; the API answers 401 itself (session or bearer
token) instead of redirecting."""

from django.contrib.auth.middleware import LoginRequiredMiddleware
from django.shortcuts import redirect

from webapp.workspaces.models import Membership

# Pages a signed-in user without any workspace can still use.
NO_WORKSPACE_NEEDED = ("/workspaces/new/", "/logout/", "/login/", "/admin/", "/static/")


class PagesNeedLoginMiddleware(LoginRequiredMiddleware):
    def process_view(self, request, view_func, view_args, view_kwargs):
        if request.path_info.startswith("/api/"):
            return None
        refused = super().process_view(request, view_func, view_args, view_kwargs)
        if refused is not None:
            return refused
        if (
            request.user.is_authenticated
            and not request.path_info.startswith(NO_WORKSPACE_NEEDED)
            and not Membership.objects.filter(user=request.user).exists()
        ):
            return redirect("workspace-new")
        return None
