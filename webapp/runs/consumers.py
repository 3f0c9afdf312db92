"""Run page websocket: authorize, then forward history and live points (from the run's RunTail),
status and log. It only reads: a run's state is written by its worker and, for a dead worker, by
the reaper (tasks.py), never by a page being open."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from webapp.runs import realtime
from webapp.runs.models import Run
from webapp.runs.tail import RunTail, cancel_requested, points_after

STATUS_SECONDS = 1.0
log_ = logging.getLogger(__name__)


def _query_int(query: dict, key: str, default: int) -> int:
    try:
        return int(query.get(key, [default])[0])
    except ValueError:
        return default


@database_sync_to_async
def _visible_run(user, run_id: int) -> Run | None:
    return Run.objects.visible_to(user).filter(pk=run_id).first()


@database_sync_to_async
def _history(run_id: int, after_seq: int) -> list[realtime.Point]:
    return realtime.history(run_id, after_seq)


@database_sync_to_async
def _status_and_log(run_id: int, log_offset: int) -> tuple[realtime.StatusPayload, realtime.LogPayload | None]:
    run = Run.objects.get(pk=run_id)
    return realtime.status_of(run), realtime.log_after(run, log_offset)


class RunConsumer(AsyncJsonWebsocketConsumer):
    # No channel of its own: pages of a run share its RunTail, which holds the one Redis channel.
    channel_layer_alias = None
    closed = False

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
        self.closed = True  # the loops end on it even if a cancel is lost (see RunTail.stopped)
        for task in getattr(self, "tasks", []):
            task.cancel()
        if hasattr(self, "queue"):
            RunTail.unsubscribe(self.run_id, self.queue)

    async def _send_points(self, points: list[realtime.Point], history: bool = False):
        fresh = [p for p in points if p["seq"] > self.after_seq]
        if fresh and fresh[0]["seq"] > self.after_seq + 1 and not history:
            fresh = await points_after(self.run_id, self.after_seq)  # a gap: fill it from the database
        if fresh:
            self.after_seq = max(self.after_seq, fresh[-1]["seq"])  # before the await: no double send
        if fresh or history:
            await self.send_json(realtime.PointsPayload(type="points", history=history, points=fresh))

    async def _forward_tail(self):
        while not self.closed and not cancel_requested():
            await self._send_points(await self.queue.get())

    async def _status_and_log(self):
        last_status = None
        while not self.closed and not cancel_requested():
            try:
                status, log = await _status_and_log(self.run_id, self.log_offset)
            except Exception:  # e.g. the database restarting: try again
                log_.exception("run %s: reading status failed; retrying", self.run_id)
                await asyncio.sleep(STATUS_SECONDS)
                continue
            if log:
                await self.send_json(log)
                self.log_offset = log["offset"]
            if status != last_status:
                if status["final"]:  # every point before the final status: a finished run's chart is whole
                    await self._send_points(await points_after(self.run_id, self.after_seq))
                await self.send_json(status)
                last_status = status
            if status["final"] and not log:
                return
            await asyncio.sleep(STATUS_SECONDS)
