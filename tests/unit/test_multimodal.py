"""Image + text rows (processor_type) on the tiny Qwen3.5 vision-language model: encoded as its processor encodes
them, image tokens never trained, pixels made by its image processor, and trained end to end."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from training.config import ConfigInvalid, check_model, parse_config
from training.encode import IGNORE_INDEX, Dropped, Encoded
from training.events import ListEventSink

IMAGE_PAD = "<|image_pad|>"


def png(width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def llava_row(i: int, image: str | None = "", question: str = "What is in the picture?") -> dict:
    """HuggingFaceH4/llava-instruct-mix-vsft's layout: parts with an `index`, the image in the `images` column."""
    user = [{"type": "text", "text": question, "index": None}, {"type": "image", "text": None, "index": 0}]
    row = {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": f"Noise number {i}.", "index": None}]},
        ]
    }
    if image is not None:
        row["images"] = [image or f"images/{i}.png"]
    return row


SIZES = [(32, 32), (48, 24), (64, 64), (20, 28)]


@pytest.fixture
def image_data(tmp_path) -> Path:
    """Eight rows whose images are PNG files beside the data file (paths relative to it)."""
    (tmp_path / "images").mkdir()
    for i in range(8):
        (tmp_path / "images" / f"{i}.png").write_bytes(png(*SIZES[i % 4], seed=i))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(llava_row(i)) + "\n" for i in range(8)))
    return tmp_path / "rows.jsonl"


def vision_config(model, data, **keys):
    base = {
        "base_model": str(model),
        "processor_type": "AutoProcessor",
        "skip_prepare_dataset": True,
        "remove_unused_columns": False,
        "chat_template": "qwen3_5",
        "datasets": [{"path": str(data), "type": "chat_template"}],
        "sequence_len": 256,
        "micro_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 1e-3,
    }
    return parse_config({**base, **keys})


def encoder_of(config, data: Path | None = None):
    from training.modeling import load_tokenizer
    from training.multimodal import ImageEncoder, load_processor

    tokenizer = load_tokenizer(config)
    processor = load_processor(config, tokenizer)
    dirs = [Path(data).parent] if data else []
    return ImageEncoder.from_config(tokenizer, config, 0, None, processor=processor, image_dirs=dirs), processor


def test_processor_type_trains_image_rows_with_the_models_processor(tiny_arch, image_data, tmp_path, monkeypatch):
    """processor_type: AutoProcessor: the vision tower sees every image's pixels, the loss trains, and the
    adapter is saved with the processor."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    from training.train import train

    model = tiny_arch("qwen3_5")
    config = vision_config(model, image_data, adapter="lora", lora_target_modules=["q_proj", "v_proj"])
    sink = ListEventSink()
    seen = []
    vision_forward = modeling_qwen3_5.Qwen3_5VisionModel.forward

    def watch(self, hidden_states, grid_thw, **kwargs):  # the vision tower's inputs
        seen.append(grid_thw.tolist())
        return vision_forward(self, hidden_states, grid_thw, **kwargs)

    monkeypatch.setattr(modeling_qwen3_5.Qwen3_5VisionModel, "forward", watch)
    summary = train(config, tmp_path / "run", sink)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert len(seen) == 2 and all(len(grids) == 2 for grids in seen)  # a batch of two rows, two images, per step
    logs = [e["message"] for e in sink.events if e["event"] == "log"]
    assert "images: 8 of 8 training samples have images; their pixels are made a batch at a time by " in "\n".join(
        logs
    )
    saved = tmp_path / "run" / "adapter"
    assert (saved / "processor_config.json").is_file() and (saved / "adapter_config.json").is_file()


def test_image_rows_encode_as_the_processor_does(tiny_arch, image_data):
    """The same ids the model's processor gives for the rendered chat and its image, and the same pixels."""
    import torch

    from training.multimodal import ImageCollator, open_image

    config = vision_config(tiny_arch("qwen3_5"), image_data)
    encoder, processor = encoder_of(config, image_data)
    rows = [json.loads(line) for line in image_data.read_text().splitlines()]
    samples = list(encoder.encode_file(image_data))
    assert all(isinstance(s, Encoded) for s in samples) and len(samples) == 8
    for i, (row, sample) in enumerate(zip(rows, samples, strict=True)):
        messages = [
            {"role": m["role"], "content": [{k: v for k, v in p.items() if v is not None} for p in m["content"]]}
            for m in row["messages"]
        ]
        text = processor.apply_chat_template(messages, tokenize=False)
        image = open_image(image_data.parent / row["images"][0])
        reference = processor(text=[text], images=[image], return_tensors="pt")
        assert sample.input_ids == reference["input_ids"][0].tolist(), f"row {i}"
        assert sample.images == [image_data.parent / f"images/{i}.png"]
        batch = ImageCollator(encoder.tokenizer.pad_token_id, processor)(
            [{"input_ids": sample.input_ids, "labels": sample.labels, "images": sample.images}]
        )
        assert torch.equal(batch["pixel_values"], reference["pixel_values"])
        assert torch.equal(batch["image_grid_thw"], reference["image_grid_thw"])
        assert torch.equal(batch["mm_token_type_ids"], reference["mm_token_type_ids"])
    # sizes differ, so does the number of image tokens: 64x64 -> 16, 32x32 -> 4
    assert [s.input_ids.count(processor.image_token_id) for s in samples[:4]] == [4, 6, 16, 2]


