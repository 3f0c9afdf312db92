"""Import from the Hub: a worker copies a split into an ordinary dataset, with progress; offline and
not cached, the user reads why instead of a server error."""

from __future__ import annotations

import pytest

from webapp.datasets.models import Dataset, HubImport

ROWS = [
    {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
    for i in range(120)
]


class RecordingTable:
    """A `datasets.Dataset` that notes the import's stored progress while it is being read."""

    def __init__(self, table, seen):
        self.table, self.seen = table, seen

    def __len__(self):
        return len(self.table)

    def __iter__(self):
        for i, row in enumerate(self.table):
            if i == 100:
                self.seen.append(HubImport.objects.get().rows_done)
            yield row


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls, seen = [], []

    def load_dataset(path, split=None, data_files=None, cache_dir=None, **kwargs):
        calls.append((path, split, kwargs.get("name"), cache_dir))
        return RecordingTable(datasets.Dataset.from_list(ROWS), seen)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, seen


def test_a_hub_split_becomes_a_dataset_with_progress_that_the_preview_reads(
    alice_client, alice, fake_hub, settings, django_capture_on_commit_callbacks
):
    calls, seen = fake_hub
    form = {"hub_id": "org/chat-data", "config_name": "en", "split": "train[:50%]", "name": ""}
    with django_capture_on_commit_callbacks(execute=True):
        answer = alice_client.post("/datasets/import/", form)
    job = HubImport.objects.get()
    assert answer.status_code == 302 and answer["Location"] == f"/datasets/imports/{job.pk}/"
    assert calls == [("org/chat-data", "train[:50%]", "en", str(settings.DATA_DIR / "hub-datasets"))]
    assert 90 <= seen[0] < 120  # progress was stored while the rows were copied
    status = alice_client.get(f"/datasets/imports/{job.pk}/status.json").json()
    dataset = Dataset.objects.get(workspace=alice[1])
    assert status == {
        "status": "done",
        "rows_done": 120,
        "rows_total": 120,
        "error": "",
        "dataset_url": f"/datasets/{dataset.pk}/",
    }
    assert (dataset.name, dataset.rows, dataset.format) == ("chat-data-en", 120, "chat_template")
    from webapp.datasets.storage import iter_rows, read_row

    assert list(iter_rows(dataset)) == ROWS and read_row(dataset, 7) == ROWS[7]
    page = alice_client.get(f"/datasets/imports/{job.pk}/").content.decode()
    assert 'data-status-url="/datasets/imports/' in page and 'id="import-bar"' in page
    assert alice_client.get(f"/datasets/{dataset.pk}/preview/?row=3").status_code == 200


def test_offline_a_dataset_in_no_local_cache_is_refused_with_the_reason(alice_client, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    page = alice_client.post("/datasets/import/", {"hub_id": "someone/not-here", "split": "train"})
    assert page.status_code == 400
    assert "dataset &#x27;someone/not-here&#x27; is not in the local cache (offline" in page.content.decode()
    answer = alice_client.post("/api/datasets/import", {"hub_id": "someone/not-here"}, content_type="application/json")
    assert answer.status_code == 400 and "is not in the local cache" in answer.json()["message"]
    assert not HubImport.objects.exists()


def test_the_api_queues_an_import_and_a_worker_failure_is_read_back(
    alice_client, fake_hub, monkeypatch, django_capture_on_commit_callbacks
):
    import datasets

    def offline_miss(path, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")  # as datasets says when a file is missing offline

    monkeypatch.setattr(datasets, "load_dataset", offline_miss)
    with django_capture_on_commit_callbacks(execute=True):
        answer = alice_client.post(
            "/api/datasets/import", {"hub_id": "org/data", "split": "train[:10]"}, content_type="application/json"
        )
    assert answer.status_code == 202 and answer.json()["status"] == "pending"
    job = alice_client.get(f"/api/datasets/imports/{answer.json()['id']}").json()
    assert job["status"] == "failed" and "can't load dataset 'org/data' from the Hub" in job["error"]
    assert not Dataset.objects.exists()
    bad = alice_client.post("/api/datasets/import", {"hub_id": "not an id"}, content_type="application/json")
    assert bad.status_code == 400 and "not a Hub dataset id" in bad.json()["message"]
