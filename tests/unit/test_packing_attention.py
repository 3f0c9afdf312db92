"""Packed samples must not attend to each other: the backends the config calls isolating really are."""

from __future__ import annotations

import pytest
import torch

from training.config import ATTENTION_BACKENDS


@pytest.mark.parametrize(
    "backend", [b for b, caps in ATTENTION_BACKENDS.items() if caps.isolates_packed_samples and not caps.needs_cuda]
)
def test_packed_logits_equal_separate_logits(tiny_model_dir, backend):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=backend).eval()
    a, b = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[11, 12, 13]])
    with torch.no_grad():
        alone_a = model(a, use_cache=False).logits
        alone_b = model(b, use_cache=False).logits
        packed = model(
            torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2]]), use_cache=False
        ).logits
    torch.testing.assert_close(packed[0, :6], alone_a[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[0, 6:], alone_b[0], atol=1e-4, rtol=1e-4)
