"""Uploading datasets: line-numbered validation, keep-valid-rows, duplicates, formats, privacy."""

from __future__ import annotations

import gzip
import io
import json
import os
import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.helpers import CHAT_ROW, jsonl
from webapp.datasets.models import Dataset, dataset_dir
from webapp.datasets.storage import read_row

pytestmark = pytest.mark.django_db


def test_valid_upload_is_stored_and_shown(alice_client, chat_file):
    response = alice_client.post("/datasets/", {"file": chat_file()})
    dataset = Dataset.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/datasets/{dataset.pk}/"
    assert (dataset.rows, dataset.format, dataset.name) == (3, "chat_template", "chat")
    page = alice_client.get(response["Location"]).content.decode()
    assert 'id="row-count">3<' in page and "What is 2 plus 2?" in page


@pytest.mark.parametrize(
    "line, reason",
    [
        ("not json at all", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"messages": []}', "empty message list"),
        ('{"messages": [{"role": "user"}]}', "missing"),
        ('{"messages": "hello"}', "must be a list of messages"),
    ],
)
def test_each_invalid_line_is_reported_with_its_number(alice_client, chat_file, line, reason):
    rows = [CHAT_ROW, CHAT_ROW, line, CHAT_ROW]
    response = alice_client.post("/datasets/", {"file": chat_file(rows)})
    page = response.content.decode()
    assert response.status_code == 400
    assert "<td>3</td>" in page and reason in page.replace("&#x27;", "'")
    assert Dataset.objects.count() == 0
    assert not list(dataset_dir().glob("*.part"))  # nothing half-stored


@pytest.mark.parametrize(
    "line",
    ['{"messages": [{"role": "wizard", "content": "hi"}]}', '{"messages": [{"role": "user", "content": ""}]}'],
)
def test_rows_the_template_may_drop_are_stored_not_refused(alice_client, chat_file, line):
    """An unknown role or an empty content is the template's per-row matter (a note or a drop with its
    reason in the preview and stats, as axolotl keeps such rows), never a refusal of the whole file."""
    response = alice_client.post("/datasets/", {"file": chat_file([CHAT_ROW, line])})
    assert response.status_code == 302 and Dataset.objects.get().rows == 2


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


def test_rejected_lines_stay_in_their_workspace(alice_client, bob_client, chat_file):
    """Same clean content in two workspaces (one stored file), different rejected lines: each
    workspace downloads its own."""
    alice_client.post("/datasets/", {"file": chat_file([CHAT_ROW, "{alice broken"]), "keep_valid": "on"})
    bob_client.post("/datasets/", {"file": chat_file([CHAT_ROW, "{bob secret"]), "keep_valid": "on"})
    mine, theirs = Dataset.objects.order_by("pk")
    assert mine.sha256 == theirs.sha256 and mine.workspace != theirs.workspace
    got = b"".join(alice_client.get(f"/datasets/{mine.pk}/rejected/").streaming_content)
    assert got == b"{alice broken\n"
    assert b"".join(bob_client.get(f"/datasets/{theirs.pk}/rejected/").streaming_content) == b"{bob secret\n"


