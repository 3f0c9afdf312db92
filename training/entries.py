"""One `datasets:` entry from its source to encoded samples: the path the trainer (train.encode_dataset) and
`trainyard preprocess` share, so what the command reports is what a run trains on. The command only
formats what this yields; the trainer keeps the samples.

Light to import (no torch, no transformers): `trainyard preprocess` starts with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from training.config import TrainConfig
from training.encode import Dropped, Encoded, Encoder, EncodeStats
from training.rows import LineProblem
from training.sources import Source, SourceError, open_source

PROBLEMS_SHOWN = 20


class DataInvalid(ValueError):
    """A dataset can't be found or opened, or holds invalid rows: the message says which, with their numbers."""


def open_entry_source(config: TrainConfig, index: int, base_dir: Path | None = None) -> Source:
    """Where entry `index`'s rows come from, resolved without reading one (local files, folders, save_to_disk,
    Hub ids: training/sources.py)."""
    try:
        return open_source(config.datasets[index], base_dir)
    except SourceError as exc:
        raise DataInvalid(f"datasets[{index}].path: {exc}") from None


def open_sources(config: TrainConfig, base_dir: Path | None = None) -> list[Source]:
    """Every entry's source: a missing dataset (or one in no cache, offline) is said before a tokenizer loads."""
    return [open_entry_source(config, index, base_dir) for index in range(len(config.datasets))]


class EntryEncoding:
    """One entry being encoded with the trainer's encoder: its outcomes, and the stats, invalid rows and
    notes they add up to. Building it raises ValueError for a config the encoder can't work with (a chat
    template that doesn't parse, end-token policies that contradict each other)."""

    def __init__(
        self,
        config: TrainConfig,
        tokenizer,
        index: int,
        source: Source | None = None,
        base_dir: Path | None = None,
        processor=None,
    ):
        self.index = index
        self.source = source if source is not None else open_entry_source(config, index, base_dir)
        if processor is None:
            self.encoder = Encoder.from_config(tokenizer, config, index, base_dir)
        else:  # image rows (processor_type): image paths are read beside the data (training/multimodal.py)
            from training.multimodal import ImageEncoder, source_dirs

            self.encoder = ImageEncoder.from_config(
                tokenizer, config, index, base_dir, processor=processor, image_dirs=source_dirs(self.source)
            )
        self.stats = EncodeStats()
        self.problems: list[LineProblem] = []  # invalid rows, numbered as a user finds them

    @property
    def label(self) -> str:
        return self.source.label

    def outcomes(self) -> Iterator[Encoded | Dropped]:
        """Every row's outcome in order, streamed: memory is bounded by what the caller keeps. Invalid rows
        also go to `problems`; `excess_length_strategy: raise` raises SequenceTooLong at the first long row."""
        try:
            for outcome in self.encoder.encode_numbered(self.source.rows(), self.stats):
                if isinstance(outcome, Dropped) and outcome.reason == "invalid":
                    self.problems.append(LineProblem(outcome.row + 1, "", outcome.detail, self.source.unit))
                yield outcome
        except SourceError as exc:  # a file that turns out unreadable past its first rows
            raise DataInvalid(f"datasets[{self.index}].path: {exc}") from None

    def parts_in_parallel(self, workers: int, jsonl: bool) -> Iterator[str | None] | None:
        """For one whole local JSONL file big enough to pay for more processes: the rows encoded by `workers`
        forked processes (training/parallel_encode.py), yielding in file order each chunk's part file of
        `--jsonl` lines (None without `jsonl`) while its stats, problems and notes are added here. None
        for any other source (the caller takes `outcomes()`). The trainer never forks: its process holds torch."""
        from training.parallel_encode import jsonl_worth_splitting

        file = _one_jsonl_file(self.source)
        if file is None or not jsonl_worth_splitting(file, workers):
            return None
        return self._parallel(file, workers, jsonl)

    def _parallel(self, file: Path, workers: int, jsonl: bool) -> Iterator[str | None]:
        from training.parallel_encode import encode_file_parallel, merge_stats

        for part in encode_file_parallel(self.encoder, file, workers, jsonl):
            merge_stats(self.stats, part.stats)
            self.encoder.notes.update(part.notes)
            self.problems += [LineProblem(row, "", message, self.source.unit) for row, message in part.problems]
            yield part.part

    def warnings(self) -> list[str]:
        return self.encoder.warnings()

    def first_problems(self) -> list[LineProblem]:
        return sorted(self.problems, key=lambda p: p.line)[:PROBLEMS_SHOWN]

    def raise_if_invalid(self) -> None:
        """The trainer's rule: a dataset with invalid rows is not trained on (the message lists the first)."""
        if not self.problems:
            return
        unit, more = self.source.unit, len(self.problems) - PROBLEMS_SHOWN
        shown = "\n".join(f"  {self.label}:{p}" for p in self.first_problems())
        tail = f"\n  ... and {more} more" if more > 0 else ""
        image_parts = any("content part needs a string `text`" in p.message for p in self.problems)
        if image_parts and not self.encoder.masked_ids:  # a text encoder met image rows
            tail += "\n  rows with image parts train with processor_type: AutoProcessor and skip_prepare_dataset: true"
        raise DataInvalid(f"{len(self.problems)} invalid {unit}(s) in {self.label}:\n{shown}{tail}")


def _one_jsonl_file(source: Source) -> Path | None:
    """The file of a source that is one whole local JSONL file (what parallel_encode splits), else None."""
    files = [f for fs in source.splits.values() for f in fs]
    whole = len(source.slices) == 1 and source.slices[0].whole and source.slices[0].split in source.splits
    if source.hub_id is None and len(files) == 1 and files[0][1] == "json" and whole:
        return files[0][0]
    return None
