"""Encoding speed: our encoder (render + tokenize + labels) vs the fast tokenizer alone on pre-rendered texts.

Both encode the same generated 20k-row chat dataset in one run, on the offline demo tokenizer.
Goal: ours >= 0.75x the baseline's rows/s. Prints a table, then one line of JSON.

A second figure times whole processes, start to exit: `trainyard preprocess` on that dataset (as a
JSONL file and a config) against a bare Python process that loads the same `tokenizer.json` with
`tokenizers` and batch-encodes the same rendered texts. Goal: ours <= 1.5x the bare process.
`trainyard preprocess` reads a plain tokenizer folder with `tokenizers` alone (training/light_tokenizer.py)
and splits the file across every core (training/parallel_encode.py); `--jobs 1` (one process) is timed
too. Both processes' CPU time (user + sys) is reported beside the wall clock: on a shared machine it
moves less with the neighbours' load. The package's bytecode is compiled first, as an install does
(this environment sets PYTHONDONTWRITEBYTECODE, so otherwise every run would compile `training/` from
source, ~0.2 s, while `tokenizers` is read compiled).

The in-process ratio is also reported for Qwen3 (rows with reasoning traces) and Gemma 4: their real
templates on the tiny family tokenizers of training/architectures.py; `--template-processes` adds the
whole-process figure on those rows. `--big-rows N` times `trainyard preprocess --jsonl` of a generated
N-row file with one process against every core (training/parallel_encode.py), and checks that both
outputs are the same bytes.
"""

from __future__ import annotations

import argparse
import compileall
import filecmp
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from training.config import DatasetSpec  # noqa: E402
from training.demo import build_demo_model, chat_rows  # noqa: E402
from training.encode import Encoder  # noqa: E402

BATCH = 1000
ROOT = Path(__file__).resolve().parents[1]
BARE = """
import json, sys
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
with open(sys.argv[2], encoding="utf-8") as f:
    texts = [json.loads(line) for line in f]
for i in range(0, len(texts), 1000):
    tokenizer.encode_batch(texts[i : i + 1000], add_special_tokens=False)
"""


