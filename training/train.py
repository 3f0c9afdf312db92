"""The training entry point, read top to bottom: setup (data, model) -> train -> cleanup (adapter, events).

Framework-free: it reads a TrainConfig and writes events to a sink; the web app only watches them.
"""

from __future__ import annotations

import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training import sharding
from training.config import TrainConfig
from training.encode import IGNORE_INDEX, Encoded, Encoder, EncodeStats
from training.events import EventSink
from training.packing import pack, packing_efficiency
from training.rows import LineProblem
from training.sources import SourceError, open_source


class DataInvalid(ValueError):
    pass


@dataclass
class PreparedData:
    train: list[dict]  # {"input_ids", "labels"[, "position_ids"]}
    eval: list[dict]
    stats: list[EncodeStats]
    warnings: list[str]
    packing_efficiency: float | None
    examples: list[Encoded]  # a few encoded training samples, as the trainer sees them


def resolve_path(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and base_dir is not None and (base_dir / p).exists():
        return base_dir / p
    return p


def encode_dataset(config: TrainConfig, tokenizer, index: int, base_dir: Path | None = None):
    """(samples, stats, warnings) for one `datasets:` entry; invalid lines raise DataInvalid with line numbers."""
    spec = config.datasets[index]
    try:  # local files, folders, save_to_disk, Hub ids (training/sources.py)
        source = open_source(spec, base_dir)
    except SourceError as exc:
        raise DataInvalid(f"datasets[{index}].path: {exc}") from None
    path, unit = source.label, source.unit
    encoder = Encoder.from_config(tokenizer, config, index)
    stats, samples, problems = EncodeStats(), [], []
    try:
        for outcome in encoder.encode_numbered(source.rows(), stats):
            if isinstance(outcome, Encoded):
                samples.append(outcome)
            elif outcome.reason == "invalid":
                problems.append(LineProblem(outcome.row + 1, "", outcome.detail, unit))
    except SourceError as exc:
        raise DataInvalid(f"datasets[{index}].path: {exc}") from None
    if problems:
        shown = "\n".join(f"  {path}:{p}" for p in sorted(problems, key=lambda p: p.line)[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataInvalid(f"{len(problems)} invalid {unit}(s) in {path}:\n{shown}{more}")
    return samples, stats, encoder.warnings()


def prepare_data(config: TrainConfig, tokenizer, base_dir: Path | None = None) -> PreparedData:
    samples, all_stats, warnings = [], [], []
    for i in range(len(config.datasets)):
        s, stats, w = encode_dataset(config, tokenizer, i, base_dir)
        samples += s
        all_stats.append(stats)
        warnings += w
    if not samples:
        raise DataInvalid("no sample left to train on after encoding (see the dropped counts)")
    rng = random.Random(config.seed)
    rng.shuffle(samples)
    n_eval = 0
    if config.val_set_size:
        n_eval = int(config.val_set_size) if config.val_set_size >= 1 else round(len(samples) * config.val_set_size)
        n_eval = min(max(n_eval, 1), len(samples) - 1)
    eval_samples, train_samples = samples[:n_eval], samples[n_eval:]
    efficiency = None
    if config.sample_packing:
        bins = pack(train_samples, config.sequence_len)
        efficiency = packing_efficiency(bins, config.sequence_len)
        train = [{"input_ids": b.input_ids, "labels": b.labels, "position_ids": b.position_ids} for b in bins]
    else:
        train = [{"input_ids": s.input_ids, "labels": s.labels} for s in train_samples]
    evals = [{"input_ids": s.input_ids, "labels": s.labels} for s in eval_samples]
    return PreparedData(train, evals, all_stats, warnings, efficiency, train_samples[:3])


class Collator:
    """Pads a batch to its longest sequence; counts real tokens for the tokens/s metric."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.tokens_seen = 0
        self.samples_seen = 0

    def __call__(self, features: list[dict]):
        import torch

        width = max(len(f["input_ids"]) for f in features)
        packed = "position_ids" in features[0]
        ids, labels, mask, positions = [], [], [], []
        for f in features:
            n = len(f["input_ids"])
            pad = width - n
            self.tokens_seen += n
            self.samples_seen += f["position_ids"].count(0) if "position_ids" in f else 1  # packed: positions restart
            ids.append(f["input_ids"] + [self.pad_id] * pad)
            labels.append(f["labels"] + [IGNORE_INDEX] * pad)
            mask.append([1] * n + [0] * pad)
            if packed:
                # Padding becomes one more "sample" of its own, so no real token attends to it.
                positions.append(f["position_ids"] + list(range(pad)))
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if packed:
            batch["position_ids"] = torch.tensor(positions)
        else:
            batch["attention_mask"] = torch.tensor(mask)
        return batch


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _make_callback(sink: EventSink, collator: Collator, should_stop: Callable[[], bool]):
    from transformers import TrainerCallback

    class EventCallback(TrainerCallback):
        """Turns Trainer logs into `metric` events with throughput and memory added."""

        def __init__(self):
            self.last_time = time.time()
            self.last_tokens = 0
            self.last_samples = 0
            self.last_step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            sink.emit("status", state="running", total_steps=state.max_steps, num_epochs=args.num_train_epochs)
            self.last_time = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            values = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and k not in ("step",)}
            now = time.time()
            if "loss" in values:
                dt = max(now - self.last_time, 1e-9)
                steps = max(state.global_step - self.last_step, 1)
                values["tokens_per_second"] = (collator.tokens_seen - self.last_tokens) / dt
                values["samples_per_second"] = (collator.samples_seen - self.last_samples) / dt
                values["seconds_per_step"] = dt / steps
                values["memory_mb"] = _peak_memory_mb()
                self.last_time, self.last_tokens, self.last_step = now, collator.tokens_seen, state.global_step
                self.last_samples = collator.samples_seen
            values.pop("total_flos", None)
            sink.emit("metric", step=state.global_step, values=values)

        def on_step_end(self, args, state, control, **kwargs):
            if should_stop():
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            sink.emit(
                "artifact",
                kind="checkpoint",
                path=f"checkpoints/checkpoint-{state.global_step}",
                step=state.global_step,
            )

    return EventCallback()


def _emit_rank_shares(sink: EventSink, trainer, step: int) -> None:
    """With several processes: what each rank holds (its share of the parameters, its peak memory),
    as a `ranks` event, a log line and per-rank metrics the run page can chart."""
    shares = sharding.gather_rank_shares(trainer.model)  # a collective: every rank calls it
    if len(shares) < 2:
        return
    for share in shares:
        share["param_share"] = round(share["local_params"] / max(share["total_params"], 1), 4)
    sink.emit("ranks", ranks=shares)
    sink.emit(
        "log",
        message="ranks: "
        + "; ".join(f"rank {s['rank']} holds {s['param_share']:.1%} of the parameters, peak {s['memory_mb']:.0f} MB" for s in shares),
    )
    values = {f"memory_mb_rank{s['rank']}": s["memory_mb"] for s in shares}
    values.update({f"param_share_rank{s['rank']}": s["param_share"] for s in shares})
    sink.emit("metric", step=step, values=values)


def train(
    config: TrainConfig,
    run_dir: Path,
    sink: EventSink,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    base_dir: Path | None = None,
    resume_from: Path | None = None,
) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    from training.modeling import count_parameters, load_model, load_tokenizer

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        # Measured here: small models train ~10x faster on one thread than on two busy cores.
        torch.set_num_threads(int(os.environ.get("TRAINYARD_CPU_THREADS", "1")))

    # -- setup: data ---------------------------------------------------------------------------
    sink.emit("status", state="preparing", message="loading tokenizer and encoding datasets")
    set_seed(config.seed)
    tokenizer = load_tokenizer(config)
    data = prepare_data(config, tokenizer, base_dir)
    for stats in data.stats:
        sink.emit("log", message=f"data: {stats.as_dict()}")
    for warning in data.warnings:
        sink.emit("log", message=f"WARNING data: {warning}")
    sink.emit(
        "data",
        stats=[s.as_dict() for s in data.stats],
        train_samples=len(data.train),
        eval_samples=len(data.eval),
        packing_efficiency=data.packing_efficiency,
        warnings=data.warnings,
        examples=[
            {
                "row": e.row,
                "tokens": [
                    [tokenizer.decode([t]), lab != IGNORE_INDEX] for t, lab in zip(e.input_ids[:256], e.labels[:256])
                ],
            }
            for e in data.examples
        ],
    )

    # -- setup: model --------------------------------------------------------------------------
    sink.emit("status", state="preparing", message="loading model")
    model = load_model(config, tokenizer)
    trainable, total = count_parameters(model)
    sink.emit(
        "log",
        message=f"model: {total:,} parameters, {trainable:,} trainable "
        f"({config.adapter or 'full fine-tune'}, {config.attn_implementation}, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'})",
    )

    collator = Collator(tokenizer.pad_token_id)
    has_eval = bool(data.eval)
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps if config.warmup_steps is not None else (config.warmup_ratio or 0.0),
        **({"optim": config.optimizer} if config.optimizer else {}),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=model.dtype == torch.bfloat16 if not config.load_in_4bit else False,
        fp16=config.fp16,
        logging_steps=1,
        eval_strategy="steps" if has_eval and config.eval_steps else ("epoch" if has_eval else "no"),
        eval_steps=config.eval_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        report_to="none",
        seed=config.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **sharding.trainer_kwargs(config, base_dir),  # FSDP2 / DeepSpeed: training/sharding.py
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval or None,
        data_collator=collator,
        callbacks=[_make_callback(sink, collator, should_stop)],
    )

    # -- train ---------------------------------------------------------------------------------
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    _emit_rank_shares(sink, trainer, result.global_step)

    # -- cleanup: artifacts --------------------------------------------------------------------
    out = run_dir / ("adapter" if config.adapter else "model")
    trainer.accelerator.wait_for_everyone()
    # Sharded (FSDP2): every rank takes part in gathering the full weights; rank 0 writes them as
    # one ordinary folder that loads on one device.
    state_dict = None
    if trainer.is_fsdp_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
    elif trainer.is_deepspeed_enabled:  # ZeRO-3 consolidates from the engine (the wrapped model)
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.is_world_process_zero():  # several processes (accelerate launch): one writes
        trainer.model.save_pretrained(out, state_dict=state_dict)  # the unwrapped model (DDP keeps its wrapper apart)
        tokenizer.save_pretrained(out)
    sink.emit("artifact", kind="adapter" if config.adapter else "model", path=out.name)
    if config.adapter and config.merge_lora and trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload() if not config.load_in_4bit else None
        if merged is None:
            sink.emit(
                "log",
                message="WARNING merge_lora: a 4-bit base can't be merged in place; merge the adapter "
                "into the full-precision base after training",
            )
        else:
            merged.save_pretrained(run_dir / "merged")
            tokenizer.save_pretrained(run_dir / "merged")
            sink.emit("artifact", kind="merged", path="merged")
    summary = {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "seconds": round(time.time() - started, 2),
        "peak_memory_mb": round(_peak_memory_mb(), 1),
    }
    sink.emit("log", message=f"done: {summary}")
    return summary
