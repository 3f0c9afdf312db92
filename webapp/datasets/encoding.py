"""The options a dataset is encoded under, and the trainer's encoder built from them.

`EncodeOptions` is the one declaration of those options: the pages parse it from their query (leniently:
a bad value falls back), the API takes it as its query schema (strictly: a bad value is a 422), the
statistics are cached under its `key()` and the worker reads it back from what the page stored. Past
the edge nobody parses options again; the preview, the statistics and the worker all encode through
`make_encoder`, built as the trainer builds its `Encoder`.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, Json, ValidationError, field_validator

from training.config import DatasetSpec
from training.encode import Encoder
from training.multimodal import ImageEncoder
from webapp.base_models import resolve_base_model
from webapp.datasets.models import Dataset

TrainOnEos = Literal["turn", "all", "last", "none"]
MIN_SEQUENCE_LEN = 9  # TrainConfig's own bound (sequence_len > 8): a config's options always fit


class ConfigEntry(BaseModel):
    """Previewing "as config X trains it": the config's whole `datasets:` entry for this dataset (less its
    path) and the top-level keys the encoder takes. The encoder is then built from this alone, exactly as
    `Encoder.from_config` builds the trainer's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: dict[str, Any]
    chat_template: str | None = None
    chat_template_jinja: str | None = None
    eot_tokens: list[str] | None = None
    excess_length_strategy: Literal["drop", "truncate", "raise"] | None = None
    special_tokens: dict[str, str] = Field(default_factory=dict)  # the tokenizer's, renamed or added
    tokenizer_use_mistral_common: bool = False  # conversations encoded by mistral-common (training/mistral_chat.py)
    processor_type: str | None = None  # image rows: the model's processor (training/multimodal.py)
    processor_kwargs: dict[str, Any] | None = None

    @field_validator("spec")
    @classmethod
    def _a_dataset_entry(cls, spec: dict) -> dict:
        if "path" in spec:
            raise ValueError("the entry's spec has no path: the previewed dataset is the path")
        DatasetSpec(path="entry", **spec)  # a ValidationError names the key at fault
        return spec


