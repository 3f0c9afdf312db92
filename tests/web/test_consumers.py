"""The run websocket: refused outside the workspace, history then live points, resume without gap or duplicate."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser

from webapp.runs.consumers import RunConsumer
from webapp.runs.models import MetricPoint, Run, RunStatus

# A hang here is a task that outlived its cancel (the bug these tests guard against): fail in 2 minutes, not 10.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio, pytest.mark.timeout(120)]


def communicator(user, run_id, query=""):
    app = RunConsumer.as_asgi()
    comm = WebsocketCommunicator(app, f"/ws/runs/{run_id}/{query}")
    comm.scope["user"] = user
    comm.scope["url_route"] = {"kwargs": {"run_id": run_id}}
    return comm


@sync_to_async
def make_run(workspace, points=3, status=RunStatus.RUNNING):
    run = Run.objects.create(workspace=workspace, name="r", config_yaml="x", status=status)
    add_points(run, 0, points)
    return run


def add_points(run, start, count):
    MetricPoint.objects.bulk_create(
        [
            MetricPoint(run=run, seq=i, step=i + 1, time=float(i), values={"loss": 5.0 - i / 10})
            for i in range(start, start + count)
        ]
    )


async def receive_until(comm, kind):
    while True:
        msg = await comm.receive_json_from(timeout=5)
        if msg["type"] == kind:
            return msg


async def test_user_outside_the_workspace_and_anonymous_are_refused(alice, bob):
    run = await make_run(alice[1])
    for user in (bob[0], AnonymousUser()):
        comm = communicator(user, run.pk)
        connected, code = await comm.connect()
        assert not connected and code == 4403


async def test_history_then_live_points_then_final_status(alice):
    run = await make_run(alice[1], points=3)
    comm = communicator(alice[0], run.pk)
    assert (await comm.connect())[0]
    history = await receive_until(comm, "points")
    assert history["history"] and [p["seq"] for p in history["points"]] == [0, 1, 2]
    await sync_to_async(add_points)(run, 3, 2)
    live = await receive_until(comm, "points")
    assert not live["history"] and [p["seq"] for p in live["points"]] == [3, 4]
    await sync_to_async(Run.objects.filter(pk=run.pk).update)(status=RunStatus.SUCCEEDED, message="done")
    status = await receive_until(comm, "status")
    while not status["final"]:
        status = await receive_until(comm, "status")
    assert status["status"] == "succeeded"
    await comm.disconnect()


async def test_the_final_status_comes_after_every_point(alice, monkeypatch):
    """A run that writes its last points and ends between two polls of a slow tail: the page still
    has the whole chart when it reads the final status."""
    from webapp.runs import tail

    monkeypatch.setattr(tail, "tail_seconds", lambda: 60.0)
    run = await make_run(alice[1], points=3)
    comm = communicator(alice[0], run.pk)
    assert (await comm.connect())[0]
    await receive_until(comm, "points")
    await sync_to_async(add_points)(run, 3, 30)
    await sync_to_async(Run.objects.filter(pk=run.pk).update)(status=RunStatus.SUCCEEDED)
    seqs = []
    while True:
        msg = await comm.receive_json_from(timeout=5)
        if msg["type"] == "points":
            seqs += [p["seq"] for p in msg["points"]]
        elif msg["type"] == "status" and msg["final"]:
            break
    assert seqs == list(range(3, 33))
    await comm.disconnect()


async def test_reconnect_resumes_after_the_last_seq_without_gap_or_duplicate(alice):
    run = await make_run(alice[1], points=5)
    comm = communicator(alice[0], run.pk, "?after=2")
    assert (await comm.connect())[0]
    history = await receive_until(comm, "points")
    assert [p["seq"] for p in history["points"]] == [3, 4]
    await comm.disconnect()


async def test_log_is_streamed_from_the_offset_the_page_has(alice):
    run = await make_run(alice[1], points=0)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run.log_path.write_text("first line\nsecond line\n")
    first = len("first line\n")
    comm = communicator(alice[0], run.pk, f"?log={first}")
    assert (await comm.connect())[0]
    log = await receive_until(comm, "log")
    assert log["text"] == "second line\n" and log["offset"] == len("first line\nsecond line\n")
    await comm.disconnect()


async def test_with_redis_points_arrive_through_the_channel_layer(alice, settings, monkeypatch):
    import os
    import uuid

    from tests.conftest import require_service
    from webapp.runs import realtime, tail

    url = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/15")
    require_service(url, "Redis")
    settings.REDIS_URL = url
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [url], "prefix": uuid.uuid4().hex[:8]},
        }
    }
    monkeypatch.setattr(tail, "tail_seconds", lambda: 60.0)  # only the publish can deliver in time
    run = await make_run(alice[1], points=2)
    comm = communicator(alice[0], run.pk)
    assert (await comm.connect())[0]
    history = await receive_until(comm, "points")
    assert [p["seq"] for p in history["points"]] == [0, 1]
    await sync_to_async(realtime.publish_points)(run.pk, [{"seq": 2, "step": 3, "time": 1.0, "values": {"loss": 1.0}}])
    live = await receive_until(comm, "points")
    assert [p["seq"] for p in live["points"]] == [2]
    await comm.disconnect()


async def test_the_live_channel_joins_again_after_a_redis_error(alice, monkeypatch, settings):
    """A blocking read that times out (seen with channels_redis) must not end live delivery."""
    import channels.layers

    from webapp.runs import tail

    class Flaky:
        def __init__(self):
            self.joined, self.calls = 0, 0

        async def new_channel(self):
            return f"specific.x!{self.joined}"

        async def group_add(self, group, channel):
            self.joined += 1

        async def group_discard(self, group, channel):
            pass

        async def receive(self, channel):
            self.calls += 1
            if self.calls == 1:
                raise TimeoutError("read timed out")
            if self.calls == 2:
                return {"points": [{"seq": 0, "step": 1, "time": 0.0, "values": {"loss": 1.0}}]}
            await asyncio.sleep(3600)

    layer = Flaky()
    monkeypatch.setattr(channels.layers, "get_channel_layer", lambda alias="default": layer)
    monkeypatch.setattr(tail, "tail_seconds", lambda: 3600.0)
    settings.REDIS_URL = "redis://unused"
    run = await make_run(alice[1], points=0)
    queue = await tail.RunTail.subscribe(run.pk)
    points = await asyncio.wait_for(queue.get(), timeout=5)
    assert [p["seq"] for p in points] == [0] and layer.joined == 2
    tail.RunTail.unsubscribe(run.pk, queue)


async def test_a_page_open_on_a_run_with_a_dead_worker_writes_nothing(alice, settings):
    """The consumer only reads: a run whose worker stopped beating stays as the database says
    until the reaper (tasks.py) ends it, however long a page watches it."""
    from django.utils import timezone

    settings.TRAINYARD_HEARTBEAT_TIMEOUT = 0
    run = await make_run(alice[1], points=1)
    stale = timezone.now() - timezone.timedelta(hours=1)
    await sync_to_async(Run.objects.filter(pk=run.pk).update)(heartbeat_at=stale)
    comm = communicator(alice[0], run.pk)
    assert (await comm.connect())[0]
    first = await receive_until(comm, "status")
    await asyncio.sleep(2.5)  # two more status reads
    await comm.disconnect()
    row = await sync_to_async(Run.objects.get)(pk=run.pk)
    assert first["status"] == "running" and not first["final"]
    assert (row.status, row.heartbeat_at, row.finished_at) == (RunStatus.RUNNING, stale, None)


class CancelSpoilingLayer:
    """A channel layer whose blocking receive turns its first cancel into ConnectionError, as the Redis
    client can (only the first: a failing test still ends at the loop's shutdown). `uncancel`: the
    cancel is lost entirely (Task.cancelling forgets it); `silent_discard`: leaving the group never
    answers, so the tail's bounded clean-up gives up."""

    def __init__(self, uncancel: bool = False, silent_discard: bool = False):
        self.uncancel, self.silent_discard, self.joined, self.spoiled = uncancel, silent_discard, 0, 0

    async def new_channel(self):
        return f"specific.x!{self.joined}"

    async def group_add(self, group, channel):
        self.joined += 1

    async def group_discard(self, group, channel):
        if self.silent_discard:
            await asyncio.sleep(3600)

    async def receive(self, channel):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if self.spoiled:
                raise
            self.spoiled += 1
            if self.uncancel:
                asyncio.current_task().uncancel()
            raise ConnectionError("Connection closed by server.") from None


async def test_the_tail_ends_when_its_last_page_leaves_even_if_the_cancel_is_lost(alice, monkeypatch, settings):
    """A cancel that reaches the Redis client as its read times out can come back as an error
    instead (seen in CI: the loop's shutdown then waited forever on a tail retrying its channel).
    The tail's loops end on their own once no page is left, whatever the cancel became."""
    import channels.layers

    from webapp.runs import tail

    layer = CancelSpoilingLayer(uncancel=True)
    monkeypatch.setattr(channels.layers, "get_channel_layer", lambda alias="default": layer)
    settings.REDIS_URL = "redis://unused"
    run = await make_run(alice[1], points=0)
    queue = await tail.RunTail.subscribe(run.pk)
    tasks = list(tail.RunTail.tails[run.pk].tasks)
    await asyncio.sleep(0.3)
    tail.RunTail.unsubscribe(run.pk, queue)
    done, pending = await asyncio.wait(tasks, timeout=5)
    assert not pending and layer.joined == 1


async def test_a_tail_task_cancelled_ends_even_if_the_cancel_comes_back_as_an_error(alice, monkeypatch, settings):
    """The loop's own shutdown cancels every task, with no page leaving first: a cancel that the
    Redis client turns into an error must still end the tail's loops (Task.cancelling remembers it)."""
    import channels.layers

    from webapp.runs import tail

    layer = CancelSpoilingLayer(silent_discard=True)
    monkeypatch.setattr(channels.layers, "get_channel_layer", lambda alias="default": layer)
    monkeypatch.setattr(tail, "tail_seconds", lambda: 3600.0)
    settings.REDIS_URL = "redis://unused"
    run = await make_run(alice[1], points=0)
    queue = await tail.RunTail.subscribe(run.pk)
    the_tail = tail.RunTail.tails[run.pk]
    await asyncio.sleep(0.3)
    for task in the_tail.tasks:
        task.cancel()
    done, pending = await asyncio.wait(the_tail.tasks, timeout=8)
    assert not pending and layer.joined == 1
    tail.RunTail.unsubscribe(run.pk, queue)
