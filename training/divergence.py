"""A diverged run (a loss, gradient norm or weights no longer finite) stops before it saves poisoned weights
and fails with the step, what went non-finite and the fix; the last checkpoint with finite weights is named.

The Trainer's `logging_nan_inf_filter` (on by default) logs a NaN step's loss as the mean of the losses since
the last log: with a log every step that mean is over nothing, so a diverged run showed a loss of exactly 0.0.
Trainyard turns the filter off (training/train.py), so the loss this guard and the run page see is the real one.
"""

from __future__ import annotations

import math
from pathlib import Path

FIX = (
    "lower learning_rate, keep max_grad_norm (gradient clipping) on, add warmup_steps, prefer bf16 over fp16, and "
    "look for empty or extreme rows in the data"
)
WATCHED = ("loss", "grad_norm", "eval_loss")  # logged values whose non-finite value may mean the weights are gone


class Diverged(Exception):
    """The run's loss or weights went non-finite: no final artifact is written."""


def _nonfinite(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def weights_finite(model) -> bool:
    """Whether every trainable parameter is finite (the adapter's for LoRA: cheap). With several processes each
    holds a shard (FSDP, ZeRO-3): they agree through one all-reduce, so every rank stops or goes on together."""
    import torch

    def local(p):  # a DTensor (FSDP2) is checked shard by shard: the all-reduce below joins the shards
        t = p.detach()
        return t.to_local() if hasattr(t, "to_local") else t

    ok = all(bool(torch.isfinite(local(p)).all()) for p in model.parameters() if p.requires_grad and p.numel())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        flag = torch.tensor([0 if ok else 1], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        ok = not flag.item()
    return ok


def last_finite_checkpoint(checkpoints: Path, before_step: int) -> Path | None:
    """The newest complete checkpoint saved at or before `before_step`. The guard never lets a checkpoint with
    non-finite weights be written, so a complete one from before the divergence holds finite weights."""
    found = [
        p
        for p in (checkpoints.glob("checkpoint-*") if checkpoints.is_dir() else [])
        if p.name.split("-")[-1].isdigit()
        and int(p.name.split("-")[-1]) <= before_step
        and (p / "trainer_state.json").exists()
    ]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def divergence_guard(sink):
    """A TrainerCallback that watches each step: a non-finite loss, or a non-finite gradient norm / eval loss
    with weights that are no longer finite (fp16's loss scaler skips an overflowing step and keeps the weights
    finite: that is no divergence), stops the loop and cancels that step's evaluation and checkpoint. Before any
    checkpoint is saved the weights are checked too, so a checkpoint never holds NaN. `diverged` says why."""
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        def __init__(self):
            self.step: int | None = None  # the first step whose loss or weights were non-finite
            self.reasons: list[str] = []
            self.learning_rate: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.learning_rate = args.learning_rate

        def _stop(self, control, step: int, reason: str) -> None:
            if self.step is None:
                self.step = step
                sink.emit("log", message=f"ERROR diverged at step {step}: {reason}; stopping before it is saved")
            if self.step == step and reason not in self.reasons:
                # What the log showed (the cause) before what the weights check found (the consequence).
                weights = reason.startswith("the weights")
                self.reasons.insert(len(self.reasons) if weights else 0, reason)
            control.should_training_stop = True
            control.should_save = False  # a checkpoint of this step would hold the non-finite weights
            control.should_evaluate = False

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_save and model is not None and not weights_finite(model):
                self._stop(control, state.global_step, "the weights are no longer finite")

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            self.on_step_end(args, state, control, model=model, **kwargs)

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            logs = logs or {}
            bad = [k for k in WATCHED if _nonfinite(logs.get(k))]
            if not bad:
                return
            described = ", ".join(f"{k} is {logs[k]}" for k in bad)
            weights_gone = self.step is None and model is not None and not weights_finite(model)
            if "loss" in bad or self.step is not None or weights_gone:
                self._stop(control, state.global_step, described)
            if weights_gone:
                self._stop(control, state.global_step, "the weights are no longer finite")

        @property
        def diverged(self) -> bool:
            return self.step is not None

        def message(self, run_dir: Path, resumed_from: Path | None = None) -> str:
            kept = last_finite_checkpoint(Path(run_dir) / "checkpoints", self.step or 0)
            if kept is not None:
                where = (
                    f"{kept.name} (step {kept.name.split('-')[-1]}) is the last checkpoint with finite weights: "
                    "try it in the playground or download it."
                )
            elif resumed_from is not None:
                where = f"This attempt saved no checkpoint before it; it started from {resumed_from.name}."
            else:
                where = "No checkpoint was saved before it (save_steps keeps some)."
            fix = (
                FIX
                if self.learning_rate is None
                else FIX.replace("learning_rate", f"learning_rate ({self.learning_rate:g} now)", 1)
            )
            return (
                f"training diverged at step {self.step}: {'; '.join(self.reasons)}. No adapter or model was written. "
                f"Fix: {fix}. {where}"
            )

    return DivergenceGuard()
