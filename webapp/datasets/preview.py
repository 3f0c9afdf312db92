"""The masked-label preview: one row through the trainer's own encoder, shown token by token."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from training.config import DatasetSpec
from training.encode import IGNORE_INDEX, Dropped, Encoder
from webapp.datasets.models import Dataset
from webapp.datasets.services import read_row
from webapp.runs.base_models import resolve_base_model


@dataclass
class PreviewOptions:
    """The format options a user can vary while previewing (axolotl names)."""

    model: str
    train_on_inputs: bool = False
    roles_to_train: list[str] = field(default_factory=lambda: ["assistant"])
    train_on_eos: str = "turn"
    sequence_len: int = 512
    # Previewing "as config X trains it": the config's whole entry for this dataset and the top-level
    # options the encoder takes (chat_template, eot_tokens, excess_length_strategy, ...). The fields
    # above then only describe it; the encoder is built from this, exactly as the trainer builds it.
    entry: dict | None = None

    @classmethod
    def from_query(cls, query, models: list[str], prefix: str = "") -> PreviewOptions:
        """From GET parameters (`prefix` picks the second column of a comparison); bad values fall back."""
        get = lambda name, default="": query.get(prefix + name, default)  # noqa: E731
        try:
            sequence_len = max(16, int(get("sequence_len", 512)))
        except ValueError:
            sequence_len = 512
        eos = get("train_on_eos")
        model = get("model") or (models[0] if models else "")
        return cls(
            model=model if model in models else (models[0] if models else ""),
            train_on_inputs=get("train_on_inputs") in ("on", "1", "true"),
            roles_to_train=[r for r in get("roles", "assistant").replace(" ", "").split(",") if r] or ["assistant"],
            train_on_eos=eos if eos in ("all", "turn", "last", "none") else "turn",
            sequence_len=sequence_len,
            entry=_entry(get("entry")),
        )

    @classmethod
    def from_config(cls, config, dataset_name: str, models: list[str]) -> PreviewOptions:
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
            entry={
                "spec": spec.model_dump(exclude={"path"}, exclude_defaults=True),
                "chat_template": config.chat_template,
                "chat_template_jinja": config.chat_template_jinja,
                "eot_tokens": config.eot_tokens,
                "excess_length_strategy": config.excess_length_strategy,
            },
        )

    def as_query(self, prefix: str = "") -> dict:
        return {
            prefix + "model": self.model,
            prefix + "roles": ",".join(self.roles_to_train),
            prefix + "train_on_eos": self.train_on_eos,
            prefix + "sequence_len": self.sequence_len,
            **({prefix + "train_on_inputs": "on"} if self.train_on_inputs else {}),
            **({prefix + "entry": json.dumps(self.entry, sort_keys=True)} if self.entry else {}),
        }

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Token:
    id: int
    text: str  # whitespace made visible
    label: int
    trained: bool
    special: bool
    part: str
    thinking: bool = False  # part of a reasoning trace (the chat format names such parts "... thinking")


@dataclass
class Preview:
    row: int
    raw: dict
    tokens: list[Token]
    trained: int
    dropped: str | None
    warnings: list[str]
    truncated: bool = False


@lru_cache(maxsize=4)
def _tokenizer(source: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def visible(text: str) -> str:
    return text.replace(" ", "\u00b7").replace("\n", "\u21b5").replace("\t", "\u2192")


def _entry(raw: str) -> dict | None:
    """A config entry carried in a query (see PreviewOptions.entry), if it is a valid one."""
    if not raw:
        return None
    try:
        entry = json.loads(raw)
        DatasetSpec(path="x", **entry["spec"])
    except (ValueError, TypeError, KeyError):
        return None
    return entry if isinstance(entry, dict) else None


def make_encoder(dataset: Dataset, options: PreviewOptions) -> Encoder:
    """The trainer's encoder, for this dataset's format and the chosen options."""
    tokenizer = _tokenizer(resolve_base_model(options.model))
    if options.entry:  # as a config trains it: the same construction as Encoder.from_config
        entry = options.entry
        return Encoder(
            tokenizer,
            DatasetSpec(path=dataset.name, **entry["spec"]),
            sequence_len=options.sequence_len,
            train_on_inputs=options.train_on_inputs,
            # "raise" stops training at the first long row; the preview shows it as dropped, with why.
            excess_length_strategy="drop"
            if entry.get("excess_length_strategy") == "raise"
            else entry.get("excess_length_strategy") or "drop",
            chat_template=entry.get("chat_template") or "tokenizer_default",
            chat_template_jinja=entry.get("chat_template_jinja"),
            eot_tokens=entry.get("eot_tokens"),
        )
    spec = DatasetSpec(
        path=dataset.name,
        type=dataset.format,
        **dataset.format_options,
        roles_to_train=options.roles_to_train,
        train_on_eos=options.train_on_eos,
    )
    return Encoder(tokenizer, spec, sequence_len=options.sequence_len, train_on_inputs=options.train_on_inputs)


def preview_row(dataset: Dataset, index: int, options: PreviewOptions) -> Preview:
    encoder = make_encoder(dataset, options)
    tokenizer = encoder.tokenizer
    raw = read_row(dataset, index)
    outcomes = encoder.encode_row(raw, index)
    specials = set(tokenizer.all_special_ids)
    tokens, dropped, trained, truncated = [], None, 0, False
    for outcome in outcomes:
        sample = outcome.sample if isinstance(outcome, Dropped) else outcome
        if isinstance(outcome, Dropped):
            dropped = f"{outcome.reason}: {outcome.detail}"
        if sample is None:
            continue
        truncated = truncated or sample.truncated
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
                )
            )
    return Preview(index, raw, tokens, trained, dropped, encoder.warnings(), truncated)
