"""Workspace privacy and roles: an isolation matrix over every route, API tokens, viewers, login limits."""

from __future__ import annotations

import re

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from webapp.datasets.models import Dataset, HubImport
from webapp.runs.models import Artifact, Generation, Run, TrainingConfig
from webapp.workspaces.models import ApiToken, Membership, Role
from webapp.workspaces.services import create_api_token, create_user_with_workspace

pytestmark = pytest.mark.django_db

# Routes that need no object, or that only ever act on the caller's own things.
OWN_ONLY = {
    "home",
    "login",
    "logout",
    "dataset-list",
    "dataset-hub-import",
    "config-list",
    "config-new",
    "run-list",
    "run-compare",
    "workspace-switch",
    "workspace-new",
    "tokens",
    "members",
    "admin-login",
}


def page_routes(resolver=None, prefix=""):
    for p in (resolver or get_resolver()).url_patterns:
        if isinstance(p, URLResolver):
            if str(p.pattern).startswith(("admin/", "api/")):
                continue
            yield from page_routes(p, prefix + str(p.pattern))
        elif isinstance(p, URLPattern):
            yield p.name, prefix + str(p.pattern)


@pytest.fixture
def alices_things(alice, alice_dataset):
    user, workspace = alice
    config = TrainingConfig.objects.create(workspace=workspace, name="c", yaml="base_model: tiny-chat\n")
    run = Run.objects.create(workspace=workspace, config=config, name="r", config_yaml="x", status="succeeded")
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "train.log").write_text("secret log\n")
    (run.run_dir / "adapter.zip").write_bytes(b"zip")
    artifact = Artifact.objects.create(run=run, kind="adapter", path="adapter.zip", size=3)
    generation = Generation.objects.create(run=run, prompt="p", source="x")
    hub_import = HubImport.objects.create(workspace=workspace, hub_id="org/data", status="failed", error="secret")
    return {
        "datasets": alice_dataset.pk,
        "configs": config.pk,
        "runs": run.pk,
        "artifact_id": artifact.pk,
        "generation_id": generation.pk,
        "dataset_id": alice_dataset.pk,
        "run_id": run.pk,
        "config_id": config.pk,
        "row": 0,
        "import_id": hub_import.pk,
    }


def fill(route: str, ids: dict) -> str:
    def value(match):
        name = match.group(2)
        if name == "pk":  # the object kind is the route's first segment
            return str(ids[route.split("/")[0]])
        return str(ids[name])

    return "/" + re.sub(r"<(int:)?(\w+)>", value, route)


def test_every_page_route_refuses_other_workspaces_and_anonymous_users(alices_things, bob_client):
    anonymous = Client()
    checked = 0
    for name, route in page_routes():
        if name in OWN_ONLY:
            continue
        assert "<" in route, f"route {name} takes no object: add it to OWN_ONLY if it only shows the caller's own"
        url = fill(route, alices_things)
        for method in ("get", "post"):
            status = getattr(bob_client, method)(url).status_code
            assert status in (403, 404, 405), f"{method.upper()} {url} gave {status} to another workspace"
            status = getattr(anonymous, method)(url).status_code
            assert status in (302, 403, 404, 405), f"{method.upper()} {url} gave {status} to an anonymous client"
            if status == 302:
                assert getattr(anonymous, method)(url)["Location"].startswith("/login/")
        checked += 1
    assert checked >= 15


def test_every_api_route_refuses_other_workspaces_and_anonymous_users(alices_things, bob, bob_client, alice_client):
    schema = alice_client.get("/api/openapi.json").json()
    _, bob_token = create_api_token(bob[0], bob[1], "t")
    anonymous = Client()
    checked = 0
    for path, operations in schema["paths"].items():
        url = re.sub(r"\{(\w+)\}", lambda m: str(alices_things[m.group(1)]), path)
        for method in operations:
            for client, headers in ((bob_client, {}), (Client(), {"HTTP_AUTHORIZATION": f"Bearer {bob_token}"})):
                if method in ("post", "put", "patch"):  # a well-formed body: only the workspace check can refuse
                    body = {"text": "x", "prompt": "x", "yaml": "x", "name": "x", "config_id": alices_things["configs"]}
                    response = getattr(client, method)(url, body, content_type="application/json", **headers)
                else:
                    response = getattr(client, method)(url, **headers)
                if "{" in path:
                    assert response.status_code in (403, 404, 405), f"{method} {url}: {response.status_code}"
                elif method == "get":  # a list: none of Alice's rows in it
                    resource = url.strip("/").split("/")[1]  # api/<resource>/
                    ids = [row["id"] for row in response.json()]
                    assert alices_things[resource] not in ids, f"{url} lists Alice's {resource}"
            assert getattr(anonymous, method)(url).status_code == 401, f"{method} {url} anonymous"
            checked += 1
    assert checked >= 6


