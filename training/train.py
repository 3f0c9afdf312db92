"""The training entry point, read top to bottom: setup (data, model) -> train -> cleanup (adapter, events).

Framework-free: it reads a TrainConfig and writes events to a sink; the web app only watches them.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training import events as ev
from training import sharding
from training.config import TrainConfig
from training.divergence import Diverged, divergence_guard, weights_finite
from training.encode import IGNORE_INDEX, Encoded, EncodeStats
from training.entries import DataInvalid, EntryEncoding
from training.events import EventSink, StopRequested
from training.packing import pack, packing_efficiency

# torchao (the low-bit optimizers, imported by peft) warns at import that its CUDA-only libraries don't load
# on a machine without CUDA: true, and no concern of the run's.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's Enum registrations on torch 2.13


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


# How often a long encoding says how far it got (a starting run's page shows it), in seconds.
PROGRESS_SECONDS = 1.0


def encode_dataset(
    config: TrainConfig,
    tokenizer,
    index: int,
    base_dir: Path | None = None,
    processor=None,
    progress: Callable[[str], None] | None = None,
):
    """(samples, stats, warnings) for one `datasets:` entry, through the path `trainyard preprocess` reports
    on (training/entries.py); invalid rows raise DataInvalid with their numbers. `progress` hears
    "tokenizing <entry>: N rows" when the entry starts and then at most once per PROGRESS_SECONDS."""
    entry = EntryEncoding(config, tokenizer, index, base_dir=base_dir, processor=processor)
    label = Path(entry.label).name if os.path.isabs(entry.label) else entry.label  # no server paths on a page
    where = f"datasets[{index}] ({label})" if len(config.datasets) > 1 else label
    samples, said = [], time.monotonic()
    if progress is not None:
        progress(f"tokenizing {where}")
    for outcome in entry.outcomes():
        if isinstance(outcome, Encoded):
            samples.append(outcome)
        if progress is not None and time.monotonic() - said >= PROGRESS_SECONDS:
            said = time.monotonic()
            progress(f"tokenizing {where}: {entry.stats.rows:,} rows so far")
    entry.raise_if_invalid()
    return samples, entry.stats, entry.warnings()


def prepare_data(
    config: TrainConfig,
    tokenizer,
    base_dir: Path | None = None,
    processor=None,
    progress: Callable[[str], None] | None = None,
) -> PreparedData:
    samples, all_stats, warnings = [], [], []
    for i in range(len(config.datasets)):
        s, stats, w = encode_dataset(config, tokenizer, i, base_dir, processor, progress)
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
        train = [_features(s) for s in train_samples]
    evals = [_features(s) for s in eval_samples]
    if processor is not None and not config.skip_prepare_dataset:  # the pixels once, before training
        from training.multimodal import prepare_pixels

        prepare_pixels(train + evals, processor)
    return PreparedData(train, evals, all_stats, warnings, efficiency, train_samples[:3])


def _features(sample: Encoded) -> dict:
    features = {"input_ids": sample.input_ids, "labels": sample.labels}
    if sample.images:  # image rows: the collator makes their pixels (training/multimodal.py)
        features["images"] = sample.images
    return features


class Collator:
    """Pads a batch to its longest sequence (or to `pad_to`: pad_to_sequence_len); counts real tokens for
    the tokens/s metric."""

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id = pad_id
        self.pad_to = pad_to
        self.tokens_seen = 0
        self.samples_seen = 0

    def __call__(self, features: list[dict]):
        import torch

        width = max(max(len(f["input_ids"]) for f in features), self.pad_to or 0)
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


def name_base_model(adapter_config: Path, base_model: str) -> None:
    """The adapter names its base as a person would find it elsewhere: a hub id as written, or a model
    folder's name, never this server's absolute path (PEFT stores the path it loaded from)."""
    import json

    path = Path(base_model)
    name = path.name if path.is_absolute() else base_model
    data = json.loads(adapter_config.read_text())
    data["base_model_name_or_path"] = name
    adapter_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


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
            self.final_loss: float | None = None
            self.smoothed_loss: float | None = None  # EMA 0.9, as the run page's smoothing slider at 0.9

        def on_train_begin(self, args, state, control, **kwargs):
            sink.emit(ev.STATUS, state=ev.RUNNING, total_steps=state.max_steps, num_epochs=args.num_train_epochs)
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
                values.update(sharding.memory_of_every_rank(values["memory_mb"]))  # several processes only
                self.last_time, self.last_tokens, self.last_step = now, collator.tokens_seen, state.global_step
                self.last_samples = collator.samples_seen
            values.pop("total_flos", None)
            if isinstance(values.get("loss"), float) and math.isfinite(values["loss"]):
                # The headline of a finished run: where the loss ended, not HF's mean over the whole run.
                self.final_loss = values["loss"]
                self.smoothed_loss = (
                    values["loss"] if self.smoothed_loss is None else 0.9 * self.smoothed_loss + 0.1 * values["loss"]
                )
            sink.emit("metric", step=state.global_step, values=values)

        def on_step_end(self, args, state, control, **kwargs):
            sink.beat()  # no beat for a while: the worker's watchdog ends the run as hung
            if should_stop():  # checked every step: a cancel stops at the next step boundary
                control.should_training_stop = True

        def on_substep_end(self, args, state, control, **kwargs):
            sink.beat()  # gradient accumulation: one step may be many micro-batches

        def on_prediction_step(self, args, state, control, **kwargs):
            sink.beat()  # an evaluation is many batches between two steps

        def on_train_end(self, args, state, control, **kwargs):
            # Writing the result has no step boundaries to beat at: the watchdog stands down.
            sink.emit(ev.STATUS, state=ev.SAVING, message=f"training ended at step {state.global_step}; saving")

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
    described = [
        f"rank {s['rank']} holds {s['param_share']:.1%} of the parameters, peak {s['memory_mb']:.0f} MB" for s in shares
    ]
    sink.emit("log", message="ranks: " + "; ".join(described))
    values = {f"memory_mb_rank{s['rank']}": s["memory_mb"] for s in shares}
    values.update({f"param_share_rank{s['rank']}": s["param_share"] for s in shares})
    sink.emit("metric", step=step, values=values)


def steps_per_epoch(config: TrainConfig, train_rows: int) -> int:
    """Optimizer steps in one epoch, as the Trainer counts them (one process per device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = train_rows / world
    size = config.micro_batch_size
    batches = rows // size if config.dataloader_drop_last else math.ceil(rows / size)
    return max(1, int(batches) // config.gradient_accumulation_steps)


def per_epoch_interval(config: TrainConfig, train_rows: int, per_epoch: int) -> int:
    """`evals_per_epoch`/`saves_per_epoch` as a step interval. Axolotl sets eval/save_steps to the fraction
    1 / (per_epoch * num_epochs) of the run, which the Trainer rounds up to ceil(total_steps * fraction)."""
    total = config.max_steps or math.ceil(steps_per_epoch(config, train_rows) * config.num_epochs)
    return max(1, math.ceil(total / (per_epoch * config.num_epochs)))


def training_arguments(config: TrainConfig, run_dir: Path, *, train_rows: int, has_eval: bool, bf16: bool) -> dict:
    """TrainingArguments' keywords for this config: every honoured key that the Trainer applies lands here."""
    import torch

    eval_steps = config.eval_steps
    if config.evals_per_epoch and has_eval:
        eval_steps = per_epoch_interval(config, train_rows, config.evals_per_epoch)
    save_steps = config.save_steps
    if config.saves_per_epoch:
        save_steps = per_epoch_interval(config, train_rows, config.saves_per_epoch)
    eval_strategy = "steps" if eval_steps else "epoch"
    eval_strategy = (config.eval_strategy or eval_strategy) if has_eval else "no"
    save_strategy = config.save_strategy or ("steps" if save_steps else "no")
    scheduler, scheduler_kwargs = config.lr_scheduler, dict(config.lr_scheduler_kwargs or {})
    if scheduler == "cosine" and config.cosine_min_lr_ratio is not None:
        # axolotl's cosine with a floor: the same curve as transformers' cosine_with_min_lr.
        scheduler = "cosine_with_min_lr"
        scheduler_kwargs = {**scheduler_kwargs, "min_lr_rate": config.cosine_min_lr_ratio}
    kwargs: dict = dict(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=config.warmup_steps if config.warmup_steps is not None else (config.warmup_ratio or 0.0),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=bf16,
        fp16=config.fp16,
        # bf16 on a machine without CUDA: the Trainer trains it on the CPU only when told so.
        **({"use_cpu": True} if bf16 and not torch.cuda.is_available() else {}),
        # tf32 is a CUDA matmul mode: passed on a GPU (the Trainer sets torch's matmul precision, and left
        # unset it would turn tf32 on by itself); on the CPU it has no meaning and changes nothing.
        tf32=config.tf32 if torch.cuda.is_available() else None,
        logging_steps=1,
        # On, a NaN step's loss is logged as the mean since the last log: over nothing with a log every step,
        # so a diverged run showed 0.0. Off, the loss is logged as it is (training/divergence.py stops on it).
        logging_nan_inf_filter=False,
        eval_strategy=eval_strategy,
        eval_steps=eval_steps,
        save_strategy=save_strategy,
        save_steps=save_steps or 500,
        save_total_limit=config.save_total_limit,
        save_only_model=config.save_only_model,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        dataloader_drop_last=config.dataloader_drop_last,
        neftune_noise_alpha=config.neftune_noise_alpha,
        full_determinism=config.full_determinism,
        torch_compile=config.torch_compile,
        report_to="none",
        seed=config.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinned memory only speeds copies to a GPU
        disable_tqdm=True,
    )
    if config.optimizer:
        kwargs["optim"] = config.optimizer
    for key, name in (("adam_beta1", "adam_beta1"), ("adam_beta2", "adam_beta2"), ("adam_epsilon", "adam_epsilon")):
        if getattr(config, key) is not None:
            kwargs[name] = getattr(config, key)
    if config.early_stopping_patience:
        kwargs.update(metric_for_best_model="eval_loss", greater_is_better=False)
    return kwargs


def trainer_class(config: TrainConfig):
    """transformers' Trainer, with the loss from Cut Cross Entropy (plugin, CUDA) and/or saved activations kept
    in CPU memory (activation_offloading)."""
    from transformers import Trainer

    base = Trainer
    if config.cut_cross_entropy_on:

        class CutCrossEntropyTrainer(base):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                from cut_cross_entropy import linear_cross_entropy

                return cut_cross_entropy_loss(model, inputs, linear_cross_entropy, num_items_in_batch)

        base = CutCrossEntropyTrainer

    if config.activation_offloading:

        class OffloadingTrainer(base):
            def compute_loss(self, model, inputs, *args, **kwargs):
                import torch

                # Activations saved for backward are packed to CPU memory and brought back when backward
                # needs them (torch's save_on_cpu hooks); on the CPU they stay where they are.
                with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                    return super().compute_loss(model, inputs, *args, **kwargs)

        base = OffloadingTrainer
    return base


def cut_cross_entropy_loss(model, inputs: dict, linear_cross_entropy, num_items_in_batch=None):
    """The causal-LM loss without the [tokens x vocabulary] logits: the model runs as usual (its wrappers'
    hooks included) but keeps one position's logits, and Cut Cross Entropy computes the loss from the final
    hidden states (normed: transformers' last hidden_states entry) and the output embedding."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    unwrapped = getattr(model, "module", model)  # DDP
    if hasattr(unwrapped, "get_base_model"):  # PEFT
        unwrapped = unwrapped.get_base_model()
    weight = unwrapped.get_output_embeddings().weight
    softcap = getattr(unwrapped.config.get_text_config(), "final_logit_softcapping", None)
    hidden = outputs.hidden_states[-1]
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden, weight.to(hidden.dtype), labels, softcap=softcap, shift=True)
    total = linear_cross_entropy(hidden, weight.to(hidden.dtype), labels, softcap=softcap, shift=True, reduction="sum")
    return total / num_items_in_batch


def extra_callbacks(config: TrainConfig, run_dir: Path, sink: EventSink) -> list:
    """Early stopping, the loss watchdog and the profiler, when the config asks for them."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    callbacks: list = []
    if config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))

    if config.loss_watchdog_threshold:
        threshold, patience = config.loss_watchdog_threshold, config.loss_watchdog_patience

        class LossWatchdog(TrainerCallback):
            """Stops a run whose loss stays above the threshold for `patience` steps (axolotl's watchdog)."""

            above = 0

            def on_log(self, args, state, control, logs=None, **kwargs):
                loss = (logs or {}).get("loss")
                if loss is None:
                    return
                self.above = self.above + 1 if loss > threshold else 0
                if self.above >= patience:
                    message = f"loss watchdog: loss {loss:.3f} above {threshold} for {patience} steps; stopping"
                    sink.emit("log", message=message)
                    control.should_training_stop = True

        callbacks.append(LossWatchdog())

    if config.profiler_steps:
        callbacks.append(_profiler_callback(config, run_dir, sink))
    return callbacks


