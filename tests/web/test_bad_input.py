"""A user's mistake gets a message or a 404, never a 500: malformed ids, names that would break a
header, out-of-range numbers, stale credentials. Also: no open redirect, no unlimited login form."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from django.test import Client

from tests.helpers import GOOD
from webapp.runs.models import Run, TrainingConfig
from webapp.workspaces.services import create_api_token

pytestmark = pytest.mark.django_db

ODD = ["abc", "²", "-1", "1e3", "9" * 30, "", "1;drop"]


@pytest.fixture
def things(alice, alice_dataset):
    config = TrainingConfig.objects.create(workspace=alice[1], name="c", yaml=GOOD.format(steps=5))
    run = Run.objects.create(workspace=alice[1], config=config, name="r", config_yaml="x", status="succeeded")
    shutil.rmtree(run.run_dir, ignore_errors=True)  # ids are reused across tests: so are run folders
    return config, run


@pytest.mark.parametrize("odd", ODD)
def test_odd_ids_in_queries_and_forms_never_answer_500(alice_client, things, odd):
    config, run = things
    for url in (
        f"/runs/compare/?ids={odd}",
        f"/configs/new/?from_run={odd}",
        f"/runs/{run.pk}/?diff={odd}",
        f"/datasets/{config.workspace.datasets.first().pk}/preview/?config={odd}",
    ):
        assert alice_client.get(url).status_code == 200, url
    assert alice_client.post("/workspaces/switch/", {"workspace": odd}).status_code == 403
    assert alice_client.post("/settings/tokens/", {"revoke": odd}).status_code == (302 if odd else 200)


def test_switch_never_redirects_off_site(alice_client, alice):
    response = alice_client.post("/workspaces/switch/", {"workspace": alice[1].pk, "next": "https://evil.example/"})
    assert response.status_code == 302 and response["Location"] == "/"
    response = alice_client.post("/workspaces/switch/", {"workspace": alice[1].pk, "next": "/runs/"})
    assert response["Location"] == "/runs/"


@pytest.fixture
def api(alice):
    _, raw = create_api_token(alice[0], alice[1], "test")
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


def test_a_name_that_would_break_a_header_is_refused_and_old_ones_still_export(api, alice_client, things):
    bad = api.post("/api/configs/", {"name": "a\nb", "yaml": GOOD.format(steps=5)}, content_type="application/json")
    assert bad.status_code in (400, 422) and "line breaks" in bad.json()["message"] + str(bad.json())
    long = api.post("/api/configs/", {"name": "x" * 300, "yaml": GOOD.format(steps=5)}, content_type="application/json")
    assert long.status_code in (400, 422)
    config, _ = things
    TrainingConfig.objects.filter(pk=config.pk).update(name='made\r\nbefore "checks"')
    for response in (
        api.get(f"/api/configs/{config.pk}/export"),
        alice_client.get(f"/configs/{config.pk}/export.yaml"),
    ):
        assert response.status_code == 200
        assert "\n" not in response["Content-Disposition"] and "\r" not in response["Content-Disposition"]


def test_api_errors_are_json_with_a_message_and_the_field_path(api, things):
    config, _ = things
    out_of_range = api.post("/api/runs/", {"config_id": config.pk, "priority": 99999}, content_type="application/json")
    assert out_of_range.status_code == 422
    body = out_of_range.json()
    assert "priority" in body["message"] and body["errors"][0]["path"] == "body.priority"
    missing = api.post("/api/runs/", {}, content_type="application/json")
    assert missing.status_code == 422 and missing.json()["errors"][0]["path"] == "body.config_id"
    assert api.get("/api/runs/999999").json() == {"message": "not found (or not in your workspace)"}
    anonymous = Client().get("/api/runs/")
    assert anonymous.status_code == 401 and "Bearer" in anonymous.json()["message"]


def test_a_deactivated_users_tokens_stop_working(alice, api):
    assert api.get("/api/runs/").status_code == 200
    alice[0].is_active = False
    alice[0].save()
    assert api.get("/api/runs/").status_code == 401


def test_the_admin_signs_in_through_the_rate_limited_login(db):
    response = Client().get("/admin/login/?next=/admin/runs/")
    assert response.status_code == 302 and response["Location"].startswith("/login/?next=")
    posted = Client().post("/admin/login/", {"username": "admin", "password": "guess"})
    assert posted.status_code == 302  # no password is ever checked there


@pytest.mark.django_db(transaction=True)
def test_pages_opening_at_once_share_one_tail(alice, things):
    from webapp.runs.tail import RunTail

    _, run = things

    async def open_and_close():
        queues = await asyncio.gather(*(RunTail.subscribe(run.pk) for _ in range(5)))
        assert len(RunTail.tails) == 1 and len(RunTail.tails[run.pk].queues) == 5
        tasks = list(RunTail.tails[run.pk].tasks)
        for queue in queues:
            RunTail.unsubscribe(run.pk, queue)
        await asyncio.wait(tasks, timeout=10)  # with Redis, leaving the group takes a round trip
        assert not RunTail.tails and all(t.done() for t in tasks)

    asyncio.run(open_and_close())


@pytest.mark.django_db(transaction=True)
def test_a_malformed_websocket_query_still_connects(alice, things):
    from channels.testing import WebsocketCommunicator

    from webapp.runs.consumers import RunConsumer

    _, run = things

    async def connect():
        comm = WebsocketCommunicator(RunConsumer.as_asgi(), f"/ws/runs/{run.pk}/?after=abc&log=xyz")
        comm.scope["user"] = alice[0]
        comm.scope["url_route"] = {"kwargs": {"run_id": run.pk}}
        connected, _ = await comm.connect()
        first = await comm.receive_json_from(timeout=5)
        await comm.disconnect()
        return connected, first

    connected, first = asyncio.run(connect())
    assert connected and first["type"] == "points"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just words\n", "42\n"])
def test_the_form_on_yaml_that_is_not_a_mapping_says_so(alice_client, alice_dataset, text):
    response = alice_client.post("/configs/new/", {"name": "x", "yaml": text, "action": "apply_form"})
    assert response.status_code in (200, 400) and "must be a mapping" in response.content.decode()


def test_a_run_is_resumed_once(alice, things):
    from webapp.runs import services

    _, run = things
    Run.objects.filter(pk=run.pk).update(status="interrupted")
    run.refresh_from_db()
    checkpoint = run.run_dir / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (run.run_dir / "config.yaml").write_text("x: 1\n")
    services.resume_run(run, alice[0])
    with pytest.raises(services.CannotResume, match="already resumed"):
        services.resume_run(run, alice[0])
    assert run.resumes.count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path, kind", [("/api/datasets/", b"application/json"), ("/datasets/", b"text/html")])
def test_an_oversized_upload_is_refused_before_its_body_is_read(settings, path, kind):
    from webapp.upload_limit import UploadSizeLimit

    settings.TRAINYARD_MAX_UPLOAD_BYTES = 10 * 2**20
    reached, sent = [], []

    async def django(scope, receive, send):
        reached.append(scope["path"])

    async def receive():
        raise AssertionError("the body was read")

    async def send(message):
        sent.append(message)

    app = UploadSizeLimit(django)
    big = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", b"50000000000")]}
    asyncio.run(app(big, receive, send))
    assert not reached and sent[0]["status"] == 413 and dict(sent[0]["headers"])[b"content-type"].startswith(kind)
    assert b"upload limit" in sent[1]["body"]
    small = {**big, "headers": [(b"content-length", b"1000")]}
    asyncio.run(app(small, receive, send))
    assert reached == [path]


def test_the_api_does_what_the_pages_do(api, alice, alice_dataset, things, django_capture_on_commit_callbacks):
    _, run = things
    assert api.get(f"/api/datasets/{alice_dataset.pk}/rows/1").json()["messages"]
    assert api.get(f"/api/datasets/{alice_dataset.pk}/rows/999999").status_code == 400
    assert api.get(f"/api/datasets/{alice_dataset.pk}/rejected").status_code == 404  # nothing was refused
    with django_capture_on_commit_callbacks(execute=True):
        asked = api.post(f"/api/datasets/{alice_dataset.pk}/stats?sequence_len=64")
    assert asked.status_code == 200 and asked.json()["rows"] == alice_dataset.rows
    done = api.post(f"/api/datasets/{alice_dataset.pk}/stats?sequence_len=64").json()
    assert done["status"] == "done" and done["result"]["tokens"] > 0 and "dropped" in done["result"]
    note = api.post(f"/api/runs/{run.pk}/notes", {"text": "lr too high?"}, content_type="application/json")
    assert note.status_code == 201
    assert [n["text"] for n in api.get(f"/api/runs/{run.pk}/notes").json()] == ["lr too high?"]
    assert api.post(f"/api/runs/{run.pk}/merge").status_code == 409  # no adapter in this run
    nothing = api.post(f"/api/runs/{run.pk}/playground", {"prompt": "hi"}, content_type="application/json")
    assert nothing.status_code == 400 and "nothing to try yet" in nothing.json()["message"]  # no adapter yet
    (run.run_dir / "adapter").mkdir(parents=True, exist_ok=True)
    asked = api.post(f"/api/runs/{run.pk}/playground", {"prompt": "hi"}, content_type="application/json")
    assert asked.status_code == 202 and asked.json()["status"] == "pending"
    assert api.get(f"/api/runs/{run.pk}/playground/{asked.json()['id']}").json()["prompt"] == "hi"