def test_api_tokens_are_hashed_scoped_to_their_workspace_and_revocable(alice, alices_things):
    user, workspace = alice
    _, other_space = create_user_with_workspace("alice", "x", "Alice's side project")
    token, raw = create_api_token(user, workspace, "cli")
    assert raw.startswith("ty_") and raw not in str(ApiToken.objects.values_list()) and token.digest != raw
    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert [r["id"] for r in api.get("/api/runs/").json()] == [alices_things["runs"]]
    side = Run.objects.create(workspace=other_space, name="side", config_yaml="x")
    assert api.get(f"/api/runs/{side.pk}").status_code == 404  # same user, other workspace: not this token's
    assert Client(HTTP_AUTHORIZATION="Bearer ty_wrong").get("/api/runs/").status_code == 401
    page = Client()
    page.force_login(user)
    page.post("/settings/tokens/", {"revoke": token.pk})
    assert api.get("/api/runs/").status_code == 401


def test_tokens_page_shows_a_new_token_once(alice_client):
    page = alice_client.post("/settings/tokens/", {"name": "laptop"}).content.decode()
    raw = re.search(r"(ty_[\w-]+)", page).group(1)
    assert "laptop" in page
    assert raw not in alice_client.get("/settings/tokens/").content.decode()


def test_create_api_token_command(alice, capsys):
    call_command("create_api_token", "alice", "--workspace", "Alice's team")
    raw = capsys.readouterr().out.strip()
    assert Client(HTTP_AUTHORIZATION=f"Bearer {raw}").get("/api/runs/").status_code == 200


def test_viewers_read_but_cannot_upload_start_cancel_or_write(alice, alices_things, chat_file):
    viewer, _ = create_user_with_workspace("vera", "vera-password", "Vera's own")
    Membership.objects.create(user=viewer, workspace=alice[1], role=Role.VIEWER)
    client = Client()
    client.force_login(viewer)
    client.post("/workspaces/switch/", {"workspace": alice[1].pk})
    run = alices_things["runs"]
    assert client.get(f"/runs/{run}/").status_code == 200
    assert client.post("/datasets/", {"file": chat_file()}).status_code == 403
    assert client.post(f"/configs/{alices_things['configs']}/run/").status_code == 403
    assert client.post(f"/runs/{run}/cancel/").status_code == 403
    assert client.post(f"/runs/{run}/notes/", {"text": "hi"}).status_code == 403
    assert client.post("/api/datasets/", {"file": chat_file()}).status_code == 403
    assert Dataset.objects.filter(workspace=alice[1]).count() == 1


def test_switching_to_a_workspace_you_are_not_in_is_refused(alice_client, bob):
    assert alice_client.post("/workspaces/switch/", {"workspace": bob[1].pk}).status_code == 403


def test_login_is_rate_limited(db):
    import uuid

    name = f"user-{uuid.uuid4().hex[:8]}"  # the limit lives in a shared cache (Redis when configured)
    create_user_with_workspace(name, "right-password", f"{name}'s team")
    client = Client()
    for _ in range(10):
        assert client.post("/login/", {"username": name, "password": "wrong"}).status_code == 200
    blocked = client.post("/login/", {"username": name, "password": "right-password"})
    assert blocked.status_code == 429 and "Too many failed logins" in blocked.content.decode()


def test_owners_manage_members_and_a_workspace_keeps_an_owner(alice, alice_client, bob, bob_client):
    alice_client.post("/settings/members/", {"action": "add", "username": "bob", "role": "viewer"})
    membership = Membership.objects.get(user=bob[0], workspace=alice[1])
    assert membership.role == Role.VIEWER
    bob_client.post("/workspaces/switch/", {"workspace": alice[1].pk})
    assert bob_client.post("/settings/members/", {"action": "remove", "membership": membership.pk}).status_code == 403
    own = Membership.objects.get(user=alice[0], workspace=alice[1])
    page = alice_client.post("/settings/members/", {"action": "remove", "membership": own.pk}, follow=True)
    assert "keeps at least one owner" in page.content.decode() and Membership.objects.filter(pk=own.pk).exists()
    alice_client.post("/settings/members/", {"action": "remove", "membership": membership.pk})
    assert not Membership.objects.filter(pk=membership.pk).exists()