def test_image_tokens_never_train(tiny_arch, image_data):
    """Image placeholder tokens stand for pixels: masked even where their turn trains (train_on_inputs), while
    the text and the vision start/end markers of that turn train."""
    config = vision_config(tiny_arch("qwen3_5"), image_data, train_on_inputs=True)
    encoder, processor = encoder_of(config, image_data)
    sample = next(iter(encoder.encode_file(image_data)))
    tokenizer = encoder.tokenizer
    image_id, start = processor.image_token_id, tokenizer.convert_tokens_to_ids("<|vision_start|>")
    positions = [k for k, t in enumerate(sample.input_ids) if t == image_id]
    assert positions and all(sample.labels[k] == IGNORE_INDEX for k in positions)
    assert sample.labels[sample.input_ids.index(start)] == start  # the user turn trains: its markers too
    question = tokenizer.encode("What", add_special_tokens=False)[0]
    assert sample.labels[sample.input_ids.index(question)] == question


def test_several_images_go_in_order_and_spare_ones_to_the_first_user_turn(tiny_arch, tmp_path):
    """The k-th bare image part takes the k-th image of the row (axolotl takes only the first); images no part
    asks for go at the end of the first user turn, as axolotl does."""
    a, b, c = png(32, 32, 1), png(64, 64, 2), png(48, 24, 3)
    for name, data in (("a.png", a), ("b.png", b), ("c.png", c)):
        (tmp_path / name).write_bytes(data)
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
            {"role": "assistant", "content": "Two."},
            {"role": "user", "content": "And this?"},
            {"role": "assistant", "content": "A third."},
        ],
        "images": ["a.png", "b.png", "c.png"],
    }
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n")
    encoder, processor = encoder_of(vision_config(tiny_arch("qwen3_5"), data), data)
    [sample] = encoder.encode_file(data)
    assert sample.images == [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    text = encoder.tokenizer.decode(sample.input_ids)
    first_user = text[: text.index("<|im_end|>")]
    runs = [len(m) // len(IMAGE_PAD) for m in re.findall(f"(?:{re.escape(IMAGE_PAD)})+", first_user)]
    assert runs == [4, 16, 6] and first_user.index("and") < first_user.index(IMAGE_PAD * 16)


@pytest.mark.parametrize(
    "change, field, message",
    [
        (lambda r: r.update(images=[]), "messages[0].content[1]", "an image part with no image: the row has 0"),
        (lambda r: r.update(images=["nowhere.png"]), "images[0]", "no image file 'nowhere.png'"),
        (lambda r: r.update(images=["broken.png"]), "images[0]", "not a readable image"),
        (lambda r: r.update(images=["https://example.com/x.png"]), "images[0]", "not fetched from the network"),
        (
            lambda r: r["messages"][0]["content"].append({"type": "video"}),
            "messages[0].content[2]",
            "video parts aren't supported",
        ),
        (
            lambda r: r["messages"][1]["content"][0].update(text="a " + IMAGE_PAD),
            "messages[1].content[0].text",
            "holds the image placeholder token",
        ),
        (lambda r: r.update(images=[{"bytes": "@@not base64@@"}]), "images[0]", "must be base64"),
    ],
)
def test_a_row_with_an_unusable_image_is_invalid_at_its_field(tiny_arch, image_data, change, field, message):
    (image_data.parent / "broken.png").write_bytes(b"not a png")
    row = llava_row(0)
    change(row)
    encoder, _ = encoder_of(vision_config(tiny_arch("qwen3_5"), image_data), image_data)
    [outcome] = encoder.encode_rows([(0, row)])
    assert isinstance(outcome, Dropped) and outcome.reason == "invalid"
    assert outcome.detail.startswith(f"{field}: ") and message in outcome.detail


def test_a_bad_image_fails_the_run_before_the_model_loads_naming_the_line(tiny_arch, image_data, tmp_path):
    from training.train import DataInvalid, prepare_data

    lines = image_data.read_text().splitlines()
    lines[2] = json.dumps(llava_row(2, image="images/missing.png"))
    image_data.write_text("\n".join(lines) + "\n")
    config = vision_config(tiny_arch("qwen3_5"), image_data)
    encoder, processor = encoder_of(config, image_data)
    with pytest.raises(DataInvalid, match=r"rows.jsonl:line 3: images\[0\]: no image file 'images/missing.png'"):
        prepare_data(config, encoder.tokenizer, None, processor)


def test_truncation_never_cuts_through_an_image(tiny_arch, image_data):
    """excess_length_strategy: truncate keeps whole images only: a cut through an image's tokens drops the row
    (with train_on_inputs the cut prompt still trains, so the cut itself decides)."""
    keys = {"excess_length_strategy": "truncate", "sequence_len": 24, "train_on_inputs": True}
    config = vision_config(tiny_arch("qwen3_5"), image_data, **keys)
    encoder, processor = encoder_of(config, image_data)
    row = llava_row(2)  # 64x64: 16 image tokens, which start after ~17 tokens of question
    [outcome] = encoder.encode_rows([(2, row)])
    assert isinstance(outcome, Dropped) and outcome.reason == "too_long" and "cut an image" in outcome.detail
    row["messages"][0]["content"].reverse()  # the image first, then the question: the cut falls in the text
    [kept] = encoder.encode_rows([(2, row)])
    assert isinstance(kept, Encoded) and kept.truncated and len(kept.images) == 1
    assert kept.input_ids.count(processor.image_token_id) == 16


def test_processor_kwargs_reach_the_image_processor(tiny_arch, image_data):
    """processor_kwargs (max_pixels for Qwen) bound the image sizes: a 64x64 image takes 4 tokens, not 16."""
    config = vision_config(tiny_arch("qwen3_5"), image_data, processor_kwargs={"max_pixels": 32 * 32})
    encoder, processor = encoder_of(config, image_data)
    samples = list(encoder.encode_file(image_data))
    assert samples[2].input_ids.count(processor.image_token_id) == 4
    assert processor.image_processor.size["longest_edge"] == 32 * 32


def test_skip_prepare_dataset_says_when_pixels_are_made(tiny_arch, image_data):
    """true: the rows keep their images and the collator makes each batch's pixels; false: the pixels are made
    once before training. The batches are the same."""
    import torch

    from training.multimodal import ImageCollator
    from training.train import prepare_data

    batches = {}
    for skip in (True, False):
        config = vision_config(tiny_arch("qwen3_5"), image_data, skip_prepare_dataset=skip, seed=3)
        encoder, processor = encoder_of(config, image_data)
        data = prepare_data(config, encoder.tokenizer, None, processor)
        first = data.train[0]
        assert ("images" in first) is skip and ("pixels" in first) is not skip
        batches[skip] = ImageCollator(encoder.tokenizer.pad_token_id, processor)(data.train[:3])
    assert batches[True].keys() == batches[False].keys()
    assert all(torch.equal(batches[True][k], batches[False][k]) for k in batches[True])


def test_image_rows_keep_their_gated_deltanet_state_across_images(tiny_arch, image_data):
    """M-RoPE positions repeat over an image; the packed-sample isolation of Qwen3.5's linear attention layers
    must not read that as sample boundaries (it cut the state at every image token: logits off by ~4)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from training.architectures import isolate_packed_linear_attention
    from training.multimodal import ImageCollator

    encoder, processor = encoder_of(vision_config(tiny_arch("qwen3_5"), image_data), image_data)
    samples = list(encoder.encode_file(image_data))[:2]
    batch = ImageCollator(encoder.tokenizer.pad_token_id, processor)(
        [{"input_ids": s.input_ids, "labels": s.labels, "images": s.images} for s in samples]
    )
    model = AutoModelForImageTextToText.from_pretrained(tiny_arch("qwen3_5")).eval()
    with torch.no_grad():
        before = model(**batch, use_cache=False).logits
        assert isolate_packed_linear_attention(model) == 1
        after = model(**batch, use_cache=False).logits
    assert torch.equal(before, after)


# -- validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "keys, path, words",
    [
        ({"sample_packing": True}, "sample_packing", "rows with images aren't packed"),
        ({"processor_type": None}, "skip_prepare_dataset", "applies to image rows"),
        ({"processor_type": "Qwen3.5"}, "processor_type", "not a transformers processor class"),
        ({"datasets": [{"path": "d.jsonl", "type": "alpaca"}]}, "processor_type", "use type: chat_template"),
    ],
)
def test_image_settings_that_cant_work_are_refused_at_their_key(tiny_arch, keys, path, words):
    with pytest.raises(ConfigInvalid) as refused:
        vision_config(tiny_arch("qwen3_5"), "d.jsonl", **keys)
    assert [(e.path, words in e.message) for e in refused.value.errors] == [(path, True)]


def test_processor_type_needs_a_model_with_a_vision_tower_and_its_image_processor(tiny_arch, tmp_path):
    [text_only] = check_model(vision_config(tiny_arch("ministral"), "d.jsonl"))
    assert text_only.path == "processor_type" and "no vision tower" in text_only.message
    bare = tmp_path / "no-processor"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_arch("qwen3_5") / "config.json").read_text())
    [missing] = check_model(vision_config(bare, "d.jsonl"))
    assert missing.path == "processor_type" and "no preprocessor_config.json" in missing.message
    assert check_model(vision_config(tiny_arch("qwen3_5"), "d.jsonl")) == []


# -- axolotl parity -----------------------------------------------------------------------------------------
AXOLOTL = Path(__file__).parents[1] / "fixtures" / "axolotl" / "multimodal"


def test_image_rows_match_axolotls_multimodal_path():
    """Axolotl 0.21.0's own Qwen3.5 multimodal output (tests/fixtures/axolotl/multimodal/, made by its
    make_multimodal_case.py): the same ids (image tokens included, an EXIF-turned JPEG too) and image grids.
    Labels differ by design in one place: axolotl's multimodal masking trains everything between
    `<|im_start|>assistant\\n` and `<|im_end|>`, so also the empty `<think>\\n\\n</think>\\n\\n` the template
    puts before the last answer; its text path, and Trainyard for every row, train the answer and its end token
    only, so a row trains the same with or without an image."""
    config = parse_config(
        {
            "base_model": str(AXOLOTL / "model"),
            "processor_type": "AutoProcessor",
            "skip_prepare_dataset": True,
            "chat_template": "qwen3_5",
            "datasets": [{"path": str(AXOLOTL / "data.jsonl"), "type": "chat_template"}],
            "sequence_len": 1024,
        }
    )
    encoder, processor = encoder_of(config, AXOLOTL / "data.jsonl")
    from training.multimodal import ImageCollator

    tokenizer = encoder.tokenizer
    expected = [json.loads(line) for line in (AXOLOTL / "expected.jsonl").read_text().splitlines()]
    samples = list(encoder.encode_file(AXOLOTL / "data.jsonl"))
    assert len(samples) == len(expected) == 5
    think = tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    for sample, theirs in zip(samples, expected, strict=True):
        assert sample.input_ids == theirs["input_ids"], f"row {theirs['row']}"
        batch = ImageCollator(tokenizer.pad_token_id, processor)(
            [{"input_ids": sample.input_ids, "labels": sample.labels, "images": sample.images}]
        )
        assert batch["image_grid_thw"].tolist() == theirs["image_grid_thw"]
        differ = [k for k, (a, b) in enumerate(zip(sample.labels, theirs["labels"], strict=True)) if a != b]
        # only axolotl trains them, and they are the template's think block right after the last answer's header
        assert all(sample.labels[k] == IGNORE_INDEX for k in differ)
        assert [sample.input_ids[k] for k in differ] == think and differ == list(range(differ[0], differ[0] + 6))
        header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        assert sample.input_ids[differ[0] - len(header) : differ[0]] == header
    assert samples[4].images == [AXOLOTL / "images" / "e.jpg"]
    assert expected[4]["image_grid_thw"] == [[1, 6, 4]]  # 6 patches high, 4 wide: turned as its EXIF orientation says


# -- the command line ---------------------------------------------------------------------------------------
def _parquet_of(jsonl: Path, out: Path) -> Path:
    """The rows as Hugging Face datasets stores an Image column in Parquet: {bytes, path} structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for line in jsonl.read_text().splitlines():
        row = json.loads(line)
        row["images"] = [{"bytes": (jsonl.parent / p).read_bytes(), "path": None} for p in row["images"]]
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


@pytest.fixture
def cli_project(tmp_path, tiny_arch, image_data):
    """A config at the project root, the data and its images in data/ (image paths relative to the data file)."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    image_data.rename(project / "data" / "rows.jsonl")
    (image_data.parent / "images").rename(project / "data" / "images")
    _parquet_of(project / "data" / "rows.jsonl", project / "data" / "rows.parquet")
    config = (
        f"base_model: {tiny_arch('qwen3_5')}\nprocessor_type: AutoProcessor\nskip_prepare_dataset: true\n"
        "remove_unused_columns: false\nsample_packing: false\nchat_template: qwen3_5\n"
        "datasets:\n  - path: data/rows.jsonl\n    type: chat_template\n"
        "sequence_len: 256\nmicro_batch_size: 2\nmax_steps: 2\nadapter: lora\nlora_target_linear: true\n"
    )
    (project / "config.yaml").write_text(config)
    (project / "parquet.yaml").write_text(config.replace("rows.jsonl", "rows.parquet"))
    return project


def test_trainyard_preprocess_reads_image_paths_beside_the_data_file_and_parquet_bytes(
    cli_project, tmp_path, monkeypatch, capsys
):
    from training.cli import main

    monkeypatch.chdir(tmp_path)  # not the data's folder: paths are read beside the data file
    outputs = {}
    for name in ("config", "parquet"):
        out = tmp_path / f"{name}.out.jsonl"
        assert main(["preprocess", str(cli_project / f"{name}.yaml"), "--jsonl", str(out)]) == 0
        assert "8 rows read, 8 samples kept" in capsys.readouterr().out
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert outputs["config"] == outputs["parquet"]  # the same rows, whether images are files or bytes
    assert all(line["images"] == 1 for line in outputs["config"])
    main(["preprocess", str(cli_project / "config.yaml"), "--debug", "--rows", "1", "--no-color"])
    shown = capsys.readouterr().out
    assert "--- rows.jsonl row 0 (" in shown and "1 image(s))" in shown and "<|image_pad|>(661, -100)" in shown


def test_trainyard_preprocess_names_a_missing_image_by_line(cli_project, capsys):
    from training.cli import main

    data = cli_project / "data" / "rows.jsonl"
    (cli_project / "data" / "images" / "5.png").unlink()
    assert main(["preprocess", str(cli_project / "config.yaml")]) == 1
    err = capsys.readouterr().err
    assert f"error: {data}:line 6: images[0]: no image file 'images/5.png'" in err


def test_trainyard_train_trains_on_image_rows(cli_project, tmp_path):
    from training.cli import main

    run = tmp_path / "run"
    assert main(["train", str(cli_project / "parquet.yaml"), "--run-dir", str(run)]) == 0
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1]["state"] == "succeeded"
    logs = [e["message"] for e in events if e["event"] == "log"]
    assert any(m.startswith("images: 8 of 8 training samples have images") for m in logs)
    # lora_target_linear on a vision-language model: the language model's layers only, the regex logged
    assert any(m.startswith("lora_target_linear: language model only") for m in logs)
    adapted = json.loads((run / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert "language_model" in adapted and "visual" not in adapted


def test_rows_written_as_json_carry_their_image_bytes_and_pictures():
    """How a Parquet upload or a Hub import is stored: an Image column's {bytes, path} keeps its exact bytes (as
    base64) and a decoded picture (a Hub dataset's) becomes PNG bytes; rows without binary values are unchanged."""
    from PIL import Image

    from training.multimodal import open_image, resolve_image
    from training.sources import json_line

    data = png(20, 12, 5)
    picture = Image.open(io.BytesIO(png(8, 6, 6)))
    line = json.loads(json_line({"images": [{"bytes": data, "path": "a.png"}, picture], "n": 1}))
    assert resolve_image(line["images"][0], [], "images[0]") == data and line["images"][0]["path"] == "a.png"
    decoded = open_image(resolve_image(line["images"][1], [], "images[1]"))
    assert decoded.size == (8, 6) and list(decoded.getdata()) == list(picture.convert("RGB").getdata())
    plain = {"messages": [{"role": "user", "content": "é"}], "when": "x"}
    assert json_line(plain) == (json.dumps(plain, ensure_ascii=False) + "\n").encode()


def test_image_rows_without_processor_type_are_refused_with_the_keys_to_set(tiny_arch, image_data):
    from training.modeling import load_tokenizer
    from training.train import DataInvalid, prepare_data

    config = parse_config(
        {"base_model": str(tiny_arch("qwen3_5")), "datasets": [{"path": str(image_data), "type": "chat_template"}]}
    )
    with pytest.raises(DataInvalid, match="rows with image parts train with processor_type: AutoProcessor"):
        prepare_data(config, load_tokenizer(config))
