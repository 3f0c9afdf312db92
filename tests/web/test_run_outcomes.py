"""Run outcomes that must not lie (issue 14): a diverged run fails with its step and the fix and offers no
NaN weights; disk faults say what is wrong with the disk; a resumed attempt killed before its own first
checkpoint can be resumed again; merges and playground answers at once all succeed."""

from __future__ import annotations

import math

import pytest

from tests.helpers import GOOD
from webapp.runs import artifacts
from webapp.runs.models import Artifact, MetricPoint, Run, RunStatus

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _finite_safetensors(folder) -> bool:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return all(bool(t.isfinite().all()) for t in tensors.values())


def test_a_diverged_run_fails_with_its_step_and_the_fix_and_offers_no_nan_adapter(alice_client, alice_dataset):
    yaml_text = GOOD.format(steps=12).replace("learning_rate: 0.003", "learning_rate: 20") + "save_steps: 2\n"
    alice_client.post("/configs/new/", {"name": "lr20", "yaml": yaml_text, "action": "run"})
    run = Run.objects.get(name="lr20")  # huey immediate: the real trainer ran
    assert run.status == RunStatus.FAILED, (run.status, run.message)
    points = list(MetricPoint.objects.filter(run=run).order_by("seq"))
    first_bad = next(
        p.step
        for p in points
        if any(isinstance(v, str) and v in ("nan", "inf", "-inf") for v in p.values.values())
        or (isinstance(p.values.get("loss"), float) and not math.isfinite(p.values["loss"]))
    )
    assert run.message.startswith(f"training diverged at step {first_bad}: "), run.message
    assert "lower learning_rate (20 now)" in run.message and "max_grad_norm" in run.message
    # The loop stopped at the divergence: no steps of NaN afterwards, and no 0.0 loss standing in for NaN.
    assert max(p.step for p in points) == first_bad
    assert not any(p.values.get("loss") == 0.0 for p in points)
    # No adapter is written or offered; the checkpoints kept hold finite weights, the last one is named.
    assert not (run.run_dir / "adapter").exists()
    assert not Artifact.objects.filter(run=run).exclude(kind="checkpoint").exists()
    kept = sorted(run.run_dir.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert kept and all(_finite_safetensors(c) for c in kept)
    assert f"{kept[-1].name} (step {kept[-1].name.split('-')[1]}) is the last checkpoint with finite weights" in (
        run.message
    )
    assert artifacts.playground_source(run) == kept[-1]
    # The health cell names the divergence and nothing the NaN made up (no "loss fell to 0").
    assert [a["code"] for a in run.health] == ["nonfinite"], run.health
    page = alice_client.get(f"/runs/{run.pk}/").content.decode()
    assert "training diverged at step" in page and "trivial or leaked" not in page
