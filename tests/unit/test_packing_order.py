"""Packing is first-fit decreasing, exactly: the fast bin search gives the bins a scan of every bin gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from training.encode import Encoded
from training.packing import pack


def scan_every_bin(lengths: list[int], sequence_len: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if room >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(sequence_len - lengths[i])
    return bins


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), max_size=300), sequence_len=st.integers(64, 200))
def test_same_bins_as_first_fit_decreasing_by_scanning(lengths, sequence_len):
    samples = [Encoded(i, [7] * n, [7] * n, [-1] * n, []) for i, n in enumerate(lengths)]
    assert [b.samples for b in pack(samples, sequence_len)] == scan_every_bin(lengths, sequence_len)