def best_of_interleaved(a, b, repeats: int) -> tuple[float, float]:
    """Best time of each, the two taking turns: a noisy neighbour slows both, not one of them."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((a, times[0]), (b, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def best_processes(commands: dict[str, list[str]], repeats: int, env: dict) -> dict[str, tuple[float, float]]:
    """name -> (best wall-clock seconds, best CPU seconds of the process and its children), the
    commands taking turns."""
    walls: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            cpu, start = _children_cpu(), time.perf_counter()
            subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
            walls[name].append(time.perf_counter() - start)
            cpus[name].append(_children_cpu() - cpu)
    return {name: (min(walls[name]), min(cpus[name])) for name in commands}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", help="model folder (default: build the demo model in a temp dir)")
    parser.add_argument("--process-repeats", type=int, default=3, help="whole-process runs of each (0: skip)")
    parser.add_argument(
        "--template-processes", action="store_true", help="also the whole-process figure on Qwen3 and Gemma 4 rows"
    )
    parser.add_argument(
        "--big-rows", type=int, default=0, help="also time preprocess --jsonl of this many rows, 1 process vs all"
    )
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_dir = Path(args.model) if args.model else build_demo_model(Path(tempfile.mkdtemp()) / "tiny-chat")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = chat_rows(args.rows, seed=123)
    indexed = list(enumerate(rows))
    encoder = Encoder(tokenizer, DatasetSpec(path="bench"))
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]

    def ours():
        for _ in encoder.encode_stream(indexed, BATCH):
            pass

    def baseline():
        for i in range(0, len(texts), BATCH):
            tokenizer(texts[i : i + BATCH], add_special_tokens=False)["input_ids"]

    ours()  # warm caches (template compile) before timing either
    t_base, t_ours = best_of_interleaved(baseline, ours, args.repeats)
    figures = {
        "rows": args.rows,
        "baseline_rows_per_s": round(args.rows / t_base),
        "ours_rows_per_s": round(args.rows / t_ours),
        "ratio": round(t_base / t_ours, 3),
        "goal": 0.75,
    }
    print(f"baseline (tokenizer only): {figures['baseline_rows_per_s']:>8} rows/s")
    print(f"trainyard encoder:         {figures['ours_rows_per_s']:>8} rows/s")
    print(f"ratio {figures['ratio']} (goal >= 0.75)")
    for name, (family_tokenizer, template_rows) in TEMPLATE_ROWS.items():
        ratio = template_ratio(family_tokenizer(), template_rows(rows), args.repeats)
        figures[f"ratio_{name}"] = ratio
        print(f"ratio {name}: {ratio} (same measure, real template on a tiny tokenizer)")
    if args.process_repeats:
        figures.update(whole_process(model_dir, rows, texts, args.process_repeats))
        print(
            f"whole process: trainyard preprocess {figures['process_ours_s']} s, bare tokenizers process "
            f"{figures['process_bare_s']} s: ratio {figures['process_ratio']} (goal <= 1.5)"
        )
        print(
            f"  one process (--jobs 1): {figures['process_one_s']} s, ratio {figures['process_one_ratio']}; "
            f"CPU seconds: ours {figures['process_ours_cpu_s']}, one process {figures['process_one_cpu_s']}, "
            f"bare {figures['process_bare_cpu_s']}: ratio {figures['process_cpu_ratio']}"
        )
    if args.process_repeats and args.template_processes:
        for name, (family_tokenizer, template_rows) in TEMPLATE_ROWS.items():
            found = template_process(name, family_tokenizer(), template_rows(rows), args.process_repeats)
            figures.update({f"{key}_{name}": value for key, value in found.items() if key != "process_goal"})
            print(
                f"whole process, {name}: {found['process_ours_s']} s, bare {found['process_bare_s']} s: ratio "
                f"{found['process_ratio']} (one process: {found['process_one_s']} s, "
                f"ratio {found['process_one_ratio']})"
            )
    if args.big_rows:
        figures.update(across_processes(model_dir, args.big_rows, args.process_repeats or 1))
        print(
            f"{args.big_rows} rows, --jsonl: one process {figures['big_one_s']} s, {figures['big_jobs']} processes "
            f"{figures['big_all_s']} s: speed-up {figures['big_speedup']}x"
        )
    print(json.dumps(figures))


def _family_tokenizer(family: str, template: str):
    from training.architectures import build_tokenizer
    from training.formats.chat_template import named_template

    tokenizer = build_tokenizer(family)  # the family's special tokens on a tiny BPE
    tokenizer.chat_template = named_template(template)
    return tokenizer


def _with_thinking(rows: list[dict]) -> list[dict]:
    """Every assistant turn with a reasoning trace (Qwen3 renders the last one, after the last question)."""
    return [
        {"messages": [
            {**m, "reasoning_content": f"The user asks: {m['content'][:40]}. Answer briefly."}
            if m["role"] == "assistant" else m
            for m in r["messages"]
        ]}
        for r in rows
    ]  # fmt: skip


TEMPLATE_ROWS = {
    "qwen3_thinking": (lambda: _family_tokenizer("qwen3_5", "qwen3"), _with_thinking),
    "gemma4": (lambda: _family_tokenizer("gemma4", "gemma4"), lambda rows: rows),
}


def template_ratio(tokenizer, rows: list[dict], repeats: int) -> float:
    """Bare batched tokenizer on the texts the template renders / our encoder on the rows (rows/s ratio)."""
    indexed = list(enumerate(rows))
    encoder = Encoder(tokenizer, DatasetSpec(path="bench"))
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]

    def ours():
        for _ in encoder.encode_stream(indexed, BATCH):
            pass

    def baseline():
        for i in range(0, len(texts), BATCH):
            tokenizer(texts[i : i + BATCH], add_special_tokens=False)["input_ids"]

    ours()
    t_base, t_ours = best_of_interleaved(baseline, ours, repeats)
    return round(t_base / t_ours, 3)


def template_process(name: str, tokenizer, rows: list[dict], repeats: int) -> dict:
    """whole_process on a family's tokenizer, saved as a folder (read by the light loader, as the demo's)."""
    model_dir = Path(tempfile.mkdtemp(prefix=f"trainyard-bench-{name}-"))
    tokenizer.save_pretrained(model_dir)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    try:
        return whole_process(model_dir, rows, texts, repeats)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def whole_process(model_dir: Path, rows: list[dict], texts: list[str], repeats: int) -> dict:
    """Wall-clock seconds of `trainyard preprocess` and of a bare tokenizers process, best of `repeats`."""
    work = Path(tempfile.mkdtemp(prefix="trainyard-bench-"))
    with (work / "chat.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with (work / "texts.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(t) + "\n" for t in texts)
    (work / "config.yaml").write_text(
        f"base_model: {model_dir}\nsequence_len: 4096\ndatasets:\n  - path: chat.jsonl\n    type: chat_template\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    compileall.compile_dir(ROOT / "training", quiet=1)  # as `pip install` does (see the docstring)
    ours = [sys.executable, "-m", "training", "preprocess", str(work / "config.yaml")]
    commands = {
        "bare": [sys.executable, "-c", BARE, str(model_dir / "tokenizer.json"), str(work / "texts.jsonl")],
        "ours": ours,
        "one": [*ours, "--jobs", "1"],
    }
    best = best_processes(commands, repeats, env)
    (t_bare, cpu_bare), (t_ours, cpu_ours), (t_one, cpu_one) = best["bare"], best["ours"], best["one"]
    return {
        "process_ours_s": round(t_ours, 2),
        "process_bare_s": round(t_bare, 2),
        "process_ratio": round(t_ours / t_bare, 2),
        "process_goal": 1.5,
        "process_one_s": round(t_one, 2),
        "process_one_ratio": round(t_one / t_bare, 2),
        "process_ours_cpu_s": round(cpu_ours, 2),
        "process_one_cpu_s": round(cpu_one, 2),
        "process_bare_cpu_s": round(cpu_bare, 2),
        "process_cpu_ratio": round(cpu_ours / cpu_bare, 2),
    }


def across_processes(model_dir: Path, n_rows: int, repeats: int) -> dict:
    """`trainyard preprocess --jsonl` of a generated n_rows file: --jobs 1 against every core."""
    work = Path(tempfile.mkdtemp(prefix="trainyard-bench-big-"))
    with (work / "big.jsonl").open("w", encoding="utf-8") as f:
        for start in range(0, n_rows, 20_000):  # generated in slices: never all rows in memory
            f.writelines(json.dumps(r) + "\n" for r in chat_rows(min(20_000, n_rows - start), seed=start))
    (work / "config.yaml").write_text(
        f"base_model: {model_dir}\nsequence_len: 4096\ndatasets:\n  - path: big.jsonl\n    type: chat_template\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    jobs = os.cpu_count() or 1
    size_mb = round((work / "big.jsonl").stat().st_size / 2**20)

    def run(n):
        cmd = [sys.executable, "-m", "training", "preprocess", str(work / "config.yaml"), "--jobs", str(n)]
        cmd += ["--jsonl", str(work / f"out{n}.jsonl")]
        return lambda: subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)

    try:
        t_one, t_all = best_of_interleaved(run(1), run(jobs), repeats)
        same = filecmp.cmp(work / "out1.jsonl", work / f"out{jobs}.jsonl", shallow=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the input and two outputs: ~1 GB at 1M rows
    assert same or jobs == 1, "the parallel output differs from one process's"
    return {
        "big_rows": n_rows,
        "big_mb": size_mb,
        "big_jobs": jobs,
        "big_one_s": round(t_one, 2),
        "big_all_s": round(t_all, 2),
        "big_speedup": round(t_one / t_all, 2),
    }


if __name__ == "__main__":
    main()
