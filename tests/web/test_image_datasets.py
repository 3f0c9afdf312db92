"""Chats with images: uploads keep the images in their rows (Parquet with image bytes, or a .zip of the rows and
their image files), and the preview shows each image where its placeholder tokens are, masked."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import zipfile

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

pytestmark = pytest.mark.django_db(transaction=True)


def png(width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def chat(i: int) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "text", "text": f"What is in picture {i}?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"Noise number {i}."}]},
    ]


SIZES = [(32, 32), (64, 64), (48, 24)]


@pytest.fixture
def qwen_vl(data_dir):
    from training.architectures import build_tiny

    return build_tiny("qwen3_5", data_dir / "models" / "tiny-qwen3_5").name


def parquet_upload(n: int = 3) -> SimpleUploadedFile:
    """llava-instruct-mix-vsft's layout, as Hugging Face datasets writes its Parquet: images as {bytes, path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": chat(i), "images": [{"bytes": png(*SIZES[i % 3], i), "path": f"{i}.png"}]} for i in range(n)]
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return SimpleUploadedFile("llava.parquet", out.getvalue())


def zip_upload(rows: list[dict], files: dict[str, bytes], data_name: str = "data/rows.jsonl") -> SimpleUploadedFile:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr(data_name, "".join(json.dumps(r) + "\n" for r in rows))
        for name, data in files.items():
            z.writestr(name, data)
    return SimpleUploadedFile("llava.zip", out.getvalue())


def upload(alice, file, **kw):
    from webapp.datasets.services import upload_dataset

    user, workspace = alice
    return upload_dataset(workspace, user, file, **kw)


def test_a_parquet_upload_keeps_its_image_bytes_in_the_rows(alice):
    from webapp.datasets.storage import read_row

    dataset = upload(alice, parquet_upload()).dataset
    assert (dataset.rows, dataset.images, dataset.format) == (3, 3, "chat_template")
    row = read_row(dataset, 1)
    assert base64.b64decode(row["images"][0]["bytes"]) == png(64, 64, 1)  # the exact bytes, not text
    parts = [[{k: v for k, v in p.items() if v is not None} for p in m["content"]] for m in row["messages"]]
    assert row["images"][0]["path"] == "1.png" and parts == [m["content"] for m in chat(1)]


def test_a_zip_upload_reads_image_paths_beside_its_data_file(alice):
    from webapp.datasets.storage import read_row

    rows = [dict(messages=chat(i), images=[f"images/{i}.png"]) for i in range(3)]
    files = {f"data/images/{i}.png": png(*SIZES[i], i) for i in range(3)}
    dataset = upload(alice, zip_upload(rows, files)).dataset
    assert (dataset.rows, dataset.images) == (3, 3)
    stored = read_row(dataset, 2)["images"][0]
    assert base64.b64decode(stored["bytes"]) == png(48, 24, 2) and stored["path"] == "images/2.png"


@pytest.mark.parametrize(
    "image, words",
    [
        ("../../secret.png", "no image '../../secret.png' in the zip (paths are read beside data/rows.jsonl)"),
        ("/etc/passwd", "no image '/etc/passwd' in the zip"),
        ("images/missing.png", "no image 'images/missing.png' in the zip"),
        ("images/not-an-image.png", "not a readable image"),
    ],
)
def test_a_zip_row_whose_image_isnt_there_is_refused_at_its_field(alice, image, words):
    from webapp.datasets.intake import UploadRejected

    files = {"data/images/0.png": png(32, 32), "data/images/not-an-image.png": b"text", "secret.png": png(8, 8)}
    rows = [dict(messages=chat(0), images=["images/0.png"]), dict(messages=chat(1), images=[image])]
    with pytest.raises(UploadRejected) as refused:
        upload(alice, zip_upload(rows, files))
    [problem] = refused.value.report.problems
    assert (problem.line, problem.field) == (2, "images[0]") and words in problem.message


def test_a_zip_must_hold_one_data_file_and_rows_alone_cant_name_image_files(alice):
    from webapp.datasets.intake import UploadRejected

    two = zip_upload([dict(messages=chat(0))], {"other.jsonl": b"{}\n"})
    with pytest.raises(UploadRejected, match="holds one data file .* found data/rows.jsonl, other.jsonl"):
        upload(alice, two)
    row = json.dumps(dict(messages=chat(0), images=["images/0.png"])) + "\n"
    alone = SimpleUploadedFile("rows.jsonl", row.encode())
    with pytest.raises(UploadRejected) as refused:
        upload(alice, alone)
    [problem] = refused.value.report.problems
    assert problem.field == "images[0]" and "upload a .zip of the data file with its images" in problem.message


