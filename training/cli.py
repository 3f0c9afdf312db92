"""`trainyard` command line: preprocess and train from an axolotl-style YAML, build the offline demo."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub that can't be reached
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

GREEN, GREY, RESET = "\033[42;30m", "\033[2m", "\033[0m"


def _load_config(path: str, allow_trust_remote_code: bool = False):
    from training.config import ConfigInvalid, parse_config

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        sys.exit(f"error: can't read config {path}: {exc.strerror}")
    try:
        config = parse_config(text, allow_trust_remote_code=allow_trust_remote_code)
    except ConfigInvalid as exc:
        lines = "\n".join(f"  {e}" for e in exc.errors)
        sys.exit(f"error: invalid config {path}:\n{lines}")
    for warning in config.warnings:  # valid but without effect here, or unknown under strict: false
        print(f"warning: {warning}", file=sys.stderr)
    # A relative base_model folder is read next to the config, as dataset paths are, then in the model
    # directories the server uses (TRAINYARD_MODEL_DIRS, default var/models), so `base_model: tiny-chat`
    # means the same folder on the command line as in the web app.
    if not Path(config.base_model).is_absolute() and not Path(config.base_model).exists():
        roots = [Path(path).resolve().parent] + [
            Path(p) for p in os.environ.get("TRAINYARD_MODEL_DIRS", str(Path("var") / "models")).split(":") if p
        ]
        found = next((root / config.base_model for root in roots if (root / config.base_model).is_dir()), None)
        if found is not None:
            config.base_model = str(found.resolve())
    return config


def _token_text(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id])
    return text.replace("\n", "\\n").replace("\t", "\\t")


def render_debug(tokenizer, sample, color: bool) -> str:
    """Each token as text(id, label); trained tokens highlighted (or bracketed without colour)."""
    out = []
    for token_id, label in zip(sample.input_ids, sample.labels):
        cell = f"{_token_text(tokenizer, token_id)}({token_id}, {label})"
        if label != -100:
            out.append(f"{GREEN}{cell}{RESET}" if color else f"[{cell}]")
        else:
            out.append(f"{GREY}{cell}{RESET}" if color else cell)
    return " ".join(out)


def _preprocess_tokenizer(config):
    """(tokenizer, why transformers loaded it). A local folder that transformers would load unchanged from
    tokenizer.json is read with `tokenizers` alone (training/light_tokenizer.py): the transformers import
    was ~3.4 s of a 4.3 s preprocess of 20k rows. The trainer keeps AutoTokenizer (it loads the model anyway)."""
    from training.light_tokenizer import load_light_tokenizer

    folder = Path(config.base_model).expanduser()
    if config.tokenizer_use_mistral_common:
        why = "tokenizer_use_mistral_common"
    elif folder.is_dir() and not config.trust_remote_code:
        light = load_light_tokenizer(folder, config.special_tokens)
        if not isinstance(light, str):
            return light, None
        why = light
    else:
        why = "not a local folder" if not folder.is_dir() else "trust_remote_code"
    from training.modeling import ModelNotFound, load_tokenizer

    try:
        return load_tokenizer(config), why
    except ModelNotFound as exc:
        sys.exit(f"error: {exc}")


def _image_processor(config):
    """(tokenizer, processor) for image rows (processor_type): the model's processor holding the tokenizer."""
    from training.modeling import ModelNotFound, load_tokenizer
    from training.multimodal import ProcessorNotUsable, load_processor

    try:
        tokenizer = load_tokenizer(config)
        return tokenizer, load_processor(config, tokenizer)
    except (ModelNotFound, ProcessorNotUsable) as exc:
        sys.exit(f"error: {exc}")


def cmd_preprocess(args) -> int:
    """Encode every entry through the trainer's own path (training/entries.py) and report what a run would
    train on; this function only formats: --debug tokens, --jsonl samples, the summary and the problems."""
    from training.encode import SequenceTooLong
    from training.entries import DataInvalid, EntryEncoding, open_sources

    config = _load_config(args.config, args.allow_trust_remote_code)
    base_dir = Path(args.config).resolve().parent
    try:
        sources = open_sources(config, base_dir)  # a missing dataset is said before the tokenizer loads
    except DataInvalid as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    processor = None
    if config.processor_type:  # image rows: the model's processor says how many tokens each image takes
        tokenizer, processor = _image_processor(config)
        why = "processor_type (the processor holds a transformers tokenizer)"
    else:
        tokenizer, why = _preprocess_tokenizer(config)
    if why and args.debug:
        print(f"note: tokenizer loaded with transformers: {why}", file=sys.stderr)
    color = args.color or (args.color is None and sys.stdout.isatty())
    out = open(args.jsonl, "w", encoding="utf-8") if args.jsonl else None
    lengths, failed = Counter(), False  # kept samples by length, all datasets
    for index, source in enumerate(sources):
        try:
            entry = EntryEncoding(config, tokenizer, index, source, base_dir, processor)
        except ValueError as exc:
            print(f"error: datasets[{index}]: {exc}", file=sys.stderr)
            return 2
        try:
            parts = None if args.debug else entry.parts_in_parallel(args.jobs or os.cpu_count() or 1, out is not None)
            if parts is not None:  # a big JSONL file, across processes: their --jsonl parts, in file order
                for part in parts:
                    if out and part:
                        with open(part, encoding="utf-8") as lines:
                            shutil.copyfileobj(lines, out)
            else:
                _show_outcomes(entry, tokenizer, out, args.rows if args.debug else 0, color)
        except SequenceTooLong as exc:  # excess_length_strategy: raise
            print(f"error: {entry.label}: {exc}", file=sys.stderr)
            return 2
        except DataInvalid as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        lengths.update(entry.stats.lengths)
        failed = _report(entry, config) or failed
    if out:
        out.close()
    if config.sample_packing and lengths:  # pack()'s first-fit decreasing on lengths: no token ids kept
        from training.parallel_encode import count_bins

        bins, samples = count_bins(lengths, config.sequence_len), sum(lengths.values())
        print(
            f"packing: {samples} samples into {bins} bins of {config.sequence_len}, "
            f"efficiency {sum(n * k for n, k in lengths.items()) / (bins * config.sequence_len):.1%}"
        )
    return 1 if failed else 0


