"""Run page websocket: authorize, then forward history and live points, status and log. No other logic."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from webapp.runs import realtime, services
from webapp.runs.models import Run

POLL_SECONDS = 0.5


@database_sync_to_async
def _visible_run(user, run_id: int) -> Run | None:
    return Run.objects.visible_to(user).filter(pk=run_id).first()


@database_sync_to_async
def _history(run_id: int, after_seq: int):
    return realtime.history(run_id, after_seq)


@database_sync_to_async
def _updates(run_id: int, after_seq: int, log_offset: int):
    services.mark_stale_runs_interrupted(run_id=run_id)  # a dead worker shows as interrupted while watched
    run = Run.objects.get(pk=run_id)
    return realtime.points_after(run_id, after_seq), realtime.status_of(run), realtime.log_after(run, log_offset)


class RunConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        run_id = int(self.scope["url_route"]["kwargs"]["run_id"])
        if await _visible_run(self.scope["user"], run_id) is None:
            await self.close(code=4403)
            return
        query = parse_qs(self.scope.get("query_string", b"").decode())
        self.run_id = run_id
        self.after_seq = int(query.get("after", ["-1"])[0])
        self.log_offset = int(query.get("log", ["0"])[0])
        await self.accept()
        self.streamer = asyncio.create_task(self._stream())

    async def disconnect(self, code):
        streamer = getattr(self, "streamer", None)
        if streamer:
            streamer.cancel()

    async def _stream(self):
        last_status = None
        history = await _history(self.run_id, self.after_seq)
        await self.send_json({"type": "points", "history": True, "points": history})
        if history:
            self.after_seq = history[-1]["seq"]
        while True:
            points, status, log = await _updates(self.run_id, self.after_seq, self.log_offset)
            if points:
                await self.send_json({"type": "points", "history": False, "points": points})
                self.after_seq = points[-1]["seq"]
            if log:
                await self.send_json(log)
                self.log_offset = log["offset"]
            if status != last_status:
                await self.send_json(status)
                last_status = status
            if status["final"] and not points and not log:
                return  # nothing more will come; the socket stays open until the page leaves
            await asyncio.sleep(POLL_SECONDS)
