"""What the dataset pages show of the rows themselves."""

from __future__ import annotations

import html
import json

import pytest

pytestmark = pytest.mark.django_db


def test_first_rows_and_the_raw_row_are_json_as_uploaded(alice_client, alice_dataset):
    detail = html.unescape(alice_client.get(f"/datasets/{alice_dataset.pk}/").content.decode())
    assert '"messages": [' in detail and "{'messages'" not in detail
    preview = html.unescape(alice_client.get(f"/datasets/{alice_dataset.pk}/preview/?row=0").content.decode())
    raw = preview.split('<pre class="row-json">')[1].split("</pre>")[0]
    assert isinstance(json.loads(raw)["messages"], list)


@pytest.mark.parametrize("body", [b"", b"\n\n  \n"])
def test_an_empty_file_is_told_it_has_no_rows(alice_client, body):
    from django.core.files.uploadedfile import SimpleUploadedFile

    page = alice_client.post("/datasets/", {"file": SimpleUploadedFile("empty.jsonl", body)})
    text = html.unescape(page.content.decode())
    assert page.status_code == 400 and "no rows in the file" in text
    assert "keep only the valid rows" not in text.split('id="upload-errors"')[1]  # no advice that can't help
