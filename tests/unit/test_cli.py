"""`trainyard preprocess` (a public contract) and `trainyard train`, run as a user runs them."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from training.cli import main


@pytest.fixture
def project(tmp_path, tiny_model_dir):
    (tmp_path / "chat.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Only a question"}]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]})
        + "\n"
    )
    # Relative dataset path: resolved next to the config file.
    (tmp_path / "config.yaml").write_text(
        f"base_model: {tiny_model_dir}\ndatasets:\n  - path: chat.jsonl\n    type: chat_template\n"
        "sequence_len: 64\nsample_packing: true\n"
    )
    return tmp_path


def test_preprocess_prints_summary_and_writes_jsonl(project, capsys):
    out_file = project / "out.jsonl"
    assert main(["preprocess", str(project / "config.yaml"), "--jsonl", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "3 rows read, 2 samples kept" in out
    assert "dropped 1: no_trained_tokens" in out
    assert "packing: 2 samples into 1 bins of 64" in out
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [line["row"] for line in lines] == [0, 2]
    assert all(len(line["input_ids"]) == len(line["labels"]) for line in lines)


def test_preprocess_debug_marks_trained_tokens(project, capsys):
    main(["preprocess", str(project / "config.yaml"), "--debug", "--rows", "1", "--no-color"])
    out = capsys.readouterr().out
    assert "--- chat.jsonl row 0" in out
    assert "<|im_start|>(1, -100)" in out  # masked: plain, label -100
    assert re.search(r"\[<\|im_end\|>\(2, 2\)\]", out)  # trained: bracketed, label = id
    main(["preprocess", str(project / "config.yaml"), "--debug", "--rows", "3", "--no-color"])
    out = capsys.readouterr().out
    assert "--- chat.jsonl row 1 DROPPED (no_trained_tokens" in out  # the user-only row, shown with why


def test_preprocess_bad_line_names_file_line_and_field(project, capsys):
    with (project / "chat.jsonl").open("a") as f:
        f.write('{"messages": [{"role": "user", "content": 5}]}\n{broken\n')
    assert main(["preprocess", str(project / "config.yaml")]) == 1
    err = capsys.readouterr().err
    assert "chat.jsonl:line 4: messages[0].content: must be a string, not int" in err
    assert "chat.jsonl:line 5: invalid JSON" in err


def test_invalid_config_exits_non_zero_naming_the_key(project):
    (project / "bad.yaml").write_text("base_model: x\ndatasets:\n  - path: chat.jsonl\n    type: nope\n")
    with pytest.raises(SystemExit) as info:
        main(["preprocess", str(project / "bad.yaml")])
    assert "datasets[0].type: unknown dataset type 'nope'" in str(info.value.code)


@pytest.mark.slow
def test_train_command_writes_events_and_a_failure_reason(project, tmp_path):
    config = project / "config.yaml"
    config.write_text(config.read_text().replace("base_model:", "base_model: /nonexistent/model\n#"))
    result = subprocess.run(
        [sys.executable, "-m", "training", "train", str(config), "--run-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    events = [json.loads(line) for line in (tmp_path / "r" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "status" and events[-1]["state"] == "failed"
    assert "base_model: folder '/nonexistent/model' does not exist" in events[-1]["message"]


def test_out_of_memory_failures_name_the_fix():
    from training.cli import explain_failure

    class OutOfMemoryError(RuntimeError):
        pass

    reason = explain_failure(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "lower micro_batch_size" in reason and "gradient_checkpointing" in reason and "sequence_len" in reason
    assert explain_failure(ValueError("bad thing\nmore")) == "ValueError: bad thing"


def test_bad_input_is_one_clear_error_not_a_traceback(project, tiny_model_dir, capsys):
    import shutil

    config = project / "config.yaml"
    base = config.read_text()
    # A tokenizer folder next to the config, named relatively: found there.
    shutil.copytree(tiny_model_dir, project / "tok")
    config.write_text(base.replace(f"base_model: {tiny_model_dir}", "base_model: tok"))
    assert main(["preprocess", str(config)]) == 0
    cases = {
        "excess_length_strategy: raise\nsequence_len: 9\n": "line 1: ",
        'chat_template: jinja\nchat_template_jinja: "{% for m in messages %}{{ m.content }"\n': "doesn't parse: line 1",
        "chat_template: tokenizer_default_fallback_nope\n": "unknown chat_template",
    }
    for extra, words in cases.items():
        config.write_text(base.replace("sequence_len: 64\n", "") + extra)
        capsys.readouterr()
        try:
            assert main(["preprocess", str(config)]) == 2, extra
            err = capsys.readouterr().err
        except SystemExit as refused:  # refused at validation (an unknown template name), one line per key
            err = str(refused.code)
        assert words in err and "Traceback" not in err, err


def test_preprocess_reads_a_parquet_standin_of_a_hub_dataset_with_a_split(tmp_path, tiny_model_dir, capsys):
    from tests.helpers_data import write_hub_standins

    folder = write_hub_standins(tmp_path, rows=40)["mlabonne/FineTome-100k"]
    config = tmp_path / "config.yaml"
    config.write_text(
        f"base_model: {tiny_model_dir}\nsequence_len: 256\ndatasets:\n"
        f"  - path: {folder.name}\n    type: chat_template\n    split: train[:10%]\n"
        "    field_messages: conversations\n    message_property_mappings:\n      role: from\n      content: value\n"
    )
    assert main(["preprocess", str(config)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "4 rows read, 4 samples kept" in out  # 10% of 40, every row trained
    config.write_text(
        config.read_text().replace(f"path: {folder.name}", f"path: {folder.name}/data/train-00000-of-00001.parquet")
    )
    assert main(["preprocess", str(config)]) == 0
    assert "4 rows read, 4 samples kept" in capsys.readouterr().out


def test_preprocess_reads_a_file_with_a_bom_and_csv(project, capsys):
    chat = project / "chat.jsonl"
    chat.write_bytes(b"\xef\xbb\xbf" + chat.read_bytes())
    assert main(["preprocess", str(project / "config.yaml")]) == 0, capsys.readouterr().err
    assert "3 rows read, 2 samples kept" in capsys.readouterr().out
    (project / "alpaca.csv").write_text(
        'instruction,input,output\n"Say hi","","Hi!"\n"Add","1 and 2","3"\n', encoding="utf-8-sig"
    )
    config = project / "config.yaml"
    config.write_text(
        config.read_text().replace("path: chat.jsonl\n    type: chat_template", "path: alpaca.csv\n    type: alpaca")
    )
    assert main(["preprocess", str(config)]) == 0, capsys.readouterr().err
    assert "2 rows read, 2 samples kept" in capsys.readouterr().out


def test_preprocess_says_a_hub_dataset_is_not_cached_offline_before_loading_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TRAINYARD_DATA_DIR", str(tmp_path))
    config = tmp_path / "config.yaml"
    config.write_text(  # the model does not exist either: the dataset is checked first
        "base_model: nobody/no-model\ndatasets:\n  - path: mlabonne/FineTome-100k\n    type: chat_template\n"
        "    split: train[:20%]\n"
    )
    assert main(["preprocess", str(config)]) == 2
    err = capsys.readouterr().err
    assert "dataset 'mlabonne/FineTome-100k' is not in the local cache (offline" in err and "Traceback" not in err


CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_chat_template_jinja_file_beside_the_config_is_read_from_any_working_directory(
    project, tmp_path_factory, monkeypatch, capsys, tokenizer
):
    from training.config import parse_config
    from training.train import encode_dataset

    (project / "my_template.jinja").write_text(CHATML_JINJA)
    config = project / "config.yaml"
    config.write_text(config.read_text() + "chat_template: jinja\nchat_template_jinja: my_template.jinja\n")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # the file is not beside the working directory
    out_file = project / "out.jsonl"
    assert main(["preprocess", str(config), "--jsonl", str(out_file)]) == 0, capsys.readouterr().err
    assert "3 rows read, 2 samples kept" in capsys.readouterr().out
    first = json.loads(out_file.read_text().splitlines()[0])
    assert (
        tokenizer.decode(first["input_ids"])
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    # The trainer reads the same file through the config's folder.
    samples, stats, _ = encode_dataset(parse_config(config.read_text()), tokenizer, 0, project)
    assert [s.input_ids for s in samples][0] == first["input_ids"] and stats.samples == 2


def test_a_big_jsonl_file_is_encoded_across_processes_with_the_one_process_output(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    from training import parallel_encode
    from training.demo import chat_rows

    lines = [json.dumps(r) for r in chat_rows(3000, seed=11)]
    lines[5], lines[1700] = '{"messages": [{"role": "user", "content": 5}]}', "{broken"  # invalid rows
    lines[900] = ""  # a blank line still counts in the line numbers
    (tmp_path / "big.jsonl").write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    config = tmp_path / "config.yaml"
    config.write_text(
        f"base_model: {tiny_model_dir}\ndatasets:\n  - path: big.jsonl\n    type: chat_template\n"
        "sequence_len: 256\nsample_packing: true\n"
    )
    monkeypatch.setattr(parallel_encode, "MIN_BYTES", 0)
    monkeypatch.setattr(parallel_encode, "CHUNK_BYTES", 64 * 1024)  # ~20 chunks of this 1.3 MB file
    assert len(parallel_encode.plan_chunks(tmp_path / "big.jsonl", 64 * 1024)) > 10
    outputs = []
    for jobs in ("1", "2"):
        code = main(["preprocess", str(config), "--jsonl", str(tmp_path / f"out{jobs}.jsonl"), "--jobs", jobs])
        captured = capsys.readouterr()
        outputs.append((code, captured.out, captured.err, (tmp_path / f"out{jobs}.jsonl").read_bytes()))
    assert outputs[0] == outputs[1]
    code, out, err, written = outputs[0]
    assert code == 1 and "2999 rows read, 2997 samples kept" in out and "packing: 2997 samples" in out
    assert "big.jsonl:line 6: " in err and "big.jsonl:line 1701: invalid JSON" in err  # numbered from the start
    assert json.loads(written.splitlines()[-1])["row"] == 2999


def test_a_model_folder_name_is_found_in_the_model_directories(project, tiny_model_dir, monkeypatch, capsys):
    """`base_model: tiny-chat` means the same folder on the command line as in the web app."""
    text = (project / "config.yaml").read_text().replace(f"base_model: {tiny_model_dir}", "base_model: tiny-chat")
    (project / "by-name.yaml").write_text(text)
    monkeypatch.chdir(project.parent)
    monkeypatch.setenv("TRAINYARD_MODEL_DIRS", f"/nonexistent:{tiny_model_dir.parent}")
    assert main(["preprocess", str(project / "by-name.yaml")]) == 0
    monkeypatch.setenv("TRAINYARD_MODEL_DIRS", "/nonexistent")
    with pytest.raises(SystemExit) as refused:
        main(["preprocess", str(project / "by-name.yaml")])
    assert "tiny-chat" in str(refused.value) or refused.value.code not in (0, None)


def test_encode_stats_count_lengths_bounded_by_sequence_len_not_one_per_sample(tokenizer):
    """The packing figures need lengths, not one list entry per sample: 3000 samples of 7 lengths are 7 counts."""
    from training.config import DatasetSpec
    from training.encode import Encoder, EncodeStats

    encoder = Encoder(tokenizer, DatasetSpec(path="rows", type="completion"), sequence_len=64)
    stats = EncodeStats()
    rows = ((n, {"text": "word " * (n % 7 + 1)}) for n in range(1, 3001))
    assert sum(1 for _ in encoder.encode_numbered(rows, stats)) == 3000
    assert stats.samples == sum(stats.lengths.values()) == 3000 and len(stats.lengths) == 7


def test_preprocess_reports_what_the_trainer_encodes(project, tokenizer, capsys):
    """One path (training/entries.py): the command's figures are the trainer's own stats for the same config."""
    from training.config import parse_config
    from training.train import encode_dataset

    config = project / "config.yaml"
    assert main(["preprocess", str(config)]) == 0
    out = capsys.readouterr().out
    samples, stats, _ = encode_dataset(parse_config(config.read_text()), tokenizer, 0, project)
    figures = (
        f"{stats.rows} rows read, {stats.samples} samples kept, {stats.tokens} tokens, {stats.trained_tokens} trained"
    )
    assert figures in out and len(samples) == stats.samples == 2
    assert f"dropped {stats.dropped['no_trained_tokens']}: no_trained_tokens" in out