def test_a_bomb_without_newlines_is_refused_without_inflating_it(alice_client):
    """256 MB of one line in a ~250 KB .gz: refused after at most a bounded read, never held whole."""
    import tracemalloc
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    chunk = b"a" * 2**20
    bomb = packer.compress(b'{"text": "') + b"".join(packer.compress(chunk) for _ in range(256)) + packer.flush()
    tracemalloc.start()
    try:
        response = alice_client.post("/datasets/", {"file": SimpleUploadedFile("b.jsonl.gz", bomb)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status_code == 400 and "archive bomb" in response.content.decode()
    assert peak < 160 * 2**20, f"peak {peak / 2**20:.0f} MB"


def test_a_line_over_the_size_limit_is_reported_and_the_next_ones_still_read(alice_client, monkeypatch):
    from training import rows

    monkeypatch.setattr(rows, "MAX_LINE_BYTES", 1000)
    data = jsonl([CHAT_ROW]) + b'{"text": "' + b"a" * 5000 + b'"}\n' + jsonl([CHAT_ROW | {"id": 3}])
    response = alice_client.post("/datasets/", {"file": SimpleUploadedFile("x.jsonl", data), "keep_valid": "on"})
    assert response.status_code == 302
    dataset = Dataset.objects.get()
    assert (dataset.rows, dataset.rejected_rows) == (2, 1)


def test_an_overlong_line_is_told_its_real_size_and_never_served_cut(alice_client, monkeypatch):
    """The report counts the whole line (not the limit the reader stopped at); the rejected-lines
    download puts a JSON note in its place, never the first MAX_LINE_BYTES of it."""
    from training import rows

    monkeypatch.setattr(rows, "MAX_LINE_BYTES", 1000)
    long_line = b'{"text": "' + b"a" * 5000 + b'"}\n'
    data = jsonl([CHAT_ROW]) + long_line + b"{broken\n" + jsonl([CHAT_ROW | {"id": 3}])
    refused = alice_client.post("/api/datasets/", {"file": SimpleUploadedFile("x.jsonl", data)}).json()
    assert refused["problems"][0]["message"] == f"line is {len(long_line):,} bytes, over the 1,000-byte limit"
    alice_client.post("/datasets/", {"file": SimpleUploadedFile("x.jsonl", data), "keep_valid": "on"})
    dataset = Dataset.objects.get()
    served = b"".join(alice_client.get(f"/datasets/{dataset.pk}/rejected/").streaming_content).splitlines()
    assert len(served) == 2 and served[1] == b"{broken"  # one line per refused line, in order
    note = json.loads(served[0])["trainyard_note"]
    assert note.startswith(f"line 2: line is {len(long_line):,} bytes") and "left out" in note
    assert b"aaaa" not in served[0]


def test_gzip_bomb_is_refused(alice_client, settings):
    from webapp.datasets import intake

    bomb = gzip.compress(b'{"text": "' + b"a" * (80 * 1024 * 1024) + b'"}\n')
    response = alice_client.post("/datasets/", {"file": SimpleUploadedFile("b.jsonl.gz", bomb)})
    assert response.status_code == 400 and "archive bomb" in response.content.decode()
    assert intake.GZIP_MAX_RATIO > 1 and Dataset.objects.count() == 0


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
    assert "row 3 of 120" in page


def test_preview_options_change_the_labels(alice_client, alice_dataset):
    base = alice_client.get(f"/datasets/{alice_dataset.pk}/preview/?row=1").content.decode()
    more = alice_client.get(f"/datasets/{alice_dataset.pk}/preview/?row=1&roles=assistant,user").content.decode()
    assert more.count('class="tok trained') > base.count('class="tok trained')


def test_token_statistics_are_computed_by_the_worker_and_cached(
    alice_client, alice_dataset, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        page = alice_client.get(f"/datasets/{alice_dataset.pk}/?sequence_len=40")
    assert page.status_code == 200 and 'id="stats-bar"' in page.content.decode()
    data = alice_client.get(f"/datasets/{alice_dataset.pk}/stats.json?sequence_len=40").json()
    assert data["status"] == "done" and data["rows_done"] == 120  # huey immediate mode in tests
    result = data["result"]
    assert sum(result["lengths"]["counts"]) == 120
    assert result["over_sequence_len"] == result["dropped"].get("too_long", 0) > 0
    assert 0 < result["trained_ratio"] < 1
    assert result["fields"]["roles"]["assistant"] >= 120
    assert alice_dataset.stats.count() == 1
    alice_client.get(f"/datasets/{alice_dataset.pk}/?sequence_len=40")  # same options: served from cache
    assert alice_dataset.stats.count() == 1


def test_preview_compares_two_option_sets_side_by_side(alice_client, alice_dataset):
    page = alice_client.get(
        f"/datasets/{alice_dataset.pk}/preview/?row=2&compare=1&b_roles=assistant,user"
    ).content.decode()
    a, b = page.split('id="column-A"')[1].split('id="column-B"')
    assert b.count('class="tok trained') > a.count('class="tok trained') > 0


def test_search_and_dropped_rows_lead_to_rows(alice_client, alice_dataset, django_capture_on_commit_callbacks):
    from webapp.datasets.storage import read_row

    page = alice_client.get(f"/datasets/{alice_dataset.pk}/preview/?q=capital+of").content.decode()
    rows = [int(r) for r in re.findall(r'row=(\d+)">\d+</a>', page.split('id="search-results"')[1])]
    assert rows and all("capital of" in json.dumps(read_row(alice_dataset, r)) for r in rows)
    with django_capture_on_commit_callbacks(execute=True):
        alice_client.get(f"/datasets/{alice_dataset.pk}/?sequence_len=40")
    page = alice_client.get(f"/datasets/{alice_dataset.pk}/preview/?sequence_len=40&dropped=1").content.decode()
    assert re.search(r'title="too_long: \d+ tokens &gt; sequence_len 40"', page)


def test_an_upload_that_breaks_off_leaves_nothing_behind(alice):
    from webapp.datasets.services import upload_dataset

    class BreaksOff(io.BytesIO):
        def readline(self, size=-1):
            if self.tell() > 0:
                raise ConnectionResetError("client went away")
            return super().readline(size)

    before = set(dataset_dir().iterdir())
    with pytest.raises(ConnectionResetError):
        upload_dataset(alice[1], alice[0], BreaksOff(jsonl([CHAT_ROW] * 50)))
    assert set(dataset_dir().iterdir()) == before and Dataset.objects.count() == 0


def test_validation_streams_without_loading_the_file(alice, tmp_path):
    """A 30 MB upload is validated and stored with a few MB of Python memory, not the file size."""
    import tracemalloc

    from django.core.files import File

    from webapp.datasets.services import upload_dataset

    path = tmp_path / "big.jsonl"
    line = json.dumps(CHAT_ROW | {"pad": "x" * 1000}) + "\n"
    with path.open("w") as f:
        for i in range(30_000):
            f.write(line.replace("2 plus 2", f"{i} plus 2"))
    tracemalloc.start()
    with path.open("rb") as f:
        result = upload_dataset(alice[1], alice[0], File(f, name="big.jsonl"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result.dataset.rows == 30_000
    assert peak < 5 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for a {path.stat().st_size / 2**20:.0f} MiB file"


def test_api_upload_reports_problems_and_previews_rows(alice_client, chat_file, tiny_model_dir):
    bad = alice_client.post("/api/datasets/", {"file": chat_file([CHAT_ROW, "{nope"])})
    assert bad.status_code == 400
    assert bad.json()["problems"] == [
        {
            "line": 2,
            "field": "",
            "message": "invalid JSON: Expecting property name enclosed in double quotes at column 2",
            "unit": "line",
        }
    ]
    ok = alice_client.post("/api/datasets/", {"file": chat_file()})
    assert ok.status_code == 201
    dataset_id = ok.json()["dataset"]["id"]
    again = alice_client.post("/api/datasets/", {"file": chat_file(name="x.jsonl")})
    assert again.status_code == 200 and again.json()["duplicate"]
    listed = alice_client.get("/api/datasets/").json()
    assert [d["id"] for d in listed] == [dataset_id]
    preview = alice_client.get(f"/api/datasets/{dataset_id}/rows/0/preview").json()
    trained = [t["text"] for t in preview["tokens"] if t["trained"]]
    assert "".join(trained).replace("\u00b7", " ") == "2 plus 2 is 4.<|im_end|>"
    assert alice_client.get(f"/api/datasets/{dataset_id}/rows/99/preview").status_code == 400


def test_api_refuses_other_workspaces_and_anonymous(client, alice_dataset, bob_client):
    assert bob_client.get(f"/api/datasets/{alice_dataset.pk}").status_code == 404
    assert bob_client.get(f"/api/datasets/{alice_dataset.pk}/rows/0/preview").status_code == 404
    assert client.get("/api/datasets/").status_code == 401


def test_preview_can_take_its_options_from_a_config(alice_client, alice, alice_dataset):
    from webapp.runs.models import TrainingConfig

    config = TrainingConfig.objects.create(
        workspace=alice[1],
        name="users-too",
        yaml="base_model: tiny-chat\ndatasets:\n  - path: chat\n"
        "    roles_to_train: [assistant, user]\nsequence_len: 20\n",
    )
    page = alice_client.get(f"/datasets/{alice_dataset.pk}/preview/?row=1&config={config.pk}").content.decode()
    assert 'value="assistant,user"' in page and 'name="sequence_len" value="20"' in page
    assert "too_long" in page  # with sequence_len 20 the row is dropped, and the page says so
    assert f'<option value="{config.pk}" selected>users-too</option>' in page


def test_preview_from_a_config_uses_its_template_and_every_option(alice_client, alice, alice_dataset):
    """The preview is what the trainer will see: the config's own chat template and eot tokens too."""
    from webapp.runs.models import TrainingConfig

    jinja = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    config = TrainingConfig.objects.create(
        workspace=alice[1],
        name="own-template",
        yaml="base_model: tiny-chat\ndatasets:\n  - path: chat\nchat_template: jinja\n"
        f"chat_template_jinja: {json.dumps(jinja)}\neot_tokens: ['</s>']\n",
    )
    page = alice_client.get(f"/datasets/{alice_dataset.pk}/preview/?row=1&config={config.pk}").content.decode()
    assert "###" in page and "im_start" not in page
    # Stats asked for from that page are keyed by the same options (the config's entry included).
    from training.config import parse_config
    from webapp.datasets.encoding import EncodeOptions

    options = EncodeOptions.from_config(parse_config(config.yaml), "chat", ["tiny-chat"])
    carried = EncodeOptions.from_query(options.as_query(), ["tiny-chat"])
    assert carried.key() == options.key()
    assert carried.entry.chat_template_jinja == jinja and carried.entry.eot_tokens == ["</s>"]


def test_a_line_over_the_size_limit_is_reported(alice_client, monkeypatch):
    from training import rows

    monkeypatch.setattr(rows, "MAX_LINE_BYTES", 200)
    data = jsonl([CHAT_ROW, {"text": "x" * 500}])
    response = alice_client.post("/datasets/", {"file": SimpleUploadedFile("x.jsonl", data)})
    assert response.status_code == 400 and "over the 200-byte limit" in response.content.decode()


def test_a_damaged_gzip_is_refused_not_a_server_error(alice_client):
    data = gzip.compress(jsonl([CHAT_ROW] * 50))[:-20]  # found by schemathesis: a truncated archive
    response = alice_client.post("/datasets/", {"file": SimpleUploadedFile("x.jsonl.gz", data)})
    assert response.status_code == 400 and "the .gz file is damaged" in response.content.decode()
    assert Dataset.objects.count() == 0


SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What is 2 plus 2?"},
        {"from": "gpt", "value": "4."},
    ]
}


def test_sharegpt_files_upload_preview_and_start_configs_that_read_them(alice_client, alice, tiny_model_dir):
    """`conversations` with from/value: detected at upload, previewed with its layout, and a config
    entry is told which axolotl keys it needs (the starter config has them)."""
    from webapp.runs.configs import validate_config

    upload = SimpleUploadedFile("share.jsonl", jsonl([SHAREGPT] * 3))
    assert alice_client.post("/datasets/", {"file": upload}).status_code == 302
    dataset = Dataset.objects.get()
    assert dataset.format == "chat_template"
    assert dataset.format_options == {
        "field_messages": "conversations",
        "message_property_mappings": {"role": "from", "content": "value"},
    }
    page = alice_client.get(f"/datasets/{dataset.pk}/preview/?row=0").content.decode()
    assert page.count('class="tok trained') > 0
    bare = "base_model: tiny-chat\ndatasets:\n  - path: share\n"
    with pytest.raises(Exception) as refused:
        validate_config(alice[1], bare)
    assert "datasets[0].field_messages" in str(refused.value) and "conversations" in str(refused.value)
    starter = alice_client.get("/configs/new/").content.decode()
    assert "field_messages: conversations" in starter
    yaml_text = re.search(r"<textarea[^>]*>(.*?)</textarea>", starter, re.S).group(1)
    import html

    validate_config(alice[1], html.unescape(yaml_text))  # the starter config reads the file as is


def _parquet_bytes(rows, row_group_size=None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=row_group_size)
    return buf.getvalue()


def _chat(i):
    return {
        "messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
    }


def test_a_parquet_upload_is_stored_as_jsonl_rows_the_preview_reads(alice_client, tiny_model_dir):
    rows = [_chat(i) for i in range(25)]
    upload = SimpleUploadedFile("chats.parquet", _parquet_bytes(rows, row_group_size=10))
    response = alice_client.post("/datasets/", {"file": upload})
    dataset = Dataset.objects.get()
    assert response.status_code == 302, response.content.decode()[:2000]
    assert (dataset.rows, dataset.format, dataset.name, dataset.original_filename) == (
        25,
        "chat_template",
        "chats",
        "chats.parquet",
    )
    assert read_row(dataset, 17) == rows[17]  # by the line-offset index, as any upload
    assert dataset.path.read_bytes().count(b"\n") == 25
    preview = alice_client.get(f"/api/datasets/{dataset.pk}/rows/3/preview", {"model": str(tiny_model_dir)}).json()
    assert "Answer·3." in "".join(t["text"] for t in preview["tokens"] if t["trained"])  # spaces shown as ·


def test_a_bad_parquet_row_is_reported_by_row_number(alice_client):
    rows = [_chat(i) for i in range(6)]
    rows[4] = {"messages": []}
    upload = SimpleUploadedFile("chats.parquet", _parquet_bytes(rows))
    response = alice_client.post("/datasets/", {"file": upload})
    page = response.content.decode()
    assert response.status_code == 400 and "1 invalid row(s)" in page
    assert "<td>5</td>" in page and "empty message list" in page
    kept = alice_client.post(
        "/datasets/", {"file": SimpleUploadedFile("c.parquet", _parquet_bytes(rows)), "keep_valid": "on"}
    )
    dataset = Dataset.objects.get()
    assert kept.status_code == 302 and dataset.rows == 5
    dataset.rejected_path.unlink()  # kept per dataset id, and ids are reused after a test's rollback


def test_a_csv_upload_with_a_bom_is_validated_by_row(alice_client):
    text = 'instruction,input,output\nSay hi,,Hi!\n"Add, please",1 and 2,3\nOnly an instruction\n'
    upload = SimpleUploadedFile("alpaca.csv", b"\xef\xbb\xbf" + text.encode())
    response = alice_client.post("/datasets/", {"file": upload, "format": "alpaca"})
    page = response.content.decode()
    assert response.status_code == 400 and "<td>3</td>" in page and "1 cells where the header has 3" in page
    assert "wrong number of cells: 1" in page and "<th>Row</th>" in page
    upload = SimpleUploadedFile("alpaca.csv", b"\xef\xbb\xbf" + text.rsplit("Only", 1)[0].encode())
    assert alice_client.post("/datasets/", {"file": upload}).status_code == 302
    dataset = Dataset.objects.get()
    assert (dataset.rows, dataset.format) == (2, "alpaca")
    assert read_row(dataset, 1) == {"instruction": "Add, please", "input": "1 and 2", "output": "3"}


def test_a_jsonl_upload_with_a_bom_is_read_not_refused(alice_client):
    upload = SimpleUploadedFile("bom.jsonl", b"\xef\xbb\xbf" + jsonl([CHAT_ROW, CHAT_ROW | {"id": 1}]))
    assert alice_client.post("/datasets/", {"file": upload}).status_code == 302
    dataset = Dataset.objects.get()
    assert dataset.rows == 2 and read_row(dataset, 0) == CHAT_ROW
    assert not dataset.path.read_bytes().startswith(b"\xef\xbb\xbf")


def test_api_upload_takes_parquet(alice_client):
    upload = SimpleUploadedFile("api.parquet", _parquet_bytes([_chat(i) for i in range(3)]))
    response = alice_client.post("/api/datasets/", {"file": upload})
    assert response.status_code == 201 and response.json()["dataset"]["rows"] == 3
    assert response.json()["dataset"]["original_filename"] == "api.parquet"
    rows = [_chat(i) for i in range(4)]
    rows[3] = {"messages": []}
    bad = alice_client.post("/api/datasets/", {"file": SimpleUploadedFile("b.parquet", _parquet_bytes(rows))})
    assert bad.status_code == 400
    assert bad.json()["problems"] == [{"line": 4, "field": "messages", "message": "empty message list", "unit": "row"}]


def test_a_parquet_upload_streams_by_record_batch(alice, tmp_path):
    """One 20 MB row group: pyarrow holds about a batch at a time, Python a few MB."""
    import tracemalloc

    import pyarrow as pa
    from django.core.files import File

    from training import sources
    from webapp.datasets.services import upload_dataset

    path = tmp_path / "big.parquet"
    path.write_bytes(_parquet_bytes([{"text": os.urandom(500).hex()} for _ in range(20_000)], row_group_size=10**9))
    peak_arrow = 0
    original = sources._table_rows

    def watched(batches):
        nonlocal peak_arrow
        for item in original(batches):
            peak_arrow = max(peak_arrow, pa.total_allocated_bytes())
            yield item

    tracemalloc.start()
    with pytest.MonkeyPatch.context() as mp, path.open("rb") as f:
        mp.setattr(sources, "_table_rows", watched)
        result = upload_dataset(alice[1], alice[0], File(f, name="big.parquet"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result.dataset.rows == 20_000
    size = path.stat().st_size
    assert peak_arrow < size / 3 and peak < 8 * 2**20, (peak_arrow, peak, size)


def test_a_file_named_parquet_that_is_not_is_refused_with_a_reason(alice_client):
    upload = SimpleUploadedFile("fake.parquet", jsonl([CHAT_ROW]) + b"not parquet")
    response = alice_client.post("/datasets/", {"file": upload})
    page = response.content.decode()
    assert response.status_code == 400 and "can&#x27;t read the Parquet file" in page
    assert Dataset.objects.count() == 0


def test_a_completion_row_cut_into_samples_is_shown_cut(alice, alice_client, tiny_model_dir):
    """The trainer sees each sequence_len chunk of a long text alone; the preview marks where it is cut."""
    from webapp.datasets.services import upload_dataset

    text = " ".join(f"word{i}" for i in range(60))
    upload = SimpleUploadedFile("long.jsonl", jsonl([{"text": text}]))
    dataset = upload_dataset(alice[1], alice[0], upload, name="long").dataset
    page = alice_client.get(f"/datasets/{dataset.pk}/preview/?row=0&sequence_len=32").content.decode()
    samples = int(re.search(r"cut into (\d+) samples", page).group(1))
    assert samples > 1 and page.count('class="sample-break') == samples and f"sample {samples} of {samples}" in page
    api = alice_client.get(f"/api/datasets/{dataset.pk}/rows/0/preview?sequence_len=32").json()
    assert {t["sample"] for t in api["tokens"]} == set(range(samples))


def test_the_api_tells_an_empty_file_it_has_no_rows_and_an_unknown_format_its_choices(alice_client):
    empty = alice_client.post("/api/datasets/", {"file": SimpleUploadedFile("empty.jsonl", b"")})
    assert empty.status_code == 400 and empty.json()["message"].startswith("no rows in the file")
    assert empty.json()["field"] == "file"  # what to fix: the file, its name, or an option
    named = alice_client.post(
        "/api/datasets/", {"file": SimpleUploadedFile("c.jsonl", jsonl([CHAT_ROW])), "name": "a\tb"}
    )
    assert named.status_code == 400 and named.json()["field"] == "name"
    odd = alice_client.post("/api/datasets/", {"file": SimpleUploadedFile("c.jsonl", jsonl([CHAT_ROW])), "format": "x"})
    assert odd.status_code == 422 and "chat_template" in odd.json()["message"]  # the schema lists the formats
