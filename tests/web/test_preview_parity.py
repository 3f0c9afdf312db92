"""The product's promise, held: what the preview shows for a row (token ids and labels) is what the trainer
feeds the model for it, for each format and the options that change labels.

Each case stores the same rows twice over: uploaded as a workspace dataset (what the preview reads) and as a
file the trainer's config names. The preview side is `preview_row` with the options "as config X trains it"
(EncodeOptions.from_config, as the page's config picker builds them); the trainer side is training/train.py's
own `prepare_data` (encode, drop, shuffle, pack) and its `Collator`, built as `train()` builds it. Samples
are compared one by one, as multisets (the trainer shuffles): every kept row's preview is exactly one of the
trainer's samples, and the trainer has no other.
"""

from __future__ import annotations

from collections import Counter

import pytest
import yaml
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.helpers import jsonl
from training.demo import alpaca_rows, chat_rows, completion_rows, input_output_rows

pytestmark = pytest.mark.django_db

IGNORE = -100
LONG_CHAT = {"messages": [{"role": "user", "content": "word " * 120}, {"role": "assistant", "content": "ok"}]}
# A row whose whole text trains (completion): long enough to be cut or dropped at sequence_len 48.
LONG_TEXT = {"text": " ".join(f"token{i}" for i in range(80))}

CASES = {
    "chat_template defaults": (chat_rows(6), {}, {}),
    "chat_template: roles user+assistant, eos on every turn, packed": (
        chat_rows(6, seed=5),
        {"roles_to_train": ["user", "assistant"], "train_on_eos": "all"},
        {"sample_packing": True},
    ),
    "chat_template: eos on the last turn only, train_on_inputs": (
        chat_rows(6, seed=7),
        {"train_on_eos": "last"},
        {"train_on_inputs": True},
    ),
    "chat_template: no eos, a row cut at sequence_len": (
        chat_rows(4, seed=9) + [LONG_CHAT],
        {"train_on_eos": "none"},
        {"sequence_len": 64, "excess_length_strategy": "truncate"},
    ),
    "chat_template: a too-long row dropped by both": (
        chat_rows(4, seed=11) + [LONG_CHAT],
        {},
        {"sequence_len": 64},
    ),
    "chat_template: the config's own eos token (special_tokens)": (
        chat_rows(6, seed=13),
        {"train_on_eos": "all"},
        {"special_tokens": {"eos_token": "<|endoftext|>"}},
    ),
    "alpaca": (alpaca_rows(6), {"type": "alpaca"}, {}),
    "alpaca: train_on_inputs, packed and padded to sequence_len": (
        alpaca_rows(6, seed=4),
        {"type": "alpaca"},
        {"train_on_inputs": True, "sample_packing": True, "pad_to_sequence_len": True},
    ),
    "completion": (completion_rows(6), {"type": "completion"}, {}),
    "completion: packed, a row cut at sequence_len": (
        completion_rows(5, seed=6) + [LONG_TEXT],
        {"type": "completion"},
        {"sample_packing": True, "sequence_len": 48, "excess_length_strategy": "truncate"},
    ),
    "input_output": (input_output_rows(6), {"type": "input_output"}, {}),
    "input_output: packed": (input_output_rows(6, seed=8), {"type": "input_output"}, {"sample_packing": True}),
}


def _config_yaml(base_model: str, path: str, entry: dict, top: dict) -> str:
    return yaml.safe_dump(
        {
            "base_model": base_model,
            "datasets": [{"path": path, **entry}],
            "sequence_len": 256,
            "val_set_size": 0,  # every sample in the training set: the trainer's whole dataset is compared
            "micro_batch_size": 2,
            **top,
        }
    )


def _preview_samples(alice, rows, entry, top, model: str = "tiny-chat") -> tuple[Counter, int]:
    """(ids, labels) of every sample the preview shows as kept (a row cut at sequence_len shows several),
    and how many it shows as dropped."""
    from training.config import parse_config
    from webapp.base_models import available_models
    from webapp.datasets.encoding import EncodeOptions
    from webapp.datasets.preview import preview_row
    from webapp.datasets.services import upload_dataset

    user, workspace = alice
    dataset = upload_dataset(workspace, user, SimpleUploadedFile("rows.jsonl", jsonl(rows)), name="rows").dataset
    config = parse_config(_config_yaml(model, dataset.name, entry, top))
    options = EncodeOptions.from_config(config, dataset.name, available_models())
    kept, dropped = Counter(), 0
    for index in range(dataset.rows):
        preview = preview_row(dataset, index, options)
        dropped += len(preview.dropped_samples)
        for sample in range(preview.samples):
            if sample not in preview.dropped_samples:
                tokens = [t for t in preview.tokens if t.sample == sample]
                kept[(tuple(t.id for t in tokens), tuple(t.label for t in tokens))] += 1
    return kept, dropped


