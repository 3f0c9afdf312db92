"""Small local stand-ins of the Hub datasets the seed configs name, written as Parquet with the same
columns, laid out as the Hub lays them out (`data/train-00000-of-00001.parquet`).

Point a config's `path` at the folder (or at the file, with `ds_type: parquet`) and keep its `split`.
"""

from __future__ import annotations

from pathlib import Path

TOPICS = ["the tides", "prime numbers", "sourdough", "photosynthesis", "git rebase", "jet lag", "rainbows"]


def finetome_rows(n: int) -> list[dict]:
    """mlabonne/FineTome-100k: ShareGPT `conversations` (from / value), `source`, `score`."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        turns = [
            {"from": "human", "value": f"Explain {topic} in one sentence. ({i})"},
            {"from": "gpt", "value": f"{topic.capitalize()} come down to a simple rule, number {i}."},
        ]
        if i % 3 == 0:
            turns = [{"from": "system", "value": "You are a patient teacher."}, *turns]
        if i % 4 == 0:
            turns += [
                {"from": "human", "value": "And why does it matter?"},
                {"from": "gpt", "value": f"Because {topic} shape everyday life ({i})."},
            ]
        rows.append({"conversations": turns, "source": "standin/finetome", "score": 4.0 + (i % 10) / 10})
    return rows


def alpaca_messages_rows(n: int) -> list[dict]:
    """fozziethebeat/alpaca_messages_2k_test: alpaca's `instruction` / `input` / `output` and the same
    row as chat `messages` (role / content)."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        instruction, given = f"Write a title about {topic}.", (f"Audience: readers aged {10 + i}" if i % 2 else "")
        output = f"All about {topic}, part {i}"
        prompt = f"{instruction}\n\n{given}" if given else instruction
        rows.append(
            {
                "instruction": instruction,
                "input": given,
                "output": output,
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}],
            }
        )
    return rows


STANDINS = {
    "mlabonne/FineTome-100k": finetome_rows,
    "fozziethebeat/alpaca_messages_2k_test": alpaca_messages_rows,
}


def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def write_hub_standins(root: Path, rows: int = 50) -> dict[str, Path]:
    """Hub id -> a local folder holding `data/train-00000-of-00001.parquet` with `rows` rows."""
    out = {}
    for hub_id, make in STANDINS.items():
        folder = Path(root) / hub_id.split("/")[1]
        write_parquet(folder / "data" / "train-00000-of-00001.parquet", make(rows))
        out[hub_id] = folder
    return out


def point_at_standins(datasets: list[dict], root: Path, rows: int = 50) -> list[dict]:
    """A config's `datasets:` entries with each known Hub id replaced by its local stand-in folder
    (every other key, `split` included, kept)."""
    folders = write_hub_standins(root, rows)
    return [{**d, "path": str(folders[d["path"]])} if d.get("path") in folders else d for d in datasets]