def test_site_settings_limit_uploads_gpus_and_remote_code(alice, alice_client, chat_file, settings):
    from webapp.runs import gpus
    from webapp.workspaces.models import SiteSettings

    site = SiteSettings.current()
    site.max_upload_mb, site.allowed_gpus = 1, "0,3"
    site.save()
    settings.TRAINYARD_GPUS = "0,1,2,3"
    assert [d.rsplit(":", 1)[1] for d in gpus.inventory()] == ["0", "3"]
    big = chat_file([CHAT_BIG] * 800)
    response = alice_client.post("/datasets/", {"file": big})
    assert response.status_code == 400 and "1,048,576-byte limit" in response.content.decode()
    yaml_text = "base_model: tiny-chat\ndatasets:\n  - path: chat\ntrust_remote_code: true\n"
    refused = alice_client.post("/api/configs/validate", {"yaml": yaml_text}, content_type="application/json")
    assert refused.status_code == 422 and refused.json()["errors"][0]["path"] == "trust_remote_code"
    site.allow_trust_remote_code = True
    site.save()
    allowed = alice_client.post("/api/configs/validate", {"yaml": yaml_text}, content_type="application/json")
    assert all(e["path"] != "trust_remote_code" for e in allowed.json().get("errors", []))


CHAT_BIG = {"messages": [{"role": "user", "content": "x" * 1000}, {"role": "assistant", "content": "y" * 1000}]}


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_every_websocket_route_refuses_other_workspaces_and_anonymous(alice, bob):
    from asgiref.sync import sync_to_async
    from channels.testing import WebsocketCommunicator
    from django.contrib.auth.models import AnonymousUser

    from webapp.runs.routing import websocket_urlpatterns

    run = await sync_to_async(Run.objects.create)(workspace=alice[1], name="r", config_yaml="x")
    ids = {"run_id": run.pk}
    for pattern in websocket_urlpatterns:
        kwargs = {name: ids[name] for name in pattern.pattern.converters}
        for user in (bob[0], AnonymousUser()):
            comm = WebsocketCommunicator(pattern.callback, "/ws/")
            comm.scope["user"], comm.scope["url_route"] = user, {"kwargs": kwargs}
            connected, code = await comm.connect()
            assert not connected and code == 4403, pattern


def test_security_headers_and_https_cookies(alice_client):
    import os
    import subprocess
    import sys

    response = alice_client.get("/runs/")
    assert response["X-Frame-Options"] == "DENY" and response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    assert "script-src 'self';" in response["Content-Security-Policy"]
    code = (
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='webapp.settings'; django.setup(); "
        "from django.conf import settings as s; "
        "print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_SSL_REDIRECT)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TRAINYARD_HTTPS": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["True", "True", "True"]


def test_admin_login_does_not_loop(alice):
    """/admin/ → login → /admin/ for an admin; a signed-in non-admin is told, not shown the login form again."""
    from django.contrib.auth.models import User

    User.objects.create_superuser("root", "root@example.com", "root-password")
    admin = Client()
    login = admin.get("/admin/", follow=True)
    assert login.request["PATH_INFO"] == "/login/"
    signed_in = admin.post(login.redirect_chain[-1][0], {"username": "root", "password": "root-password"}, follow=True)
    assert signed_in.request["PATH_INFO"] == "/admin/" and signed_in.status_code == 200
    member = Client()
    member.force_login(alice[0])
    refused = member.get("/admin/", follow=True)
    assert refused.status_code == 403 and "for administrators" in refused.content.decode()


def test_no_template_carries_inline_script_or_handlers():
    """The CSP forbids inline script: every page script is a file under static/js/."""
    from pathlib import Path

    root = Path(__file__).parents[2] / "templates"
    offenders = []
    for template in root.rglob("*.html"):
        text = template.read_text()
        for match in re.finditer(r"<script(?![^>]*\bsrc=)(?![^>]*type=\"application/json\")[^>]*>|\son[a-z]+=\"", text):
            offenders.append(f"{template.relative_to(root)}: {match.group(0)}")
    assert offenders == []


def test_a_user_in_no_workspace_is_told_so_and_can_start_one(client):
    import html

    from django.contrib.auth.models import User

    from webapp.workspaces.models import Membership

    loner = User.objects.create_user("loner", password="loner-password")
    client.force_login(loner)
    landed = client.get("/datasets/", follow=True)
    assert landed.request["PATH_INFO"] == "/workspaces/new/"
    assert "You are not in a workspace yet" in landed.content.decode()
    refused = client.post("/datasets/", {})  # a write without a workspace: told why, never "a viewer"
    assert refused.status_code == 302 and refused["Location"] == "/workspaces/new/"
    created = client.post("/workspaces/new/", {"name": "  Loner's   lab "}, follow=True)
    assert created.request["PATH_INFO"] == "/runs/" and "Loner's lab" in html.unescape(created.content.decode())
    assert Membership.objects.get(user=loner).role == "owner"
    again = client.post("/workspaces/new/", {"name": "loner's LAB"})
    assert again.status_code == 400 and "already exists" in again.content.decode()
