"""Health alerts from metrics, and history downsampling that keeps what matters."""

from training.health import assess, downsample


def pts(losses, **extra):
    return [
        {"seq": i, "step": i + 1, "values": {"loss": v, **{k: f(i) for k, f in extra.items()}}}
        for i, v in enumerate(losses)
    ]


def codes(points):
    return {a.code for a in assess(points)}


def test_healthy_falling_loss_raises_nothing():
    assert codes(pts([5 - i * 0.05 for i in range(60)], grad_norm=lambda i: 1.5)) == set()


def test_nan_anywhere_is_critical_with_a_fix():
    points = pts([3.0] * 5)
    points[3]["values"]["grad_norm"] = "nan"
    (alert,) = assess(points)
    assert alert.code == "nonfinite" and alert.level == "critical" and alert.step == 4
    assert "learning_rate" in alert.fix


def test_flat_loss_spike_and_zero_gradients():
    assert "flat_loss" in codes(pts([4.0 + (i % 2) * 0.01 for i in range(40)]))
    assert "grad_spike" in codes(pts([3.0] * 5, grad_norm=lambda i: 500.0 if i == 2 else 1.0))
    assert "zero_grad" in codes(pts([3.0] * 5, grad_norm=lambda i: 0.0))


def test_early_collapse_and_overfitting():
    assert "collapse" in codes(pts([2.0, 0.5, 0.005] + [0.001] * 40))
    train = pts([3 - i * 0.02 for i in range(60)])
    for i, ev in ((10, 2.5), (30, 2.3), (50, 2.6)):
        train[i]["values"]["eval_loss"] = ev
    assert "overfit" in codes(train)


def test_downsampling_keeps_spikes_nans_and_evals():
    points = pts([2.0] * 100_000)
    points[54_321]["values"]["loss"] = 9.0
    points[77_777]["values"]["loss"] = "nan"
    points.append({"seq": 100_000, "step": 100_001, "values": {"eval_loss": 1.0}})
    kept = downsample(points, limit=2000)
    assert len(kept) <= 2100
    losses = [p["values"].get("loss") for p in kept]
    assert 9.0 in losses and "nan" in losses
    assert kept[-1]["values"] == {"eval_loss": 1.0}
    assert [p["seq"] for p in kept] == sorted(p["seq"] for p in kept)


def test_a_nan_loss_logged_as_zero_is_a_divergence_not_a_collapse():
    """What a diverged run (learning_rate: 20) recorded before the trainer logged NaN losses as they are: grad
    norm NaN from step 3, the loss shown as 0.0 (the Trainer's logging_nan_inf_filter), eval loss NaN."""
    points = pts([7.2, 6.8, 7.2] + [0.0] * 60, grad_norm=lambda i: 2.0 if i < 2 else "nan")
    points[10]["values"]["eval_loss"] = "nan"
    alerts = {a.code: a for a in assess(points)}
    assert set(alerts) == {"nonfinite"}, alerts  # no "loss fell to 0: trivial or leaked", no flat loss
    assert alerts["nonfinite"].step == 3 and "learning_rate" in alerts["nonfinite"].fix
    assert alerts["nonfinite"].message == "grad_norm is nan at step 3"
    hidden = pts([7.2, 6.8] + [0.0] * 60, grad_norm=lambda i: 2.0 if i < 2 else "nan")
    assert [a.message for a in assess(hidden)] == ["loss is nan (logged as 0.0) at step 3"]
    plain_nan = pts([7.2, 6.8, 7.2] + ["nan"] * 60, grad_norm=lambda i: 2.0 if i < 3 else "nan")
    assert {a.code for a in assess(plain_nan)} == {"nonfinite"}