class EncodeOptions(BaseModel):
    """What a user can vary while previewing or computing statistics (axolotl's names). As a query:
    `model`, `roles` (comma-separated), `train_on_eos`, `train_on_inputs`, `sequence_len`, `entry` (JSON)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")
    TRAIN_ON_EOS: ClassVar[tuple[str, ...]] = get_args(TrainOnEos)  # the form's choices, in this order
    MIN_SEQUENCE_LEN: ClassVar[int] = MIN_SEQUENCE_LEN

    model: str = Field("", description="a model folder on this server, whose tokenizer encodes (default: the first)")
    train_on_inputs: bool = False
    roles_to_train: list[str] = Field(
        default_factory=lambda: ["assistant"], alias="roles", description="chat roles to train, comma-separated"
    )
    train_on_eos: TrainOnEos = "turn"
    sequence_len: int = Field(512, ge=MIN_SEQUENCE_LEN)
    entry: Json[ConfigEntry] | None = Field(
        None, description="a config's dataset entry as JSON (preview as that config trains): {spec, chat_template, ...}"
    )

    @field_validator("roles_to_train", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        items = [value] if isinstance(value, str) else list(value or [])
        return [r for item in items for r in str(item).replace(" ", "").split(",") if r] or ["assistant"]

    @field_validator("entry", mode="before")
    @classmethod
    def _entry_as_json(cls, value):
        if isinstance(value, ConfigEntry):
            return value.model_dump_json()
        if isinstance(value, dict):
            return json.dumps(value)
        return value or None

    # -- the edges ------------------------------------------------------------------------------
    @classmethod
    def from_query(cls, query, models: list[str], prefix: str = "") -> EncodeOptions:
        """From a page's GET parameters (`prefix` picks the second column of a comparison): a value that
        doesn't validate falls back to its default, a model not on this server to the first one."""
        raw = {name: query.get(prefix + name) for name in cls.query_names() if query.get(prefix + name) is not None}
        if "sequence_len" in raw:  # a number below the minimum means the minimum
            try:
                raw["sequence_len"] = max(MIN_SEQUENCE_LEN, int(raw["sequence_len"]))
            except (TypeError, ValueError):
                del raw["sequence_len"]
        while True:
            try:
                options = cls.model_validate(raw)
                break
            except ValidationError as exc:
                bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
                if not bad & raw.keys():
                    raise
                raw = {k: v for k, v in raw.items() if k not in bad}
        return options.for_models(models)

    @classmethod
    def from_config(cls, config, dataset_name: str, models: list[str]) -> EncodeOptions:
        """The options a training config uses for this dataset (its entry, else its first)."""
        spec = next((d for d in config.datasets if d.path == dataset_name), config.datasets[0])
        if config.base_model not in models:
            raise ValueError(f"its base_model {config.base_model!r} is not a model folder on this server")
        return cls(
            model=config.base_model,
            train_on_inputs=config.train_on_inputs,
            roles_to_train=spec.roles_to_train,
            train_on_eos=spec.train_on_eos,
            sequence_len=config.sequence_len,
            entry=ConfigEntry(
                spec=spec.model_dump(exclude={"path"}, exclude_defaults=True),
                chat_template=config.chat_template,
                chat_template_jinja=config.chat_template_jinja,
                eot_tokens=config.eot_tokens,
                excess_length_strategy=config.excess_length_strategy,
                special_tokens=config.special_tokens,
                tokenizer_use_mistral_common=config.tokenizer_use_mistral_common,
                processor_type=config.processor_type,
                processor_kwargs=config.processor_kwargs,
            ),
        )

    @classmethod
    def query_names(cls) -> list[str]:
        return [field.alias or name for name, field in cls.model_fields.items()]

    def for_models(self, models: list[str]) -> EncodeOptions:
        """The same options with a model this server has: the first one when this one isn't (none: "")."""
        chosen = self.model if self.model in models else (models[0] if models else "")
        return self if chosen == self.model else self.model_copy(update={"model": chosen})

    def as_query(self, prefix: str = "") -> dict:
        """GET parameters that `from_query` reads back to equal options (links, hidden fields, stored stats)."""
        return {
            prefix + "model": self.model,
            prefix + "roles": ",".join(self.roles_to_train),
            prefix + "train_on_eos": self.train_on_eos,
            prefix + "sequence_len": self.sequence_len,
            **({prefix + "train_on_inputs": "on"} if self.train_on_inputs else {}),
            **({prefix + "entry": json.dumps(self.entry.model_dump(), sort_keys=True)} if self.entry else {}),
        }

    def key(self) -> str:
        """What statistics are cached under: equal options, equal key."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:32]


@lru_cache(maxsize=4)
def _tokenizer(source: str, special_tokens: tuple[tuple[str, str], ...] = (), mistral_common: bool = False):
    """The tokenizer as the trainer's load_tokenizer makes it (cached per model and token set: adding tokens
    changes a tokenizer, so two sets never share one)."""
    from training.modeling import load_hf_tokenizer, load_mistral_common_tokenizer

    if mistral_common:
        return load_mistral_common_tokenizer(source)
    tokenizer = load_hf_tokenizer(source)  # tokenizer.json, even beside a tekken.json
    if special_tokens:
        tokenizer.add_special_tokens(dict(special_tokens))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@lru_cache(maxsize=4)
def _processor(source: str, special_tokens: tuple[tuple[str, str], ...], processor_type: str, kwargs: str):
    """The model's processor around the cached tokenizer (image rows), as the trainer's load_processor makes it."""
    from training.multimodal import ProcessorNotUsable, load_processor_for

    try:
        return load_processor_for(source, _tokenizer(source, special_tokens), processor_type, json.loads(kwargs))
    except ProcessorNotUsable as exc:
        raise ProcessorNotUsable(
            f"this dataset's rows have images: encode them with a vision-language model that ships its image "
            f"processor ({exc})"
        ) from None


def _image_rows(dataset: Dataset, options: EncodeOptions, source: str, special_tokens) -> dict:
    """ImageEncoder's arguments for a dataset with images: the processor, and no image paths (an upload's
    images are in its rows)."""
    entry = options.entry
    if not dataset.images or (entry and not entry.processor_type):  # a config without it trains them as text
        return {}
    kind = entry.processor_type if entry else "AutoProcessor"
    kwargs = json.dumps((entry.processor_kwargs if entry else None) or {}, sort_keys=True)
    return {"processor": _processor(source, special_tokens, kind, kwargs), "confine": True}


def make_encoder(dataset: Dataset, options: EncodeOptions) -> Encoder:
    """The trainer's encoder, for this dataset's format and the chosen options (rows with images: its
    ImageEncoder, with the model's processor)."""
    special_tokens = tuple(sorted(options.entry.special_tokens.items())) if options.entry else ()
    source = resolve_base_model(options.model)
    tokenizer = _tokenizer(source, special_tokens, bool(options.entry and options.entry.tokenizer_use_mistral_common))
    images = _image_rows(dataset, options, source, special_tokens)
    kind = ImageEncoder if images else Encoder
    if options.entry:  # as a config trains it: the same construction as Encoder.from_config
        entry = options.entry
        return kind(
            tokenizer,
            DatasetSpec(path=dataset.name, **entry.spec),
            sequence_len=options.sequence_len,
            train_on_inputs=options.train_on_inputs,
            # "raise" stops training at the first long row; the preview shows it as dropped, with why.
            excess_length_strategy="drop"
            if entry.excess_length_strategy == "raise"
            else entry.excess_length_strategy or "drop",
            chat_template=entry.chat_template or "tokenizer_default",
            chat_template_jinja=entry.chat_template_jinja,
            eot_tokens=entry.eot_tokens,
            **images,
        )
    spec = DatasetSpec(
        path=dataset.name,
        type=dataset.format,
        **dataset.format_options,
        roles_to_train=options.roles_to_train,
        train_on_eos=options.train_on_eos,
    )
    return kind(tokenizer, spec, sequence_len=options.sequence_len, train_on_inputs=options.train_on_inputs, **images)
