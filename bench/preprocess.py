"""Encoding speed: our encoder (render + tokenize + labels) vs the fast tokenizer alone on pre-rendered texts.

Both encode the same generated 20k-row chat dataset in one run, on the offline demo tokenizer.
Goal: ours >= 0.75x the baseline's rows/s. Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
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


def best_of_interleaved(a, b, repeats: int) -> tuple[float, float]:
    """Best time of each, the two taking turns: a noisy neighbour slows both, not one of them."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((a, times[0]), (b, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", help="model folder (default: build the demo model in a temp dir)")
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
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