def _profiler_callback(config: TrainConfig, run_dir: Path, sink: EventSink):
    """A torch profiler trace of steps profiler_steps_start .. +profiler_steps, kept in the run folder."""
    import torch
    from transformers import TrainerCallback

    first, count = config.profiler_steps_start, config.profiler_steps
    path = run_dir / "profiler_trace.json"

    class ProfilerCallback(TrainerCallback):
        profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.profiler is None and state.global_step == first:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None and state.global_step >= first + count:
                self._finish()

        def on_train_end(self, args, state, control, **kwargs):
            self._finish()

        def _finish(self):
            if self.profiler is None or path.exists():
                return
            self.profiler.__exit__(None, None, None)
            self.profiler.export_chrome_trace(str(path))
            sink.emit("artifact", kind="profile", path=path.name)

    return ProfilerCallback()


def train(
    config: TrainConfig,
    run_dir: Path,
    sink: EventSink,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    base_dir: Path | None = None,
    resume_from: Path | None = None,
) -> dict:
    # A starting run's page says what it is doing (events.Stage); a warm trainer has imported already.
    sink.emit(ev.STATUS, state=ev.PREPARING, stage=ev.IMPORTING, message="importing torch, transformers and peft")
    import torch
    from transformers import TrainingArguments, set_seed

    from training.modeling import count_parameters, load_model, load_tokenizer

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        # Measured here: small models train ~10x faster on one thread than on two busy cores.
        torch.set_num_threads(int(os.environ.get("TRAINYARD_CPU_THREADS", "1")))

    # -- setup: data ---------------------------------------------------------------------------
    entries = f"{len(config.datasets)} dataset{'s' if len(config.datasets) != 1 else ''}"
    sink.emit(ev.STATUS, state=ev.PREPARING, stage=ev.TOKENIZING, message=f"tokenizing {entries}")
    for warning in config.warnings:  # settings that do less than they seem: in the run's log, not only the CLI's
        sink.emit("log", message=f"WARNING config: {warning}")
    set_seed(config.seed)
    tokenizer = load_tokenizer(config)
    processor = None
    if config.processor_type:  # image rows: the model's processor sizes and makes their pixels
        from training.multimodal import load_processor

        processor = load_processor(config, tokenizer)
    data = prepare_data(
        config,
        tokenizer,
        base_dir,
        processor,
        progress=lambda message: sink.emit(ev.STATUS, state=ev.PREPARING, stage=ev.TOKENIZING, message=message),
    )
    for stats in data.stats:
        sink.emit("log", message=f"data: {stats.as_dict()}")
    for warning in data.warnings:
        sink.emit("log", message=f"WARNING data: {warning}")
    if processor is not None:
        with_images = sum(1 for f in data.train if f.get("images") or f.get("pixels"))
        when = "a batch at a time" if config.skip_prepare_dataset else "before training"
        sink.emit(
            "log",
            message=f"images: {with_images} of {len(data.train)} training samples have images; their pixels are "
            f"made {when} by {type(processor).__name__}",
        )
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
    rows, samples = sum(s.rows for s in data.stats), len(data.train) + len(data.eval)
    sink.emit(
        ev.STATUS,
        state=ev.PREPARING,
        stage=ev.LOADING_MODEL,
        message=f"loading the model ({rows:,} rows tokenized into {samples:,} samples)",
    )
    model = load_model(config, tokenizer)
    trainable, total = count_parameters(model)
    sink.emit(
        "log",
        message=f"model: {total:,} parameters, {trainable:,} trainable "
        f"({config.adapter or 'full fine-tune'}, {config.attn_implementation}, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'})",
    )
    for note in getattr(model, "trainyard_notes", []):  # what training/architectures.py did to this model
        sink.emit("log", message=note)

    pad_to = config.sequence_len if config.pad_to_sequence_len else None
    if processor is None:
        collator = Collator(tokenizer.pad_token_id, pad_to=pad_to)
    else:
        from training.multimodal import ImageCollator

        collator = ImageCollator(tokenizer.pad_token_id, processor, pad_to=pad_to)
    resuming = f"; resuming from {resume_from.name}" if resume_from else ""
    sink.emit(ev.STATUS, state=ev.PREPARING, stage=ev.BUILDING_TRAINER, message=f"building the trainer{resuming}")
    has_eval = bool(data.eval)
    bf16 = model.dtype == torch.bfloat16 if not config.load_in_4bit else False
    args = TrainingArguments(
        **training_arguments(config, run_dir, train_rows=len(data.train), has_eval=has_eval, bf16=bf16),
        **sharding.trainer_kwargs(config, base_dir),  # FSDP2 / DeepSpeed: training/sharding.py
    )
    events_callback = _make_callback(sink, collator, should_stop)
    guard = divergence_guard(sink)  # a non-finite loss or weights: stop before saving them, fail with the fix
    trainer = trainer_class(config)(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval or None,
        data_collator=collator,
        callbacks=[events_callback, guard, *extra_callbacks(config, run_dir, sink)],
    )

    # -- train ---------------------------------------------------------------------------------
    started = time.time()
    # The Trainer starts with a full garbage collection (accelerate's free_memory): ~0.8 s spent looking
    # through what the imports and the model made, which live to the end anyway. Frozen, it skips them.
    gc.freeze()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        gc.unfreeze()
    if not guard.diverged and not weights_finite(trainer.model):  # the last step's update, never logged as NaN
        guard.step, guard.reasons = result.global_step, ["the weights are no longer finite after the last step"]
    if guard.diverged:  # a NaN adapter is never written: the run fails, naming its last finite checkpoint
        raise Diverged(guard.message(run_dir, resume_from))
    if should_stop():  # stopped at a step boundary (cancel): its checkpoints stay, no final artifact
        raise StopRequested(f"stopped by the user at step {result.global_step}")
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
        if processor is not None:  # the model's processor travels with what was trained on images
            processor.save_pretrained(out)
        if config.adapter and config.quantize_moe_experts:
            from training.architectures import restack_for_plain_base

            restack_for_plain_base(trainer.model, out)  # loads onto the ordinary (unquantized) base
        if config.adapter:
            name_base_model(out / "adapter_config.json", config.base_model)
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
        "final_loss": events_callback.final_loss,  # the last logged loss: what the chart ends on
        "final_loss_smoothed": events_callback.smoothed_loss,
        "train_loss": result.training_loss,  # HF's mean over every step of the run
        "steps": result.global_step,
        "seconds": round(time.time() - started, 2),
        "peak_memory_mb": round(_peak_memory_mb(), 1),
    }
    sink.emit("log", message=f"done: {summary}")
    return summary
