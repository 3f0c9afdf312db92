"""Training health, after axolotl's "healthy training indicators": each alert names the likely cause
and the fix. Pure functions over metric points, so the worker, the page and tests share them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from training.divergence import FIX as DIVERGENCE_FIX

GRAD_SPIKE = 100.0
MIN_STEPS_FOR_TRENDS = 20


@dataclass(frozen=True)
class Alert:
    code: str
    level: str  # "critical" | "warning"
    step: int
    message: str
    fix: str

    def as_dict(self) -> dict:
        return asdict(self)


def _number(value) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def _nonfinite_keys(values: dict) -> list[str]:
    """The keys of one point whose value is NaN or infinite. A loss of exactly 0.0 beside a non-finite grad
    norm is the Trainer's logging_nan_inf_filter hiding a NaN loss (the mean of no earlier losses): it counts."""
    bad = [k for k, raw in values.items() if (v := _number(raw)) is not None and not math.isfinite(v)]
    if "grad_norm" in bad and "loss" not in bad and _number(values.get("loss")) == 0.0:
        bad.insert(0, "loss")
    return bad


def assess(points: list[dict]) -> list[Alert]:
    """points: [{"step": int, "values": {...}}] in order. Returns the current alerts, one per code.
    Trends (flat, collapse, overfit) read only the points before the first non-finite value: after it the
    weights are gone and the logged losses say nothing about the data."""
    alerts: dict[str, Alert] = {}
    losses, evals, zero_grads = [], [], 0
    for p in points:
        step, values = p["step"], p["values"]
        bad = _nonfinite_keys(values)
        if bad and "nonfinite" not in alerts:
            key = bad[0]
            raw = values[key] if _number(values[key]) != 0.0 else "nan (logged as 0.0)"
            alerts["nonfinite"] = Alert(
                "nonfinite",
                "critical",
                step,
                f"{key} is {raw} at step {step}",
                DIVERGENCE_FIX,
            )
        if "nonfinite" in alerts:
            continue  # trend alerts stop at the divergence; the point alerts above already name it
        grad = _number(values.get("grad_norm"))
        if grad is not None and math.isfinite(grad):
            if grad > GRAD_SPIKE and "grad_spike" not in alerts:
                alerts["grad_spike"] = Alert(
                    "grad_spike",
                    "warning",
                    step,
                    f"grad norm spiked to {grad:.0f} at step {step}",
                    "lower learning_rate or add warmup_steps; check the rows around this step",
                )
            zero_grads = zero_grads + 1 if grad == 0 else 0
            if zero_grads >= 3 and "zero_grad" not in alerts:
                alerts["zero_grad"] = Alert(
                    "zero_grad",
                    "critical",
                    step,
                    "grad norm is exactly 0: nothing is learning",
                    "check that the adapter targets layers of this model (lora_target_linear: true) and that rows "
                    "have trained tokens (preview the labels)",
                )
        loss = _number(values.get("loss"))
        if loss is not None and math.isfinite(loss):
            losses.append((step, loss))
        ev = _number(values.get("eval_loss"))
        if ev is not None and math.isfinite(ev):
            evals.append((step, ev, losses[-1][1] if losses else None))
    if len(losses) >= MIN_STEPS_FOR_TRENDS:
        window = max(5, len(losses) // 10)
        first = sum(v for _, v in losses[:window]) / window
        last = sum(v for _, v in losses[-window:]) / window
        if last >= first * 0.98:
            alerts["flat_loss"] = Alert(
                "flat_loss",
                "warning",
                losses[-1][0],
                f"loss is not falling ({first:.3f} → {last:.3f})",
                "raise learning_rate, check that labels train the right tokens, and that the data is not noise",
            )
        early = losses[: max(window, len(losses) // 5)]
        collapsed = next(((s, v) for s, v in early if v < 0.01), None)
        if collapsed:
            alerts["collapse"] = Alert(
                "collapse",
                "warning",
                collapsed[0],
                f"loss fell to {collapsed[1]:.4f} by step {collapsed[0]}",
                "the task may be trivial or leaked (answers in the prompt, duplicated rows): check the data and "
                "lower learning_rate",
            )
    if len(evals) >= 3:
        best = min(evals, key=lambda e: e[1])
        now = evals[-1]
        if now[1] > best[1] * 1.05 and now[2] is not None and best[2] is not None and now[2] < best[2]:
            alerts["overfit"] = Alert(
                "overfit",
                "warning",
                now[0],
                f"eval loss rose from {best[1]:.3f} (step {best[0]}) to {now[1]:.3f} while train loss kept falling",
                "overfitting: train fewer epochs or steps, add data, raise lora_dropout or weight_decay, or keep "
                "the checkpoint from the best eval step",
            )
    return list(alerts.values())


def downsample(points: list[dict], key: str = "loss", limit: int = 2000) -> list[dict]:
    """At most ~limit points: per bucket of steps, the points holding the min and max of `key`,
    plus every point without it (eval, summaries), so spikes and NaNs survive."""
    series = [p for p in points if key in p["values"]]
    if len(series) <= limit:
        return points
    others = [p for p in points if key not in p["values"]]
    size = math.ceil(len(series) / (limit // 2))
    kept = []
    for i in range(0, len(series), size):
        bucket = series[i : i + size]

        def value(p):
            v = _number(p["values"][key])
            return v if v is not None and math.isfinite(v) else math.inf

        nonfinite = [p for p in bucket if value(p) == math.inf]
        lo = min(bucket, key=value)
        hi = max(bucket, key=lambda p: value(p) if value(p) != math.inf else -math.inf)
        kept += {id(p): p for p in [lo, hi, *nonfinite[:1]]}.values()
    return sorted(kept + others, key=lambda p: p["seq"])