def _trainer_samples(tmp_path, tiny_model_dir, rows, entry, top) -> tuple[Counter, int]:
    """(ids, labels) of every sample in the batches the trainer's collator makes, and the rows it dropped."""
    from training.config import parse_config
    from training.modeling import load_tokenizer
    from training.train import Collator, prepare_data

    (tmp_path / "rows.jsonl").write_bytes(jsonl(rows))
    config = parse_config(_config_yaml(str(tiny_model_dir), "rows.jsonl", entry, top))
    tokenizer = load_tokenizer(config)
    data = prepare_data(config, tokenizer, tmp_path)
    collator = Collator(tokenizer.pad_token_id, pad_to=config.sequence_len if config.pad_to_sequence_len else None)
    samples = Counter()
    for start in range(0, len(data.train), config.micro_batch_size):
        features = data.train[start : start + config.micro_batch_size]
        batch = collator(features)
        for k, feature in enumerate(features):
            ids, labels = batch["input_ids"][k].tolist(), batch["labels"][k].tolist()
            n = len(feature["input_ids"])
            # Padding trains nothing, and is seen as padding (masked out, or a position run of its own).
            assert labels[n:] == [IGNORE] * (len(labels) - n) and ids[n:] == [tokenizer.pad_token_id] * (len(ids) - n)
            if "position_ids" in batch:
                positions = batch["position_ids"][k].tolist()[:n]
                starts = [i for i, p in enumerate(positions) if p == 0] + [n]
                for lo, hi in zip(starts, starts[1:]):
                    samples[(tuple(ids[lo:hi]), tuple(labels[lo:hi]))] += 1
            else:
                assert batch["attention_mask"][k].tolist() == [1] * n + [0] * (len(ids) - n)
                samples[(tuple(ids[:n]), tuple(labels[:n]))] += 1
    dropped = sum(sum(stats.dropped.values()) for stats in data.stats)
    return samples, dropped


@pytest.mark.parametrize("case", list(CASES))
def test_the_preview_shows_the_trainers_collated_samples(case, alice, tiny_model_dir, tmp_path):
    rows, entry, top = CASES[case]
    shown, shown_dropped = _preview_samples(alice, rows, entry, top)
    fed, fed_dropped = _trainer_samples(tmp_path, tiny_model_dir, rows, entry, top)
    if top.get("sample_packing"):
        # A packed bin never targets a sample's first token (it would be predicted from the previous
        # sample's last one); unpacked, the model's one-token shift never targets it either. So the
        # trainer's label there is -100 where the preview shows the token's own id: the same loss.
        shown = Counter({(ids, (IGNORE, *labels[1:])): n for (ids, labels), n in shown.items()})
    assert shown_dropped == fed_dropped
    assert sum(shown.values()) == sum(fed.values()) >= len(rows) - fed_dropped
    assert shown == fed
    assert any(label != IGNORE for _, labels in fed for label in labels)  # something trains in every case
    if "dropped by both" in case:
        assert fed_dropped >= 1
    if "cut at sequence_len" in case:  # the long row reaches the trainer cut to sequence_len
        assert max(len(ids) for ids, _ in fed) == top["sequence_len"]


@pytest.fixture(scope="module")
def tiny_ministral(data_dir):
    from training.architectures import build_tiny

    return build_tiny("ministral", data_dir / "models" / "tiny-ministral")  # ships a tekken.json


def test_the_preview_of_a_mistral_common_config_shows_the_trainers_samples(alice, tiny_ministral, tmp_path):
    """tokenizer_use_mistral_common: the preview encodes with mistral-common too (its own format, and its rule
    that a conversation ends with the assistant: the open-ended row is dropped by both)."""
    rows = chat_rows(8, seed=21) + [{"messages": [{"role": "user", "content": "Still there?"}]}]
    assert any(r["messages"][0]["role"] == "system" and len(r["messages"]) > 3 for r in rows)
    top = {"tokenizer_use_mistral_common": True}
    shown, shown_dropped = _preview_samples(alice, rows, {}, top, model="tiny-ministral")
    fed, fed_dropped = _trainer_samples(tmp_path, tiny_ministral, rows, {}, top)
    assert shown == fed and shown_dropped == fed_dropped == 1
    assert sum(fed.values()) == len(rows) - 1
