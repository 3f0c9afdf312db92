"""A tokenizer folder loaded with `tokenizers` alone, for `trainyard preprocess`: no transformers import.

AutoTokenizer costs ~3.4 s of imports here, more than encoding 20k rows. The encoder needs little of it:
the Rust tokenizer (`backend_tokenizer`), the chat template, eos and the named special tokens
(`training/encode.py`), and `decode` for `--debug`. This module reads exactly those from a folder that
transformers would load *unchanged* from `tokenizer.json`. Anything transformers would rewrite on load
(or that we don't read) makes `load_light_tokenizer` return the reason instead, and the CLI falls back to
AutoTokenizer; `tests/unit/test_light_tokenizer.py` holds the two equal on the encoded ids and labels.
"""

from __future__ import annotations

import json
from pathlib import Path

# Classes whose tokenizer transformers 5 builds straight from tokenizer.json. Model-specific classes
# (LlamaTokenizer, Qwen2Tokenizer, GemmaTokenizer, ...) may rebuild the backend from vocab and merges.
PLAIN_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json keys that change the backend when transformers loads it (the post-processor,
# splitting of special tokens, code from the hub, extra template files)
REWRITING_KEYS = ("add_bos_token", "add_eos_token", "split_special_tokens", "auto_map", "post_processor")


class LightTokenizer:
    """What the encoder and the CLI use of a transformers fast tokenizer, over a `tokenizers.Tokenizer`."""

    is_fast = True

    def __init__(self, backend, special: dict[str, str], chat_template: str | None, clean_up_spaces: bool):
        self.backend_tokenizer = backend
        self._special = special
        self.chat_template = chat_template
        self._clean_up = clean_up_spaces

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self._special)

    def __getattr__(self, name: str):  # bos_token, eos_token, pad_token, ... (None when the folder has none)
        if name in NAMED_SPECIAL:
            return self.__dict__["_special"].get(name)
        raise AttributeError(name)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend_tokenizer.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.backend_tokenizer.token_to_id(self.pad_token)

    def decode(self, ids: list[int]) -> str:
        text = self.backend_tokenizer.decode(ids, skip_special_tokens=False)
        if self._clean_up:  # transformers' clean_up_tokenization (a display matter only: --debug)
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
                text = text.replace(a, b)
        return text


def _content(value) -> str | None:
    if isinstance(value, dict):  # older files store {"content": ..., "__type": "AddedToken"}
        return value.get("content")
    return value


def load_light_tokenizer(folder: str | Path, special_tokens: dict[str, str] | None = None) -> LightTokenizer | str:
    """The folder's tokenizer, or the reason this loader can't promise what AutoTokenizer would load.

    `special_tokens` is the config's `special_tokens:` (as `load_tokenizer` adds them); a pad token
    defaults to eos, as there."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return "no tokenizer.json in the folder"
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no tokenizer_config.json in the folder"
    except (OSError, ValueError) as exc:
        return f"tokenizer_config.json unreadable: {exc}"
    cls = config.get("tokenizer_class")
    if cls not in PLAIN_CLASSES:
        return f"tokenizer_class {cls!r} (transformers may rebuild it; read as-is only: {', '.join(PLAIN_CLASSES)})"
    for key in REWRITING_KEYS:
        if key in config:
            return f"tokenizer_config.json sets {key} (transformers changes the tokenizer on load)"
    if (folder / "additional_chat_templates").exists() or (folder / "special_tokens_map.json").exists():
        return "extra template or special-token files"
    if config.get("added_tokens_decoder"):
        return "added_tokens_decoder in tokenizer_config.json"

    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if backend.post_processor is None:
        return "tokenizer.json has no post-processor (transformers builds one)"
    if backend.get_vocab_size() > 100_000:
        return "a vocabulary over 100k (transformers may patch Mistral's pre-tokenizer regex)"
    added = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    special = {k: _content(config.get(k)) for k in NAMED_SPECIAL}
    special = {k: v for k, v in special.items() if v is not None}
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extra = [_content(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
    for key, token in {**special, **(special_tokens or {})}.items():
        if token not in added:  # transformers would add it to the vocabulary
            return f"{key} {token!r} is not a special token of tokenizer.json"
    for token in extra:
        if token not in added:
            return f"extra special token {token!r} is not a special token of tokenizer.json"
    special.update(special_tokens or {})
    if "pad_token" not in special and "eos_token" in special:
        special["pad_token"] = special["eos_token"]  # as load_tokenizer does
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        return "several named chat templates in tokenizer_config.json"
    return LightTokenizer(backend, special, template, bool(config.get("clean_up_tokenization_spaces")))
