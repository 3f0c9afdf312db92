"""Run page websocket: authorize, then forward history and live points, status and log.

Live points reach a page two ways, deduplicated by `seq`: a tail that polls the metric rows the
worker wrote (one per run per web process, shared by every open page of that run: works with no
server in between), and with Redis the worker's own publish to the run's group (lower latency).
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from webapp.runs import realtime, services
from webapp.runs.models import Run

STATUS_SECONDS = 1.0
log_ = logging.getLogger(__name__)


def _query_int(query: dict, key: str, default: int) -> int:
    try:
        return int(query.get(key, [default])[0])
    except ValueError:
        return default


def tail_seconds() -> float:
    return 1.0 if settings.REDIS_URL else 0.1  # with Redis the tail is only a safety net


@database_sync_to_async
def _visible_run(user, run_id: int) -> Run | None:
    return Run.objects.visible_to(user).filter(pk=run_id).first()


@database_sync_to_async
def _history(run_id: int, after_seq: int):
    return realtime.history(run_id, after_seq)


@database_sync_to_async
def _points(run_id: int, after_seq: int):
    return realtime.points_after(run_id, after_seq)


@database_sync_to_async
def _max_seq(run_id: int) -> int:
    return Run.objects.filter(pk=run_id).values_list("next_seq", flat=True).first() or 0


@database_sync_to_async
def _status_and_log(run_id: int, log_offset: int):
    services.mark_stale_runs_interrupted(run_id=run_id)  # a dead worker shows as interrupted while watched
    run = Run.objects.get(pk=run_id)
    return realtime.status_of(run), realtime.log_after(run, log_offset)


class RunTail:
    """One per run per web process, shared by every open page of that run: it polls the run's new
    metric rows and, with Redis, listens to the run's group on a single channel, then fans out in
    process. 100 open pages cost one Redis message per point, not 100."""

    tails: dict[int, RunTail] = {}

    def __init__(self, run_id: int, after_seq: int | None):
        self.run_id, self.after_seq, self.queues = run_id, after_seq, set()
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._poll())]
        if settings.REDIS_URL:
            self.tasks.append(loop.create_task(self._listen()))

    @classmethod
    async def subscribe(cls, run_id: int) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        tail = cls.tails.get(run_id)
        if tail is None:
            # Registered before any await, so pages connecting at once share one tail; it starts
            # from the newest row once it knows which that is.
            tail = cls.tails[run_id] = cls(run_id, None)
        tail.queues.add(queue)
        return queue

    @classmethod
    def unsubscribe(cls, run_id: int, queue: asyncio.Queue) -> None:
        tail = cls.tails.get(run_id)
        if tail:
            tail.queues.discard(queue)
            if not tail.queues:
                for task in tail.tasks:
                    task.cancel()
                cls.tails.pop(run_id, None)

    def _fan_out(self, points) -> None:
        after = -1 if self.after_seq is None else self.after_seq  # a publish before the first poll
        points = [p for p in points if p["seq"] > after]
        if points:
            self.after_seq = points[-1]["seq"]
            for queue in self.queues:
                queue.put_nowait(points)

    async def _poll(self):
        while True:
            try:
                if self.after_seq is None:
                    self.after_seq = await _max_seq(self.run_id) - 1
                self._fan_out(await _points(self.run_id, self.after_seq))
            except Exception:  # a busy database must not end the tail every page of the run shares
                log_.exception("run %s: reading new points failed; retrying", self.run_id)
            await asyncio.sleep(tail_seconds())

    async def _listen(self):
        """The run's group on one channel for this process. A Redis hiccup (a read timing out in a
        blocking pop, a restart) must not end it: join again; the database tail covers the gap."""
        from channels.layers import get_channel_layer

        layer, group = get_channel_layer(), realtime.group_name(self.run_id)
        while True:
            channel = None
            try:
                channel = await layer.new_channel()
                await layer.group_add(group, channel)
                while True:
                    message = await layer.receive(channel)
                    self._fan_out(message.get("points", []))
            except asyncio.CancelledError:
                raise
            except Exception:
                log_.warning("run %s: the live channel failed; joining again", self.run_id, exc_info=True)
                await asyncio.sleep(0.5)
            finally:
                if channel is not None:
                    try:
                        await layer.group_discard(group, channel)
                    except Exception:
                        pass


class RunConsumer(AsyncJsonWebsocketConsumer):
    # No channel of its own: pages of a run share its RunTail, which holds the one Redis channel.
    channel_layer_alias = None

    async def connect(self):
        run_id = int(self.scope["url_route"]["kwargs"]["run_id"])
        if await _visible_run(self.scope["user"], run_id) is None:
            await self.close(code=4403)
            return
        query = parse_qs(self.scope.get("query_string", b"").decode())
        self.run_id = run_id
        self.after_seq = _query_int(query, "after", -1)
        self.log_offset = max(_query_int(query, "log", 0), 0)
        await self.accept()
        self.queue = await RunTail.subscribe(run_id)
        await self._send_points(await _history(run_id, self.after_seq), history=True)
        self.tasks = [asyncio.create_task(self._forward_tail()), asyncio.create_task(self._status_and_log())]

    async def disconnect(self, code):
        for task in getattr(self, "tasks", []):
            task.cancel()
        if hasattr(self, "queue"):
            RunTail.unsubscribe(self.run_id, self.queue)

    async def _send_points(self, points, history: bool = False):
        fresh = [p for p in points if p["seq"] > self.after_seq]
        if fresh and fresh[0]["seq"] > self.after_seq + 1 and not history:
            fresh = await _points(self.run_id, self.after_seq)  # a gap: fill it from the database
        if fresh:
            self.after_seq = max(self.after_seq, fresh[-1]["seq"])  # before the await: no double send
        if fresh or history:
            await self.send_json({"type": "points", "history": history, "points": fresh})

    async def _forward_tail(self):
        while True:
            await self._send_points(await self.queue.get())

    async def _status_and_log(self):
        last_status = None
        while True:
            try:
                status, log = await _status_and_log(self.run_id, self.log_offset)
            except Exception:  # e.g. two pages catching up the same stale run at once: try again
                log_.exception("run %s: reading status failed; retrying", self.run_id)
                await asyncio.sleep(STATUS_SECONDS)
                continue
            if log:
                await self.send_json(log)
                self.log_offset = log["offset"]
            if status != last_status:
                if status["final"]:  # every point before the final status: a finished run's chart is whole
                    await self._send_points(await _points(self.run_id, self.after_seq))
                await self.send_json(status)
                last_status = status
            if status["final"] and not log:
                return
            await asyncio.sleep(STATUS_SECONDS)
