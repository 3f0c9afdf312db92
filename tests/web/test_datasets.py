"""Uploading datasets: line-numbered validation, keep-valid-rows, duplicates, formats, privacy."""

from __future__ import annotations

import gzip
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from webapp.datasets.models import Dataset, dataset_dir
from webapp.datasets.services import read_row

from .conftest import CHAT_ROW, jsonl

pytestmark = pytest.mark.django_db


def test_valid_upload_is_stored_and_shown(alice_client, chat_file):
    response = alice_client.post("/datasets/", {"file": chat_file()})
    dataset = Dataset.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/datasets/{dataset.pk}/"
    assert (dataset.rows, dataset.format, dataset.name) == (3, "chat_template", "chat")
    page = alice_client.get(response["Location"]).content.decode()
    assert 'id="row-count">3<' in page and "What is 2 plus 2?" in page


@pytest.mark.parametrize("line, reason", [
    ("not json at all", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"messages": []}', "empty message list"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}', "unknown role 'wizard'"),
    ('{"messages": [{"role": "user", "content": ""}]}', "empty content"),
    ('{"messages": [{"role": "user"}]}', "missing"),
    ('{"messages": "hello"}', "must be a list of messages"),
])
def test_each_invalid_line_is_reported_with_its_number(alice_client, chat_file, line, reason):
    rows = [CHAT_ROW, CHAT_ROW, line, CHAT_ROW]
    response = alice_client.post("/datasets/", {"file": chat_file(rows)})
    page = response.content.decode()
    assert response.status_code == 400
    assert "<td>3</td>" in page and reason in page.replace("&#x27;", "'")
    assert Dataset.objects.count() == 0
    assert not list(dataset_dir().glob("*.part"))  # nothing half-stored


def test_non_utf8_line_is_reported(alice_client):
    data = jsonl([CHAT_ROW]) + b'{"text": "caf\xe9"}\n'
    response = alice_client.post("/datasets/", {"file": SimpleUploadedFile("x.jsonl", data)})
    assert response.status_code == 400 and "not UTF-8" in response.content.decode()


def test_keep_valid_rows_stores_a_clean_file_and_the_rejected_lines(alice_client, chat_file):
    rows = [CHAT_ROW, "{broken", CHAT_ROW | {"id": 2}]
    response = alice_client.post("/datasets/", {"file": chat_file(rows), "keep_valid": "on"})
    dataset = Dataset.objects.get()
    assert response.status_code == 302
    assert (dataset.rows, dataset.rejected_rows) == (2, 1)
    assert read_row(dataset, 1) == CHAT_ROW | {"id": 2}
    rejected = alice_client.get(f"/datasets/{dataset.pk}/rejected/")
    assert b"".join(rejected.streaming_content) == b"{broken\n"


def test_same_file_twice_is_noticed(alice_client, chat_file):
    alice_client.post("/datasets/", {"file": chat_file()})
    response = alice_client.post("/datasets/", {"file": chat_file(name="again.jsonl")}, follow=True)
    assert Dataset.objects.count() == 1
    assert "already uploaded" in response.content.decode()


def test_gzip_and_json_array_uploads(alice_client):
    gz = SimpleUploadedFile("c.jsonl.gz", gzip.compress(jsonl([{"text": "hello"}] * 4)))
    arr = SimpleUploadedFile("a.json", json.dumps([{"instruction": "a", "output": "b"}] * 2).encode())
    assert alice_client.post("/datasets/", {"file": gz}).status_code == 302
    assert alice_client.post("/datasets/", {"file": arr}).status_code == 302
    formats = dict(Dataset.objects.values_list("format", "rows"))
    assert formats == {"completion": 4, "alpaca": 2}


def test_gzip_bomb_is_refused(alice_client, settings):
    from webapp.datasets import services

    bomb = gzip.compress(b'{"text": "' + b"a" * (80 * 1024 * 1024) + b'"}\n')
    response = alice_client.post("/datasets/", {"file": SimpleUploadedFile("b.jsonl.gz", bomb)})
    assert response.status_code == 400 and "archive bomb" in response.content.decode()
    assert services.GZIP_MAX_RATIO > 1 and Dataset.objects.count() == 0


def test_filename_is_never_used_as_a_path(alice_client, chat_file):
    alice_client.post("/datasets/", {"file": chat_file(name="../../etc/evil.jsonl")})
    dataset = Dataset.objects.get()
    assert dataset.name == "evil" and dataset.path.parent == dataset_dir()


def test_other_workspaces_and_anonymous_users_see_nothing(client, alice_dataset, bob_client):
    for url in (f"/datasets/{alice_dataset.pk}/", f"/datasets/{alice_dataset.pk}/preview/"):
        assert bob_client.get(url).status_code == 404
        assert client.get(url).status_code == 302
    assert "chat" not in bob_client.get("/datasets/").content.decode().split("<main>")[1].split("Upload")[0]


def test_preview_shows_trained_and_masked_tokens(alice_client, alice_dataset):
    page = alice_client.get(f"/datasets/{alice_dataset.pk}/preview/?row=3").content.decode()
    assert page.count('class="tok trained') > 3 and page.count('class="tok masked') > 3
    assert "Row 3 " in page


def test_preview_options_change_the_labels(alice_client, alice_dataset):
    base = alice_client.get(f"/datasets/{alice_dataset.pk}/preview/?row=1").content.decode()
    more = alice_client.get(f"/datasets/{alice_dataset.pk}/preview/?row=1&roles=assistant,user").content.decode()
    assert more.count('class="tok trained') > base.count('class="tok trained')
