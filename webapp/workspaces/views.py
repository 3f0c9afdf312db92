"""Workspace switching and API tokens (created and revoked in the UI, shown once)."""

from __future__ import annotations

from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.views import LoginView
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from webapp.http import parse_id, safe_next
from webapp.workspaces import services
from webapp.workspaces.models import ApiToken, Workspace


@require_POST
def switch(request):
    workspace = services.switch_workspace(request, parse_id(request.POST.get("workspace", "")) or 0)
    messages.info(request, f"Now working in “{workspace.name}”.")
    return redirect(safe_next(request, request.POST.get("next"), "/"))


def tokens(request):
    workspace = services.current_workspace(request)
    created = None
    if request.method == "POST":
        if request.POST.get("revoke"):
            services.revoke_api_token(request.user, parse_id(request.POST["revoke"]) or 0)
            messages.info(request, "Token revoked.")
            return redirect("tokens")
        token, created = services.create_api_token(request.user, workspace, request.POST.get("name", ""))
    return render(
        request,
        "tokens.html",
        {
            "tokens": ApiToken.objects.filter(user=request.user),
            "created": created,
            "workspace": workspace,
            "workspaces": Workspace.objects.visible_to(request.user),
        },
    )


@login_not_required  # the login page itself: the middleware would send it back to /login/ with itself as next
@require_http_methods(["GET", "POST"])
def workspace_new(request):
    """Start a workspace (you own it). A user in no workspace lands here, told why."""
    error = None
    if request.method == "POST":
        try:
            workspace = services.create_workspace(request.user, request.POST.get("name", ""))
        except ValueError as exc:
            error = str(exc)
        else:
            request.session["workspace_id"] = workspace.pk
            messages.success(request, f"Workspace “{workspace.name}” created: you are its owner.")
            return redirect("home")
    has_one = Workspace.objects.visible_to(request.user).exists()
    return render(
        request,
        "workspace_new.html",
        {"error": error, "has_one": has_one, "name": request.POST.get("name", "")},
        status=400 if error else 200,
    )


def admin_login(request):
    target = safe_next(request, request.GET.get("next"), "/admin/")
    if request.user.is_authenticated:
        if request.user.is_staff:
            return redirect(target)
        # Signed in but not an admin: sending them to the login form again would loop.
        raise PermissionDenied("The admin site is for administrators; your account isn't one.")
    return redirect(f"{reverse('login')}?{urlencode({'next': target})}")


class RateLimitedLoginView(LoginView):
    """Django's login, refusing a user name after 10 failed tries from one address in 5 minutes."""

    template_name = "login.html"
    max_failures, window_seconds = 10, 300

    def _key(self) -> str:
        username = self.request.POST.get("username", "").strip().lower()
        return f"login-failures:{self.request.META.get('REMOTE_ADDR', '')}:{username}"

    def post(self, request, *args, **kwargs):
        if cache.get(self._key(), 0) >= self.max_failures:
            form = self.get_form()
            form.add_error(None, "Too many failed logins: wait a few minutes and try again.")
            return self.render_to_response(self.get_context_data(form=form), status=429)
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        key = self._key()
        cache.set(key, cache.get(key, 0) + 1, self.window_seconds)
        return super().form_invalid(form)
