"""Sample packing: several encoded samples per sequence_len bin, position ids restarting per sample."""

from __future__ import annotations

from dataclasses import dataclass, field

from training.encode import IGNORE_INDEX, Encoded


@dataclass
class Bin:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)  # indexes into the list given to `pack`

    def add(self, index: int, sample: Encoded) -> None:
        self.samples.append(index)
        self.input_ids.extend(sample.input_ids)
        # The first label of a sample would be predicted from the previous sample's last token:
        # never a target, in a packed sequence or alone (causal LMs shift labels by one).
        self.labels.append(IGNORE_INDEX)
        self.labels.extend(sample.labels[1:])
        self.position_ids.extend(range(len(sample.input_ids)))


def pack(samples: list[Encoded], sequence_len: int) -> list[Bin]:
    """First-fit decreasing: each sample goes whole into the first bin with room. Samples never split."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    bins: list[Bin] = []
    free: list[int] = []
    for i in order:
        n = len(samples[i].input_ids)
        if n > sequence_len:
            raise ValueError(
                f"sample {i} has {n} tokens > sequence_len {sequence_len}; encode drops or truncates first"
            )
        for b, room in enumerate(free):
            if room >= n:
                bins[b].add(i, samples[i])
                free[b] -= n
                break
        else:
            bins.append(Bin())
            bins[-1].add(i, samples[i])
            free.append(sequence_len - n)
    return bins


def packing_efficiency(bins: list[Bin], sequence_len: int) -> float:
    """Real tokens / slots, when every bin is padded to sequence_len."""
    if not bins:
        return 0.0
    return sum(len(b.input_ids) for b in bins) / (len(bins) * sequence_len)
