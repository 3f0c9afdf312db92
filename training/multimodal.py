"""Image + text rows for vision-language models (`processor_type`), read as axolotl's multimodal path reads them.

A row is a chat whose contents may be lists of parts, `{"type": "text", "text": ...}` or `{"type": "image"}`,
with the row's images in an `images` column (HuggingFaceH4/llava-instruct-mix-vsft's layout): the k-th bare
image part takes the k-th image, and images no part asks for go at the end of the first user turn, as axolotl
does. An image is a file path (relative to the data file's folder), bytes, `{"bytes", "path"}` as Hugging
Face datasets store an Image column in Parquet, a `data:` URI, or a PIL image.

Each image part becomes the text the chat template prints for an image, with the processor's image token
repeated as often as the processor gives an image of that size: what the processor itself does to the text
before it tokenizes. The one Encoder then renders, tokenizes and masks the row like any text, and the image
tokens never train. The pixels come from the model's image processor, a batch at a time in the collator
(`skip_prepare_dataset: true`) or once before training.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from training.encode import Dropped, Encoded, Encoder
from training.modeling import ModelNotFound
from training.rows import LineProblem
from training.train import Collator

IMAGE_COLUMNS = ("images", "image")  # axolotl's possible_image_keys
_PART_REFS = ("image", "path", "url", "base64", "image_url")  # a part that carries its own image
_OTHER_MEDIA = ("video", "audio", "input_audio")
# Markers around the probe image part: private-use characters no template prints by itself.
_PROBE_A, _PROBE_B = "\ue000trainyard-a\ue000", "\ue000trainyard-b\ue000"


class ImageProblem(ValueError):
    """A row's image can't be used; `field` is where in the row (e.g. "images[1]", "messages[0].content[2]")."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class ProcessorNotUsable(ModelNotFound):
    """The model's processor, or this chat template, can't turn image parts into tokens."""


# -- the processor ---------------------------------------------------------------------------


def load_processor(config, tokenizer):
    """The model's processor (`processor_type`, with `processor_kwargs`), holding the run's tokenizer as axolotl
    sets it."""
    from training.modeling import _source

    return load_processor_for(
        _source(config.base_model),
        tokenizer,
        config.processor_type,
        config.processor_kwargs,
        trust_remote_code=config.trust_remote_code,
    )