def test_the_preview_shows_each_image_where_its_masked_tokens_are(alice_client, alice, qwen_vl):
    dataset = upload(alice, parquet_upload()).dataset
    page = alice_client.get(f"/datasets/{dataset.pk}/preview/?row=1&model={qwen_vl}").content.decode()
    block = page.split('id="image-A-0-0"')[1].split("</span></span>")[0]
    src = re.search(r'<img src="data:image/png;base64,([^"]+)"', block).group(1)
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(src))).size == (64, 64)
    caption = html.unescape(block)
    assert "image 1 · 64×64 · 16× <|image_pad|> masked" in caption
    # the 16 placeholder tokens are there (masked, not trained), drawn as the image instead of one by one
    pads = re.findall(r'<span class="tok (\w+) special image-pad" title="id (\d+) · label (-?\d+)', page)
    assert len(pads) == 16 and {(kind, label) for kind, _, label in pads} == {("masked", "-100")}
    assert page.count('class="tok trained') > 3  # the answer trains
    raw = html.unescape(page.split('class="row-json"')[1].split("</pre>")[0])
    assert "KiB of image bytes" in raw and png(64, 64, 1)[:8].hex() not in raw and len(raw) < 4000


def test_the_preview_asks_for_a_vision_language_model(alice_client, alice, tiny_model_dir):
    dataset = upload(alice, parquet_upload()).dataset
    page = alice_client.get(f"/datasets/{dataset.pk}/preview/?row=0&model=tiny-chat").content.decode()
    error = html.unescape(page.split('class="error-box"')[1].split("</div>")[0])
    assert "this dataset's rows have images: encode them with a vision-language model" in error


def test_an_uploaded_image_dataset_trains_as_the_preview_shows_it(alice, qwen_vl, data_dir):
    """The trainer reads the stored rows (images in them) and encodes each as the preview does."""
    from training.config import parse_config
    from training.modeling import load_tokenizer
    from training.multimodal import load_processor
    from training.train import prepare_data
    from webapp.datasets.encoding import EncodeOptions
    from webapp.datasets.preview import preview_row

    dataset = upload(alice, parquet_upload()).dataset
    config = parse_config(
        {
            "base_model": str(data_dir / "models" / qwen_vl),
            "processor_type": "AutoProcessor",
            "skip_prepare_dataset": True,
            "datasets": [{"path": str(dataset.path), "type": "chat_template"}],
            "sequence_len": 256,
        }
    )
    tokenizer = load_tokenizer(config)
    data = prepare_data(config, tokenizer, None, load_processor(config, tokenizer))
    assert sorted(len(f["images"]) for f in data.train) == [1, 1, 1]
    options = EncodeOptions.from_config(config, dataset.name, [str(data_dir / "models" / qwen_vl)])
    previews = [[t.id for t in preview_row(dataset, i, options).tokens] for i in range(3)]
    assert sorted(previews) == sorted(f["input_ids"] for f in data.train)


def test_the_dataset_page_encodes_image_rows_with_a_vision_language_model(
    alice_client, alice, qwen_vl, tiny_model_dir, django_capture_on_commit_callbacks
):
    """Its default model is one that sees images (tiny-chat sorts first otherwise), its statistics count the
    image tokens, and its first rows show image sizes instead of base64."""
    dataset = upload(alice, parquet_upload()).dataset
    with django_capture_on_commit_callbacks(execute=True):
        page = alice_client.get(f"/datasets/{dataset.pk}/").content.decode()
    assert f"<option selected>{qwen_vl}</option>" in page
    assert 'id="image-count">3<' in page and "KiB of image bytes" in page and "iVBORw0KGgo" not in page
    stats = alice_client.get(f"/datasets/{dataset.pk}/stats.json").json()
    assert stats["status"] == "done", stats
    lengths = stats["result"]
    assert lengths["rows"] == 3 and lengths["dropped"] == {}
    assert lengths["max_length"] == 59  # the 64x64 image's row: 16 image tokens in it (the preview shows 59 too)


def test_a_config_on_an_image_dataset_needs_processor_type(alice_client, alice, qwen_vl):
    dataset = upload(alice, parquet_upload()).dataset
    text = f"base_model: {qwen_vl}\ndatasets:\n  - path: {dataset.name}\n    type: chat_template\nsequence_len: 128\n"
    answer = alice_client.post("/api/configs/validate", {"yaml": text}, content_type="application/json").json()
    assert [e["path"] for e in answer["errors"]] == ["datasets[0].path"]
    assert "has images in its rows: train on them with processor_type: AutoProcessor" in answer["errors"][0]["message"]
    vision = text + "processor_type: AutoProcessor\nskip_prepare_dataset: true\n"
    assert alice_client.post("/api/configs/validate", {"yaml": vision}, content_type="application/json").json()["valid"]
