"""Web fixtures: two users in two workspaces, logged-in clients, datasets built in code."""

from __future__ import annotations

import os

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.conftest import require_service
from tests.helpers import CHAT_ROW, jsonl
from webapp.workspaces.services import create_user_with_workspace


@pytest.fixture(autouse=True, scope="session")
def _services_when_configured():
    """When DATABASE_URL / REDIS_URL are set, they must be reachable (CI fails, a laptop skips)."""
    if os.environ.get("DATABASE_URL"):
        require_service(os.environ["DATABASE_URL"], "PostgreSQL")
    if os.environ.get("REDIS_URL"):
        require_service(os.environ["REDIS_URL"], "Redis")


@pytest.fixture
def alice(db):
    return create_user_with_workspace("alice", "alice-password", "Alice's team")


@pytest.fixture
def bob(db):
    return create_user_with_workspace("bob", "bob-password", "Bob's team")


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice[0])
    return client


@pytest.fixture
def bob_client(bob):
    from django.test import Client

    c = Client()
    c.force_login(bob[0])
    return c


@pytest.fixture
def chat_file():
    def make(rows=None, name="chat.jsonl"):
        rows = rows if rows is not None else [CHAT_ROW] * 3
        return SimpleUploadedFile(name, jsonl(rows), content_type="application/jsonl")

    return make


@pytest.fixture
def alice_dataset(alice, tiny_model_dir):
    from training.demo import chat_rows
    from webapp.datasets.services import upload_dataset

    user, workspace = alice
    upload = SimpleUploadedFile("chat.jsonl", jsonl(chat_rows(120)))
    return upload_dataset(workspace, user, upload, name="chat").dataset
