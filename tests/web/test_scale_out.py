"""The scaled settings really talk to Redis: the huey queue and the channel layer (CI needs the servers)."""

from __future__ import annotations

import os
import uuid

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings

from tests.conftest import require_service

REDIS_URL = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def redis_url():
    require_service(REDIS_URL, "Redis")
    return REDIS_URL


def test_redis_huey_carries_a_task_between_processes(redis_url):
    from huey import RedisHuey

    def add(a, b):
        return a + b

    huey = RedisHuey(f"trainyard-test-{uuid.uuid4().hex[:8]}", url=redis_url)
    result = huey.task(name="add")(add)(2, 3)
    # A second Huey instance (as on another GPU host) takes the task off the shared queue.
    other = RedisHuey(huey.name, url=redis_url)
    other.task(name="add")(add)
    task = other.dequeue()
    assert task is not None and other.execute(task) == 5
    assert result.get() == 5
    huey.storage.flush_all()


def test_channels_redis_delivers_group_messages(redis_url):
    from channels_redis.core import RedisChannelLayer

    layer = RedisChannelLayer(hosts=[redis_url], prefix=f"ty{uuid.uuid4().hex[:6]}")

    async def roundtrip():
        channel = await layer.new_channel()
        await layer.group_add("run-1", channel)
        await layer.group_send("run-1", {"type": "run.event", "step": 7})
        return await layer.receive(channel)

    assert async_to_sync(roundtrip)() == {"type": "run.event", "step": 7}


def test_settings_switch_to_postgres_and_redis_when_urls_are_set():
    if os.environ.get("DATABASE_URL"):
        assert settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
    if os.environ.get("REDIS_URL"):
        assert settings.HUEY["huey_class"] == "huey.RedisHuey"
        assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels_redis.core.RedisChannelLayer"
    if not os.environ.get("DATABASE_URL"):
        assert settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
        assert "journal_mode=WAL" in settings.DATABASES["default"]["OPTIONS"]["init_command"]