def _show_outcomes(entry, tokenizer, out, show: int, color: bool) -> None:
    """Stream the entry's outcomes: kept samples to --jsonl, the first `show` (kept or dropped) as tokens."""
    from training.encode import Encoded

    name, shown = Path(entry.label).name, 0
    for outcome in entry.outcomes():  # streamed: memory bounded by what is kept
        if not isinstance(outcome, Encoded):
            if outcome.reason != "invalid" and shown < show and outcome.sample is not None:
                shown += 1  # a dropped row is worth seeing too: why it trains nothing
                print(f"--- {name} row {outcome.row} DROPPED ({outcome.reason}: {outcome.detail})")
                print(render_debug(tokenizer, outcome.sample, color))
            continue
        if out:
            images = {"images": len(outcome.images)} if outcome.images else {}
            out.write(
                json.dumps({"row": outcome.row, "input_ids": outcome.input_ids, "labels": outcome.labels} | images)
            )
            out.write("\n")
        if shown < show:
            shown += 1
            print(
                f"--- {name} row {outcome.row} ({len(outcome.input_ids)} tokens, {outcome.trained_tokens} trained"
                + (f", {len(outcome.images)} image(s))" if outcome.images else ")")
            )
            print(render_debug(tokenizer, outcome, color))


def _report(entry, config) -> bool:
    """One entry's summary (stdout) and invalid rows (stderr); True when it has invalid rows."""
    from training.encode import DROP_REASONS

    stats, path, unit = entry.stats, entry.label, entry.source.unit
    print(f"{path}: {stats.rows} rows read, {stats.samples} samples kept, ", end="")
    print(f"{stats.tokens} tokens, {stats.trained_tokens} trained")
    for reason, count in sorted(stats.dropped.items()):
        print(f"  dropped {count}: {reason} ({DROP_REASONS.get(reason, reason)})")
    if stats.truncated:
        print(f"  truncated {stats.truncated} to sequence_len {config.sequence_len}")
    for warning in entry.warnings():
        print(f"  WARNING: {warning}")
    shown = entry.first_problems()
    for p in shown:
        print(f"error: {path}:{p}", file=sys.stderr)
    if len(entry.problems) > len(shown):
        print(f"error: ... and {len(entry.problems) - len(shown)} more invalid {unit}s in {path}", file=sys.stderr)
    return bool(entry.problems)


def _loss_headline(summary: dict) -> str:
    """Where the loss ended (last logged, and smoothed), then HF's mean over the run, which lags far behind."""
    if summary.get("final_loss") is None:
        return f"mean train loss {summary['train_loss']:.4f}"
    return (
        f"final loss {summary['final_loss']:.4f} (smoothed {summary['final_loss_smoothed']:.4f}); "
        f"mean over the run {summary['train_loss']:.4f}"
    )


