"""Images in uploads: each image is stored inside its row, so a dataset stays one JSONL file whose lines are
whole examples (the preview, the statistics and the runs read a row and have its images).

What a user of llava-style data brings, and how it is read:
- Parquet as Hugging Face `datasets` writes it (HuggingFaceH4/llava-instruct-mix-vsft): an Image column of
  {bytes, path} structs; the bytes are kept (as base64 in the JSON line);
- a .zip holding one data file (JSONL, JSON, Parquet or CSV) and its image files, the rows naming images by
  paths relative to the data file (LLaVA's own layout); each named file is read from the zip into its row;
- JSON lines whose images are already in them: {bytes: base64}, or a data: URI.
A JSONL uploaded alone that names image files is refused row by row with that advice: the server never reads
paths on its own disk for an upload.
"""

from __future__ import annotations

import posixpath
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from training.formats import FORMATS, RowProblem
from training.multimodal import IMAGE_COLUMNS, ImageProblem, embed_images, has_images, image_row, resolve_image
from training.multimodal import NoPlaceholders as _NoPlaceholders
from training.rows import FileRefused
from webapp.datasets.models import dataset_dir

DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".csv")

Reader = Callable[[Any, str], bytes]


def no_files(ref: Any, field: str) -> bytes:
    """The reader of an upload without image files: images must be in the rows."""
    path = _path_of(ref)
    if path is not None:
        raise ImageProblem(
            field,
            f"{path!r} names an image file, but only the rows were uploaded: upload a .zip of the data file with "
            "its images (paths relative to the data file), or Parquet with the image bytes",
        )
    return _bytes(ref, field)


def _path_of(ref: Any) -> str | None:
    if isinstance(ref, str) and not ref.startswith(("data:", "http://", "https://")):
        return ref
    if isinstance(ref, dict) and ref.get("bytes") is None and isinstance(ref.get("path"), str):
        return ref["path"]
    return None


def _bytes(ref: Any, field: str) -> bytes:
    image = resolve_image(ref, [], field)  # bytes, base64, a data: URI; a URL is refused with its reason
    if isinstance(image, bytes):
        return image
    raise ImageProblem(field, "an image must be bytes, base64 or a data: URI here")


class ZipUpload:
    """A .zip of one data file and the images its rows name. The data file is extracted (bounded) for the
    ordinary readers; images are read from the zip as rows ask for them."""

    def __init__(self, raw: IO[bytes], inflated_limit: int):
        try:
            self.zip = zipfile.ZipFile(raw)
            members = [i for i in self.zip.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
        except (zipfile.BadZipFile, OSError) as exc:
            raise FileRefused(f"not a readable zip file: {exc}") from None
        if sum(i.file_size for i in members) > inflated_limit:
            raise FileRefused(f"the zip inflates past {inflated_limit:,} bytes; upload its parts in smaller zips")
        self.members = {i.filename: i for i in members}
        data = [n for n in self.members if n.lower().endswith(DATA_SUFFIXES)]
        if len(data) != 1:
            found = ", ".join(sorted(data)[:5]) or "none"
            raise FileRefused(
                f"a zip upload holds one data file (.jsonl, .json, .parquet, .csv) beside its images; found {found}"
            )
        self.data_name = data[0]
        self.base = posixpath.dirname(self.data_name)

    def extract_data(self) -> tuple[IO[bytes], int]:
        """The data file as a temporary file (deleted when closed), and its size."""
        out = tempfile.TemporaryFile(dir=dataset_dir())
        with self.zip.open(self.data_name) as member:
            while chunk := member.read(1024 * 1024):
                out.write(chunk)
        size = out.tell()
        out.seek(0)
        return out, size

    def read(self, ref: Any, field: str) -> bytes:
        path = _path_of(ref)
        if path is None:
            return _bytes(ref, field)
        name = posixpath.normpath(posixpath.join(self.base, path.replace("\\", "/")))
        if path.startswith("/") or name.startswith("../") or name not in self.members:
            where = f"beside {self.data_name}" if self.base else "at the top of the zip"
            raise ImageProblem(field, f"no image {path!r} in the zip (paths are read {where})")
        return self.zip.read(name)


def stored_row(row: dict, spec, read: Reader) -> tuple[dict, int, list[RowProblem]]:
    """(the row as it is stored, with its images in it; how many images; its problems). The row's text is
    checked as its format checks text rows, each image part standing in as text."""
    try:
        stored, count = embed_images(row, spec, read)
        text_view = image_row(stored, spec, _NoPlaceholders(), _embedded)[0]
    except ImageProblem as problem:
        return row, 0, [RowProblem(problem.field, problem.message)]
    return stored, count, FORMATS[spec.format_name].check(text_view, spec)


def _embedded(ref: Any, field: str) -> bytes:
    return _bytes(ref, field)


def carries_images(row: dict, spec) -> bool:
    return spec.format_name == "chat_template" and has_images(row, spec)


def row_images_summary(row: dict) -> dict:
    """The row for display: each image's base64 replaced by a short note (the raw JSON would be mostly base64)."""
    shown = dict(row)
    for key in IMAGE_COLUMNS:
        if isinstance(row.get(key), list):
            shown[key] = [_note(i) for i in row[key]]
    return _walk_parts(shown)


def _note(image: Any) -> Any:
    if isinstance(image, dict) and isinstance(image.get("bytes"), str):
        kib = len(image["bytes"]) * 3 // 4 // 1024
        return {**image, "bytes": f"<{kib} KiB of image bytes>"}
    return image


def _walk_parts(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (_note(v) if k == "image" else _walk_parts(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk_parts(v) for v in value]
    return value


def is_zip(head: bytes, filename: str) -> bool:
    return head[:4] == b"PK\x03\x04" or Path(filename).suffix.lower() == ".zip"


THUMBNAIL_PIXELS = 256  # the longer side of an image shown in the preview


def thumbnail(image: Any) -> tuple[str, int, int]:
    """(a data: URI of the image, re-encoded as a small PNG, its width, its height) for the preview: what the
    page shows is always a fresh PNG made here, never the uploaded bytes."""
    import base64
    import io

    from training.multimodal import open_image

    picture = open_image(image)
    width, height = picture.size
    picture.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(out.getvalue()).decode('ascii')}", width, height


def models_for(dataset, models: list[str]) -> list[str]:
    """The server's model folders, vision-language ones (shipping an image processor) first for a dataset with
    images: what its pages encode with unless the user picks another."""
    if not dataset.images:
        return models
    from webapp.base_models import resolve_base_model

    def sees_images(name: str) -> bool:
        folder = Path(resolve_base_model(name))
        return any((folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json"))

    return sorted(models, key=lambda name: not sees_images(name))
