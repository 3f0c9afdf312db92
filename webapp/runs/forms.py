"""The config page's form for the common keys, written into the YAML without disturbing it.

Only the keys whose value the form changes are written: comments, key order and number formats
(`2e-4`, `2`) stay as the user wrote them (ruamel's round-trip YAML), an unticked box for a key that
is not in the YAML adds nothing, and an emptied field removes its key.
"""

from __future__ import annotations

import io

from django import forms
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from training.config import ConfigError, ConfigInvalid


def _names_or_regex(raw: str):
    """lora_target_modules: `q_proj, v_proj` is a list; anything with regex characters stays one string."""
    if any(c in raw for c in "*|()[]^$\\+?"):
        return raw
    return [name.strip() for name in raw.split(",") if name.strip()]


def _names(raw: str) -> list[str]:
    return [name.strip() for name in raw.split(",") if name.strip()]


def _auto_or_bool(raw: str):
    value = raw.lower()
    if value not in ("auto", "true", "false"):
        raise ValueError(raw)
    return "auto" if value == "auto" else value == "true"


# (key, how the text is read, help). `int`/`float` values are written as typed (`2e-4` stays 2e-4).
FIELDS = [
    ("base_model", str, "hub id or model folder"),
    ("dataset", "dataset", "the first dataset's name"),
    ("adapter", str, "lora, qlora, or empty for a full fine-tune"),
    ("lora_r", int, ""),
    ("lora_alpha", int, ""),
    ("lora_dropout", float, ""),
    ("lora_target_linear", bool, "LoRA on every linear layer"),
    ("lora_target_modules", _names_or_regex, "q_proj, v_proj (or a regex)"),
    ("lora_target_parameters", _names, "parameter names, comma-separated"),
    ("load_in_4bit", bool, ""),
    ("load_in_8bit", bool, ""),
    ("bf16", _auto_or_bool, "auto, true or false"),
    ("sequence_len", int, ""),
    ("sample_packing", bool, ""),
    ("micro_batch_size", int, ""),
    ("gradient_accumulation_steps", int, ""),
    ("num_epochs", float, ""),
    ("max_steps", int, "overrides num_epochs"),
    ("learning_rate", float, ""),
    ("lr_scheduler", str, "cosine, linear, constant..."),
    ("warmup_steps", int, ""),
    ("warmup_ratio", float, "or a fraction of the steps"),
    ("optimizer", str, "default: fused AdamW"),
    ("gradient_checkpointing", bool, ""),
    ("val_set_size", float, ""),
    ("eval_steps", int, ""),
    ("save_steps", int, ""),
    ("attn_implementation", str, "sdpa, eager, flash_attention_2"),
]


def _yaml() -> YAML:
    y = YAML()  # round-trip: keeps comments, order and scalar formats
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)  # `  - path: ...`, as axolotl's examples write lists
    y.width = 4096
    return y


def _first_dataset(data) -> str | None:
    entries = data.get("datasets")
    if isinstance(entries, list) and entries and isinstance(entries[0], dict):
        return entries[0].get("path")
    return None


def _shown(value, kind) -> str | bool | None:
    if kind is bool:
        return bool(value)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return None if value is None else str(value)


class CommonKeysForm(forms.Form):
    """Fields named `f_<key>`; `initial` comes from the YAML it edits."""

    def __init__(self, yaml_text: str, data=None):
        super().__init__(data)
        self.yaml_text = yaml_text
        try:
            loaded = _yaml().load(yaml_text)
        except YAMLError:
            loaded = None
        self.loaded = loaded if isinstance(loaded, dict) else None
        current = self.loaded or {}
        for key, kind, help_text in FIELDS:
            value = _first_dataset(current) if kind == "dataset" else current.get(key)
            field = forms.BooleanField if kind is bool else forms.CharField
            self.fields[key] = field(required=False, help_text=help_text, initial=_shown(value, kind))

    def add_prefix(self, field_name: str) -> str:
        return f"f_{field_name}"

    def apply(self) -> str:
        """The YAML with the form's values in it; ConfigInvalid names each key the form can't set."""
        if self.loaded is None:
            raise ConfigInvalid([ConfigError("", "fix the YAML before using the form: it must be a mapping of keys")])
        self.is_valid()  # CharField/BooleanField always clean; the values are read below
        data, errors = self.loaded, []
        for key, kind, _ in FIELDS:
            raw = self.cleaned_data.get(key)
            if kind is bool:
                if bool(data.get(key)) != raw:
                    data[key] = raw
                continue
            raw = (raw or "").strip()
            if kind == "dataset":
                self._set_first_dataset(data, raw)
                continue
            if not raw:
                data.pop(key, None)
                continue
            try:
                value = kind(raw) if kind is not str else raw
            except ValueError:
                what = getattr(kind, "__name__", "value").strip("_")
                errors.append(ConfigError(key, f"{raw!r} is not a valid {what}"))
                continue
            if data.get(key) == value or _shown(data.get(key), kind) == raw:
                continue  # unchanged: keep the text as written
            data[key] = _yaml().load(raw) if kind in (int, float) else value
        if errors:
            raise ConfigInvalid(errors)
        out = io.StringIO()
        _yaml().dump(data, out)
        return out.getvalue()

    @staticmethod
    def _set_first_dataset(data, path: str) -> None:
        """The first entry's path; its other options stay as they are."""
        entries = data.get("datasets") if isinstance(data.get("datasets"), list) else []
        if not path or _first_dataset(data) == path:
            return
        if entries and isinstance(entries[0], dict):
            entries[0]["path"] = path
        else:
            data["datasets"] = [{"path": path, "type": "chat_template"}, *entries]
