"""Preview speed on a big dataset (default 1 GB of chat JSONL): time to the first preview after the
upload, and the p95 time to preview a random row, against tokenizing that row directly.
Goal: p95 preview <= 2 x direct tokenize + 50 ms. Prints a table, then one line of JSON."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

from _setup import ROOT, fresh_data_dir, write_chat_jsonl


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()

    data = fresh_data_dir()
    path = data / "big.jsonl"
    rows = write_chat_jsonl(path, args.size_mb)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    import django

    django.setup()
    from django.core.files import File

    from webapp.base_models import resolve_base_model
    from webapp.datasets.encoding import EncodeOptions, _tokenizer
    from webapp.datasets.preview import preview_row
    from webapp.datasets.services import upload_dataset
    from webapp.datasets.storage import read_row
    from webapp.workspaces.models import Workspace

    workspace = Workspace.objects.get(name="Demo")
    start = time.perf_counter()
    with path.open("rb") as f:
        dataset = upload_dataset(workspace, None, File(f, name="big.jsonl")).dataset
    upload_s = time.perf_counter() - start
    options = EncodeOptions(model="tiny-chat")
    start = time.perf_counter()
    preview_row(dataset, 0, options)  # cold: loads the tokenizer too
    first_s = time.perf_counter() - start

    rng = random.Random(0)
    picks = [rng.randrange(dataset.rows) for _ in range(args.samples)]
    tokenizer = _tokenizer(resolve_base_model("tiny-chat"))
    preview_ms, direct_ms = [], []
    for index in picks:
        start = time.perf_counter()
        preview_row(dataset, index, options)
        preview_ms.append(1000 * (time.perf_counter() - start))
        row = read_row(dataset, index)
        start = time.perf_counter()
        tokenizer.apply_chat_template(row["messages"], tokenize=True)
        direct_ms.append(1000 * (time.perf_counter() - start))
    figures = {
        "size_mb": args.size_mb,
        "rows": rows,
        "upload_s": round(upload_s, 1),
        "first_preview_s": round(first_s, 3),
        "preview_p50_ms": round(statistics.median(preview_ms), 2),
        "preview_p95_ms": round(p95(preview_ms), 2),
        "direct_p95_ms": round(p95(direct_ms), 2),
        "goal_p95_ms": round(2 * p95(direct_ms) + 50, 2),
    }
    figures["ratio"] = round(figures["preview_p95_ms"] / max(figures["direct_p95_ms"], 1e-9), 2)
    print(
        f"{rows} rows, {args.size_mb} MB: upload {figures['upload_s']} s, first preview {figures['first_preview_s']} s"
    )
    print(
        f"random-row preview p50 {figures['preview_p50_ms']} ms, p95 {figures['preview_p95_ms']} ms; "
        f"direct tokenize p95 {figures['direct_p95_ms']} ms (goal p95 <= {figures['goal_p95_ms']} ms)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