def cmd_train(args) -> int:
    from training import events as ev
    from training import sharding
    from training.config import check_environment
    from training.events import JsonlEventSink, NullEventSink, StopRequested, process_rank
    from training.storage import explain_os_error
    from training.train import train

    config = _load_config(args.config, args.allow_trust_remote_code)
    run_dir = Path(args.run_dir)
    try:
        sink = (
            JsonlEventSink(Path(args.events) if args.events else run_dir / "events.jsonl")
            if process_rank() == 0
            else NullEventSink()
        )
    except OSError as exc:  # no events file: the reason goes to the log, where the web worker reads it
        print(f"error: {explain_os_error(exc, run_dir) or explain_failure(exc)}", file=sys.stderr)
        return 1
    sharding.die_with_launcher()  # a rank of several: never outlive the launcher
    launching = args.processes > 1 and sharding.world_size() == 1  # we start the processes ourselves
    problems = check_environment(config, devices=args.processes if launching else sharding.world_size())
    if problems:
        reason = "; ".join(str(p) for p in problems)
        sink.emit(ev.STATUS, state=ev.FAILED, message=f"invalid config: {reason}")
        lines = "\n".join(f"  {p}" for p in problems)  # one line per key, as for parse_config's errors
        print(f"error: invalid config {args.config}:\n{lines}", file=sys.stderr)
        return 2
    if launching:
        return _launch_processes(args, config, run_dir)
    stop_file = run_dir / ev.STOP_FILE  # a watcher (the web worker on cancel) asks for a stop at the next step
    try:
        summary = train(
            config,
            run_dir,
            sink,
            should_stop=stop_file.exists,
            base_dir=Path(args.config).resolve().parent,
            resume_from=Path(args.resume) if args.resume else None,
        )
    except BaseException as exc:  # every way out leaves a readable reason behind
        if isinstance(exc, (KeyboardInterrupt, StopRequested)):
            sink.emit(ev.STATUS, state=ev.CANCELLED, message=str(exc) or "stopped by the user")
            return 130
        reason = explain_os_error(exc, run_dir) or explain_failure(exc)  # a full disk or a read-only folder
        try:
            sink.emit(ev.STATUS, state=ev.FAILED, message=reason)
        except OSError:  # the events file is on that disk: the last line of the log says it instead
            pass
        import traceback

        traceback.print_exc()
        print(f"error: {reason}", file=sys.stderr)
        return 1
    sink.emit(ev.STATUS, state=ev.SUCCEEDED, message=_loss_headline(summary), summary=summary)
    print(json.dumps(summary))
    return 0


def _launch_processes(args, config, run_dir: Path) -> int:
    """`trainyard train --processes N`: the same command once per device through accelerate launch,
    with the accelerate config generated from the run's (as the web app's worker launches it)."""
    import socket
    import subprocess

    from training import sharding

    run_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = sharding.multi_process_launch(config, run_dir, args.processes, port)
    command = [sys.executable, *launch, *_train_args(args)]
    return subprocess.call(command)


def _train_args(args) -> list[str]:
    out = ["-m", "training", "train", str(Path(args.config).resolve()), "--run-dir", str(Path(args.run_dir).resolve())]
    if args.events:
        out += ["--events", str(Path(args.events).resolve())]
    if args.resume:
        out += ["--resume", args.resume]
    if args.allow_trust_remote_code:
        out.append("--allow-trust-remote-code")
    return out


TROUBLESHOOTING = {
    "out of memory": "out of GPU memory: lower micro_batch_size, enable gradient_checkpointing, or lower sequence_len",
}


def explain_failure(exc: BaseException) -> str:
    """One line saying what went wrong, with the fix where one is known."""
    from training.divergence import Diverged
    from training.modeling import ModelNotFound
    from training.train import DataInvalid

    text = str(exc).strip()
    if isinstance(exc, Diverged):
        return text
    if isinstance(exc, (ModelNotFound, DataInvalid)):
        return text.splitlines()[0] if isinstance(exc, ModelNotFound) else text
    low = text.lower()
    for needle, advice in TROUBLESHOOTING.items():
        if needle in low or needle.replace(" ", "") in type(exc).__name__.lower():
            return advice
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def cmd_demo(args) -> int:
    from training.demo import build_demo_model, write_datasets

    out = Path(args.out)
    model = build_demo_model(out / "models" / "tiny-chat")
    datasets = write_datasets(out / "datasets")
    print(f"model: {model}")
    for path in datasets:
        print(f"dataset: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainyard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("preprocess", help="encode the config's datasets and report what would be trained")
    p.add_argument("config")
    p.add_argument("--debug", action="store_true", help="print tokens with ids and labels, trained ones highlighted")
    p.add_argument("--rows", type=int, default=3, help="samples shown with --debug")
    p.add_argument("--jsonl", help="write {row, input_ids, labels} per kept sample to this file")
    p.add_argument("--color", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--allow-trust-remote-code", action="store_true")
    p.add_argument(
        "--jobs", type=int, default=None, help="processes for a JSONL file over 1 MB (default: every core; 1: one)"
    )
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train", help="train a model from the config, writing events to the run directory")
    p.add_argument("config")
    p.add_argument("--run-dir", default="trainyard-run")
    p.add_argument("--events", help="events file (default RUN_DIR/events.jsonl)")
    p.add_argument("--resume", help="checkpoint folder to resume from")
    p.add_argument("--allow-trust-remote-code", action="store_true")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="train on this many devices (one process each, through accelerate launch); fsdp/deepspeed need 2+",
    )
    p.set_defaults(func=cmd_train)

    from training.client import add_commands

    add_commands(sub)  # login / datasets / runs: talk to a Trainyard server

    p = sub.add_parser("demo", help="build the offline tiny model and sample datasets")
    p.add_argument("out", nargs="?", default="var")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