def load_processor_for(
    source: str, tokenizer, processor_type: str = "AutoProcessor", processor_kwargs=None, trust_remote_code=False
):
    """The processor of the model at `source` (a folder or hub id). A processor whose video part needs
    torchvision (Qwen3.5's, via Qwen3VLProcessor) is built without it where torchvision doesn't import: its
    image processor is PIL's, and video rows are refused anyway."""
    import transformers

    cls = getattr(transformers, processor_type, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ProcessorNotUsable(f"processor_type: transformers has no processor class {processor_type!r}")
    kwargs = dict(processor_kwargs or {})
    try:
        processor = cls.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
        processor = _without_video(source, tokenizer, kwargs, trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ProcessorNotUsable(f"processor_type: can't load a processor from {source!r}: {exc}") from None
    if getattr(processor, "image_processor", None) is None or not getattr(processor, "image_token", None):
        raise ProcessorNotUsable(
            f"processor_type: {type(processor).__name__} of {source!r} has no image processor and image token "
            "(is there a preprocessor_config.json?)"
        )
    processor.tokenizer = tokenizer
    return processor


def _without_video(source: str, tokenizer, kwargs: dict, trust_remote_code: bool):
    import inspect

    import transformers
    from transformers import AutoImageProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    from training.architectures import read_model_config

    model_type = (read_model_config(source) or {}).get("model_type")
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if name else None
    if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
        raise ProcessorNotUsable(
            f"processor_type: the processor of {source!r} needs torchvision, which isn't installed"
        )
    image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **rest):
        # ProcessorMixin zips the arguments with the attributes of this class: the video one is left out.
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **rest)

    images_only = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    return images_only(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def source_dirs(source) -> list[Path]:
    """Where a dataset's image paths are looked up: the folders of its data files (none for a Hub dataset,
    whose images are bytes)."""
    files = [path for found in source.splits.values() for path, _kind in found]
    return list(dict.fromkeys(Path(path).resolve().parent for path in files))


def masked_token_ids(processor) -> frozenset[int]:
    """Placeholder tokens that stand for pixels: never trained (axolotl's Qwen3.5 strategy masks image and video)."""
    ids = list(getattr(processor, "image_token_ids", []) or []) + list(getattr(processor, "video_token_ids", []) or [])
    return frozenset(i for i in ids if isinstance(i, int))


# -- images ----------------------------------------------------------------------------------


def resolve_image(ref: Any, dirs: list[Path], field: str, confine: bool = False):
    """An image reference as it can be kept until its batch: a Path, bytes or a PIL image. Paths are looked up
    as given, then in `dirs` (the data file's folder); `confine` keeps them inside `dirs` (server uploads)."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, dict):
        if ref.get("bytes") is not None:
            return _as_bytes(ref["bytes"], field)
        if ref.get("path"):
            return _find(str(ref["path"]), dirs, field, confine)
        if isinstance(ref.get("url"), str):  # an OpenAI-style image_url part
            return resolve_image(ref["url"], dirs, field, confine)
        raise ImageProblem(field, "an image given as an object needs `bytes` or `path`")
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if isinstance(ref, str):
        if ref.startswith("data:"):
            return _as_bytes(ref.partition(",")[2], field)
        if ref.startswith(("http://", "https://")):
            raise ImageProblem(field, "images are not fetched from the network; store the image files with the data")
        return _find(ref, dirs, field, confine)
    raise ImageProblem(field, f"an image must be a file path, bytes or {{bytes, path}}, not {type(ref).__name__}")


def _as_bytes(value, field: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ImageProblem(field, "image bytes given as text must be base64") from None


def _find(path: str, dirs: list[Path], field: str, confine: bool) -> Path:
    given = Path(path).expanduser()
    # A relative path is the data file's first (what a dataset folder means), then the working directory's
    # (axolotl's load_image reads it from there); `confine` allows only the data's folders.
    candidates = [d / given for d in dirs] if confine or not given.is_absolute() else []
    if not confine:
        candidates.append(given)
    for candidate in candidates:
        if confine and not any(candidate.resolve().is_relative_to(d.resolve()) for d in dirs):
            continue
        if candidate.is_file():
            return candidate
    where = f" (looked beside the data in {', '.join(str(d) for d in dirs)})" if dirs else ""
    raise ImageProblem(field, f"no image file {path!r}{where}")


def open_image(ref):
    """The image as the processor gets it: RGB, turned as its EXIF orientation says (as transformers' load_image)."""
    from PIL import Image, ImageOps

    image = ref if isinstance(ref, Image.Image) else Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
    return ImageOps.exif_transpose(image).convert("RGB")


def image_size(ref, field: str) -> tuple[int, int]:
    """(width, height) after the EXIF orientation, from the file's header only."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(ref, Image.Image):
        return _turned(ref.size, ref.getexif().get(0x0112))
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as image:  # reads the header only
            return _turned(image.size, image.getexif().get(0x0112))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageProblem(field, f"not a readable image: {exc}") from None


def _turned(size: tuple[int, int], orientation) -> tuple[int, int]:
    width, height = size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # 5-8: turned a quarter


# -- rows ------------------------------------------------------------------------------------


def template_image_text(template: str, template_kwargs: dict) -> str:
    """What the chat template prints for an image part (Qwen3.5: <|vision_start|><|image_pad|><|vision_end|>)."""
    from training.formats.jinja_env import compile_template

    parts = [{"type": "text", "text": _PROBE_A}, {"type": "image"}, {"type": "text", "text": _PROBE_B}]
    try:
        text = compile_template(template).render(
            messages=[{"role": "user", "content": parts}], add_generation_prompt=False, **template_kwargs
        )
    except Exception as exc:  # noqa: BLE001 - any template error means the same to the user
        raise ProcessorNotUsable(f"the chat template can't render an image part: {exc}") from None
    a, b = text.find(_PROBE_A), text.find(_PROBE_B)
    if a < 0 or b < 0:
        raise ProcessorNotUsable("the chat template doesn't print contents given as parts")
    return text[a + len(_PROBE_A) : b]


class ImagePlaceholders:
    """The text an image part becomes: the template's own image text with the processor's image token repeated
    as the processor does for an image of that size. The count depends on the size alone, so it is worked out
    once per size (on a blank image: the pixels are the collator's job)."""

    def __init__(self, processor, template: str, template_kwargs: dict):
        self.processor = processor
        self.token = processor.image_token
        text = template_image_text(template, template_kwargs)
        if text.count(self.token) != 1:
            raise ProcessorNotUsable(
                f"the chat template prints {text!r} for an image part, not the processor's image token "
                f"{self.token!r} once; use the model's own chat template"
            )
        self.before, self.after = text.split(self.token)
        self.forbidden = [t for t in (self.token, getattr(processor, "video_token", None)) if t]
        self._by_size: dict[tuple[int, int], tuple[str, int]] = {}

    def text(self, size: tuple[int, int]) -> tuple[str, int]:
        """(the text, how many image tokens it holds) for an image of `size` (width, height)."""
        found = self._by_size.get(size)
        if found is None:
            from PIL import Image

            _, replacements = self.processor._process_images([Image.new("RGB", size)])
            expanded = replacements[0]
            found = (self.before + expanded + self.after, expanded.count(self.token))
            if len(self._by_size) < 100_000:
                self._by_size[size] = found
        return found


class NoPlaceholders:
    """Where no processor is at hand (an upload's checks): an image part becomes no text at all."""

    forbidden: list[str] = []

    def text(self, size: tuple[int, int]) -> tuple[str, int]:
        return "", 0


def image_row(row: dict, spec, placeholders: ImagePlaceholders | NoPlaceholders, resolve: Callable[[Any, str], Any]):
    """(the row with every image part turned into text, its images in the order they appear, the image tokens
    of each). Text parts are joined into one string content (per-part `train` flags keep the parts).
    `resolve(reference, field)` gives an image as it is kept (resolve_image, or an upload's reader)."""
    messages = row.get(spec.field_messages)
    column = next((row[k] for k in IMAGE_COLUMNS if row.get(k) is not None), None)
    column = [] if column is None else list(column) if isinstance(column, (list, tuple)) else [column]
    text_row = {k: v for k, v in row.items() if k not in IMAGE_COLUMNS}
    if not isinstance(messages, list):
        return text_row, [], []  # the encoder says what is wrong with the messages
    content_key = spec.message_property_mappings.get("content", "content")
    role_key = spec.message_property_mappings.get("role", "role")
    forbidden = placeholders.forbidden
    per_message: list[list] = [[] for _ in messages]
    new_messages, taken = [], 0
    for i, msg in enumerate(messages):
        where = f"{spec.field_messages}[{i}].{content_key}"
        content = msg.get(content_key) if isinstance(msg, dict) else None
        if isinstance(content, str):
            _no_placeholder(content, forbidden, where)
        if not isinstance(content, list):
            new_messages.append(msg)
            continue
        parts, flagged = [], any(isinstance(p, dict) and ("train" in p or "weight" in p) for p in content)
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                parts.append(part)  # reported by the chat template format
                continue
            kind = part.get("type")
            if kind in _OTHER_MEDIA or any(part.get(k) is not None for k in _OTHER_MEDIA):
                what = kind or "video"
                raise ImageProblem(f"{where}[{j}]", f"{what} parts aren't supported; Trainyard trains on images")
            own = next((part[k] for k in _PART_REFS if part.get(k) is not None), None)
            if kind == "image" or own is not None:
                if own is None:
                    if taken >= len(column):
                        raise ImageProblem(f"{where}[{j}]", f"an image part with no image: the row has {len(column)}")
                    own, field, taken = column[taken], f"{IMAGE_COLUMNS[0]}[{taken}]", taken + 1
                else:
                    field = f"{where}[{j}]"
                image = resolve(own, field)
                text, count = placeholders.text(image_size(image, field))
                per_message[i].append((image, count))
                parts.append({"type": "text", "text": text, **({"train": False} if flagged else {})})
                continue
            text = part.get("text")
            if isinstance(text, str):
                _no_placeholder(text, forbidden, f"{where}[{j}].text")
            parts.append({k: v for k, v in part.items() if v is not None})
        new_messages.append({**msg, content_key: parts if flagged else _joined(parts)})
    leftovers = column[taken:]
    if leftovers:  # axolotl: an image no part asks for goes at the end of the first user turn
        first = next((i for i, m in enumerate(new_messages) if isinstance(m, dict) and m.get(role_key) == "user"), 0)
        texts = []
        for k, ref in enumerate(leftovers, start=taken):
            image = resolve(ref, f"{IMAGE_COLUMNS[0]}[{k}]")
            text, count = placeholders.text(image_size(image, f"{IMAGE_COLUMNS[0]}[{k}]"))
            per_message[first].append((image, count))
            texts.append(text)
        msg = new_messages[first]
        content = msg.get(content_key)
        if isinstance(content, list):
            content = content + [{"type": "text", "text": t} for t in texts]
        else:
            content = (content or "") + "".join(texts)
        new_messages[first] = {**msg, content_key: content}
    text_row[spec.field_messages] = new_messages
    images = [pair for found in per_message for pair in found]
    return text_row, [image for image, _ in images], [count for _, count in images]


def _is_image_part(part) -> bool:
    return isinstance(part, dict) and (part.get("type") == "image" or any(part.get(k) is not None for k in _PART_REFS))


def has_images(row: dict, spec) -> bool:
    """Whether a row carries images: an images column, or image parts in its messages."""
    if any(row.get(k) for k in IMAGE_COLUMNS):
        return True
    messages = row.get(spec.field_messages)
    content_key = spec.message_property_mappings.get("content", "content")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get(content_key), list) and any(_is_image_part(p) for p in m[content_key])
        for m in messages
    )


def embed_images(row: dict, spec, read: Callable[[Any, str], bytes]) -> tuple[dict, int]:
    """(the row with each image carried in it as {"bytes": base64, "path": its name}, how many): how uploaded
    rows are stored, one JSON line holding a whole example. `read(reference, field)` gives an image's bytes;
    each must be a readable image. The row's structure is checked as the encoder will read it (ImageProblem)."""

    def stored(ref, field: str) -> dict:
        data = read(ref, field)
        image_size(data, field)
        name = ref.get("path") if isinstance(ref, dict) else ref if isinstance(ref, str) and "," not in ref else None
        return {"bytes": base64.b64encode(data).decode("ascii"), "path": name if isinstance(name, str) else None}

    out, count = dict(row), 0
    key = next((k for k in IMAGE_COLUMNS if row.get(k) is not None), None)
    if key is not None:
        column = row[key] if isinstance(row[key], (list, tuple)) else [row[key]]
        out[key] = [stored(ref, f"{key}[{k}]") for k, ref in enumerate(column)]
        count += len(column)
    messages = row.get(spec.field_messages)
    content_key = spec.message_property_mappings.get("content", "content")
    if isinstance(messages, list):
        out[spec.field_messages] = new_messages = []
        for i, msg in enumerate(messages):
            content = msg.get(content_key) if isinstance(msg, dict) else None
            if not isinstance(content, list):
                new_messages.append(msg)
                continue
            parts = []
            for j, part in enumerate(content):
                own = next((k for k in _PART_REFS if isinstance(part, dict) and part.get(k) is not None), None)
                if own is None:
                    parts.append(part)
                    continue
                image = stored(part[own], f"{spec.field_messages}[{i}].{content_key}[{j}]")
                rest = {k: v for k, v in part.items() if k not in _PART_REFS}
                parts.append({**rest, "type": "image", "image": image})
                count += 1
            new_messages.append({**msg, content_key: parts})
    image_row(out, spec, NoPlaceholders(), lambda ref, field: _as_bytes(ref["bytes"], field))  # the structure
    return out, count


def _joined(parts: list) -> str | list:
    if all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
        return "".join(p["text"] for p in parts)
    return parts  # a malformed part: the chat template format reports it


def _no_placeholder(text: str, tokens: list[str], field: str) -> None:
    for token in tokens:
        if token in text:
            raise ImageProblem(field, f"the text holds the image placeholder token {token}; images go in image parts")


# -- encoding --------------------------------------------------------------------------------


class ImageEncoder(Encoder):
    """The Encoder for rows with images: each row's image parts become placeholder text first, the image
    tokens are never trained, and each sample keeps its images (`Encoded.images`) for the collator."""

    def __init__(self, tokenizer, spec, *, processor, image_dirs: Iterable[Path] = (), confine: bool = False, **kw):
        super().__init__(tokenizer, spec, **kw)
        if spec.format_name != "chat_template":
            raise ProcessorNotUsable(f"image rows are chats: use type: chat_template (not {spec.format_name})")
        self.placeholders = ImagePlaceholders(processor, self.settings.chat_template, self.settings.template_kwargs)
        self.masked_ids = masked_token_ids(processor)
        self.image_token_id = processor.image_token_id
        self.image_dirs, self.confine = list(image_dirs), confine

    def _resolve(self, ref, field: str):
        return resolve_image(ref, self.image_dirs, field, self.confine)

    def encode_rows(self, rows) -> list[Encoded | Dropped]:
        converted, images = [], {}
        for index, row in rows:
            if isinstance(row, dict):
                try:
                    row, found, counts = image_row(row, self.spec, self.placeholders, self._resolve)
                    images[index] = (found, counts)
                except ImageProblem as problem:
                    row = LineProblem(index + 1, problem.field, problem.message)
            converted.append((index, row))
        outcomes = super().encode_rows(converted)
        return [self._with_images(outcome, *images.get(outcome.row, ([], []))) for outcome in outcomes]

    def _with_images(self, outcome, found: list, counts: list[int]):
        """The sample with the images whose tokens it holds; a sample whose tokens and images disagree (a cut
        through an image, a template that left an image part out) is dropped: its pixels wouldn't fit."""
        if isinstance(outcome, Dropped):
            if outcome.sample is not None:
                outcome.sample.images = found  # for the preview
            return outcome
        if not found:
            return outcome
        present = outcome.input_ids.count(self.image_token_id)
        kept, total = 0, 0
        while kept < len(counts) and total + counts[kept] <= present:
            total, kept = total + counts[kept], kept + 1
        outcome.images = found[:kept]
        if total == present and (kept == len(counts) or outcome.truncated):
            return outcome  # a truncated sample keeps the images before the cut
        if outcome.truncated:
            return Dropped(outcome.row, "too_long", "truncating to sequence_len would cut an image's tokens", outcome)
        detail = f"{present} image tokens in the text, {sum(counts)} for its {len(counts)} image(s)"
        return Dropped(outcome.row, "invalid", f"the chat template didn't print every image part ({detail})", outcome)


# -- batches ---------------------------------------------------------------------------------


def pixel_inputs(processor, images: list) -> dict:
    """The image processor's tensors (pixel_values, image_grid_thw, ...) for these images, in order."""
    if not images:
        return {}
    processed = processor.image_processor(images=[open_image(i) for i in images], return_tensors="pt")
    return dict(processed)


def prepare_pixels(features: list[dict], processor) -> None:
    """skip_prepare_dataset: false: each sample's pixels made once, before training (kept in memory)."""
    for feature in features:
        if feature.get("images"):
            feature["pixels"] = pixel_inputs(processor, feature.pop("images"))


class ImageCollator(Collator):
    """Pads ids and labels as text batches are padded, and adds the pixels of the batch's images (made here
    from the images, or joined from pixels made before training) and the token types the model's rope needs."""

    def __init__(self, pad_id: int, processor, pad_to: int | None = None):
        super().__init__(pad_id, pad_to)
        self.processor = processor

    def __call__(self, features: list[dict]):
        import torch

        batch = super().__call__(features)
        images = [ref for f in features for ref in f.get("images") or []]
        made = [f["pixels"] for f in features if f.get("pixels")]
        if images:
            batch.update(pixel_inputs(self.processor, images))
        elif made:
            batch.update({key: torch.cat([m[key] for m in made]) for key in made[0]})
        if getattr(self.processor, "return_mm_token_type_ids", False):
            types = self.processor.create_mm_token_type_ids(batch["input_ids"].tolist())
            batch["mm_token_type_ids"] = torch.tensor(types)
        return batch
