"""Fan-out of a run's new metric points to the pages open on it in this web process.

Live points reach a page two ways, deduplicated by `seq`: a tail that polls the metric rows the
worker wrote (one per run per web process, shared by every open page of that run: works with no
server in between), and with Redis the worker's own publish to the run's group (lower latency).
"""

from __future__ import annotations

import asyncio
import logging

from channels.db import database_sync_to_async
from django.conf import settings

from webapp.runs import realtime
from webapp.runs.models import Run

log = logging.getLogger(__name__)


def tail_seconds() -> float:
    return 1.0 if settings.REDIS_URL else 0.1  # with Redis the tail is only a safety net


@database_sync_to_async
def points_after(run_id: int, after_seq: int) -> list[realtime.Point]:
    return realtime.points_after(run_id, after_seq)


@database_sync_to_async
def _max_seq(run_id: int) -> int:
    return Run.objects.filter(pk=run_id).values_list("next_seq", flat=True).first() or 0


def cancel_requested() -> bool:
    """Whether this task was asked to stop, even if the cancel never reached its loop as a
    CancelledError: code below can turn one into an error (redis-py retrying a read that timed out as
    the cancel came) or swallow it (a bounded clean-up). Task.cancelling() remembers the request."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class RunTail:
    """One per run per web process, shared by every open page of that run: it polls the run's new
    metric rows and, with Redis, listens to the run's group on a single channel, then fans out in
    process. 100 open pages cost one Redis message per point, not 100."""

    tails: dict[int, RunTail] = {}

    def __init__(self, run_id: int, after_seq: int | None):
        self.run_id, self.after_seq, self.queues = run_id, after_seq, set()
        # Set when the last page leaves. The loops check it, and whether their task was cancelled, as
        # well as being cancelled: a cancel that comes back from the Redis client as an error (or is
        # lost in a clean-up) would leave a loop that retries on errors running after its pages, and a
        # closing event loop waiting for it forever (seen in CI: a test's teardown hung 600 s).
        self.stopped = False
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
                tail.stopped = True
                for task in tail.tasks:
                    task.cancel()
                cls.tails.pop(run_id, None)

    def _fan_out(self, points: list[realtime.Point]) -> None:
        after = -1 if self.after_seq is None else self.after_seq  # a publish before the first poll
        points = [p for p in points if p["seq"] > after]
        if points:
            self.after_seq = points[-1]["seq"]
            for queue in self.queues:
                queue.put_nowait(points)

    async def _poll(self):
        while not self.stopped and not cancel_requested():
            try:
                if self.after_seq is None:
                    self.after_seq = await _max_seq(self.run_id) - 1
                self._fan_out(await points_after(self.run_id, self.after_seq))
            except Exception:  # a busy database must not end the tail every page of the run shares
                log.exception("run %s: reading new points failed; retrying", self.run_id)
            await asyncio.sleep(tail_seconds())

    async def _listen(self):
        """The run's group on one channel for this process. A Redis hiccup (a read timing out in a
        blocking pop, a restart) must not end it: join again; the database tail covers the gap."""
        from channels.layers import get_channel_layer

        layer, group = get_channel_layer(), realtime.group_name(self.run_id)
        while not self.stopped and not cancel_requested():
            channel = None
            try:
                channel = await layer.new_channel()
                await layer.group_add(group, channel)
                while not self.stopped and not cancel_requested():
                    message: realtime.PointsMessage = await layer.receive(channel)
                    self._fan_out(message.get("points", []))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("run %s: the live channel failed; joining again", self.run_id, exc_info=True)
                await asyncio.sleep(0.5)
            finally:
                if channel is not None:
                    try:
                        # Bounded: on a closing loop (the last page leaving) an unanswered Redis call
                        # would keep this task, and the loop's shutdown, waiting forever (seen in a test).
                        await asyncio.wait_for(layer.group_discard(group, channel), timeout=2)
                    except (Exception, asyncio.CancelledError):
                        pass
