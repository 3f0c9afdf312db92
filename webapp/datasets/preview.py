"""The masked-label preview: one row through the trainer's own encoder, shown token by token."""

from __future__ import annotations

from dataclasses import dataclass, field

from training.encode import IGNORE_INDEX, Dropped
from webapp.datasets import images
from webapp.datasets.encoding import EncodeOptions, make_encoder
from webapp.datasets.models import Dataset
from webapp.datasets.storage import read_row


@dataclass
class Token:
    id: int
    text: str  # whitespace made visible
    label: int
    trained: bool
    special: bool
    part: str
    thinking: bool = False  # part of a reasoning trace (the chat format names such parts "... thinking")
    sample: int = 0  # which of the row's samples it is in: a completion row over sequence_len is cut into several
    image: int = -1  # an image placeholder token: which of the row's images it stands for (masked, never trained)
    picture: RowImage | None = None  # on the first token of an image: the image itself, shown in its place


@dataclass
class RowImage:
    src: str  # a data: URI of a thumbnail (PNG, re-encoded here)
    width: int
    height: int
    tokens: int  # how many placeholder tokens stand for it


@dataclass
class Preview:
    row: int
    raw: dict
    tokens: list[Token]
    trained: int
    dropped: str | None
    warnings: list[str]
    truncated: bool = False
    samples: int = 1  # the trainer sees each sample alone (in its own sequence or packed bin slot)
    dropped_samples: list[int] = field(default_factory=list)  # which of them it never sees


def visible(text: str) -> str:
    return text.replace(" ", "\u00b7").replace("\n", "\u21b5").replace("\t", "\u2192")


def preview_row(dataset: Dataset, index: int, options: EncodeOptions) -> Preview:
    encoder = make_encoder(dataset, options)
    tokenizer = encoder.tokenizer
    raw = read_row(dataset, index)
    outcomes = encoder.encode_row(raw, index)
    image_id = getattr(encoder, "image_token_id", None)  # image rows (training/multimodal.py)
    specials = set(tokenizer.all_special_ids)
    tokens, dropped, trained, truncated, dropped_samples, samples = [], None, 0, False, [], 0
    for outcome in outcomes:
        sample = outcome.sample if isinstance(outcome, Dropped) else outcome
        if isinstance(outcome, Dropped):
            dropped = f"{outcome.reason}: {outcome.detail}"
            dropped_samples.append(samples)
        if sample is None:
            continue
        samples += 1
        truncated = truncated or sample.truncated
        first = len(tokens)
        for token_id, label, part in zip(sample.input_ids, sample.labels, sample.token_parts):
            is_trained = label != IGNORE_INDEX
            trained += is_trained
            tokens.append(
                Token(
                    token_id,
                    visible(tokenizer.decode([token_id])),
                    label,
                    is_trained,
                    token_id in specials,
                    sample.parts[part] if part >= 0 else "template",
                    part >= 0 and sample.parts[part].endswith(" thinking"),
                    samples - 1,
                )
            )
        if image_id is not None and sample.images:
            _place_images(tokens[first:], image_id, sample.images)
    raw = images.row_images_summary(raw) if dataset.images else raw  # the raw row without its base64
    return Preview(
        index, raw, tokens, trained, dropped, encoder.warnings(), truncated, max(samples, 1), dropped_samples
    )


def _place_images(tokens: list[Token], image_id: int, pictures: list) -> None:
    """Each run of image placeholder tokens is one image, in order: mark its tokens, and put the image itself on
    the run's first token, so the page shows the image where its tokens are."""
    k, previous = -1, False
    for token in tokens:
        is_image = token.id == image_id
        if is_image and not previous:
            k += 1
            if k < len(pictures):
                token.picture = RowImage(*images.thumbnail(pictures[k]), tokens=0)
        if is_image:
            token.image = k
        previous = is_image
    for token in tokens:  # how many tokens each image took, on its first one
        if token.picture is not None:
            token.picture.tokens = sum(1 for t in tokens if t.image == token.image)
