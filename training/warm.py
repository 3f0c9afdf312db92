"""A trainer started before its run: `python -m training.warm` imports what every run imports (torch,
transformers, peft, the trainer: ~5 s of a tiny run's ~7 s start), then waits for one run and becomes that
run's trainer, as `python -m training train ...` would have been.

The hand-off is one JSON line on stdin: {"argv": [the arguments after `-m training`], "cwd": ..., "log":
path}. The environment is not handed over: the process was started with the run's environment already,
because it is read before any run is known: CUDA reads CUDA_VISIBLE_DEVICES once, when torch first touches
the driver (bitsandbytes asks at import), and huggingface_hub reads HF_* variables at import. Whoever starts
a warm trainer gives it only a run whose environment is exactly the one it was started with
(webapp/runs/warm.py). What the imports printed (warnings) goes to the run's log first, as in a fresh
trainer. No run handed over (stdin closed): it exits 0 and trains nothing.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import stat
import sys
from pathlib import Path

ENTRY = ["-m", "training"]  # a fresh trainer's command after the interpreter: what a warm one stands for
ROOM = " " * 4096  # an argument that makes room in the command line for the run's (see _retitle)


def preload() -> None:
    """Import what a run imports before its first step. An import that fails here is left for the run:
    the trainer imports it again and fails as a fresh one would, into the run's log."""
    try:
        import peft  # noqa: F401  (imports torch and transformers)
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import (  # noqa: F401  (resolving these imports their modules: the trainer's own)
            AutoConfig,
            AutoModelForCausalLM,
            AutoTokenizer,
            Trainer,
            TrainerCallback,
            TrainingArguments,
        )

        from training import cli, modeling, train  # noqa: F401
        from training.architectures import auto_model_class  # noqa: F401
    except Exception:
        return
    try:  # built once per process on the first model load: ~0.2 s of regexes (transformers 5)
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping("llama")
    except Exception:
        pass
    # What was imported lives as long as the process: out of the collector's sight, so the full
    # collection the Trainer makes as it starts (accelerate's free_memory) takes 0 s, not ~0.8 s.
    gc.freeze()


def _become(request: dict) -> None:
    """Turn this process into the run's trainer: output to the run's log (after what the imports wrote),
    the run's folder as the working directory and first import path, the argv `-m training` gives."""
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        captured = os.fstat(1)
        if stat.S_ISREG(captured.st_mode) and captured.st_size:
            os.write(log, os.pread(1, captured.st_size, 0))
    except OSError:
        pass  # not a file we can read back: nothing worth copying
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    _retitle([sys.executable, *ENTRY, *request["argv"]])
    os.chdir(request["cwd"])
    sys.path[0] = str(Path(request["cwd"]).resolve())  # `python -m` puts the working directory first
    sys.argv = [str(Path(__file__).with_name("__main__.py")), *request["argv"]]


def _retitle(command: list[str]) -> None:
    """Show the fresh trainer's command line (ps, pgrep -f, /proc/<pid>/cmdline), written over this
    process's own, which was started with ROOM for it (what setproctitle does on Linux)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: stat fields 48 and 49
    except (OSError, IndexError, ValueError):
        return
    size = end - start
    title = ("\0".join(command).encode()[: size - 1] + b"\0").ljust(size, b"\0")
    ctypes.memmove(start, title, size)


def main() -> int:
    preload()
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # the worker went away or stopped: no run for us
    request = json.loads(line)
    _become(request)
    from training.cli import main as train_main

    return train_main(request["argv"])


if __name__ == "__main__":
    sys.exit(main())
