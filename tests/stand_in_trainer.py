"""A stand-in for `python -m training train CONFIG --run-dir DIR` in the worker fault tests: the same
events (running, a metric per step, an adapter folder, succeeded), the STOP file obeyed at each
step, in a fraction of a second instead of loading a model. Faults of the worker side (kill, pause,
outages) need a trainer process, not a trained model. STAND_IN_STEPS and STAND_IN_STEP_SECONDS (from
the environment, which the worker passes on) set its length."""

import json
import os
import sys
import time
from pathlib import Path

run_dir = Path(sys.argv[sys.argv.index("--run-dir") + 1])
steps = int(os.environ.get("STAND_IN_STEPS", "20"))
step_seconds = float(os.environ.get("STAND_IN_STEP_SECONDS", "0.02"))
sink = (run_dir / "events.jsonl").open("a")


def emit(event: str, **fields) -> None:
    sink.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
    sink.flush()


emit("status", state="preparing", message="loading model")
emit("status", state="running", total_steps=steps)
for step in range(1, steps + 1):
    time.sleep(step_seconds)
    emit("metric", step=step, values={"loss": 1.0 / step})
    if (run_dir / "STOP").exists():
        emit("status", state="cancelled", message=f"stopped by the user at step {step}")
        sys.exit(130)
emit("status", state="saving", message=f"training ended at step {steps}; saving")
adapter = run_dir / "adapter"
adapter.mkdir(exist_ok=True)
(adapter / "adapter_config.json").write_text("{}")
(adapter / "adapter_model.safetensors").write_bytes(os.urandom(256))
emit("artifact", kind="adapter", path="adapter")
emit("status", state="succeeded", message=f"final loss {1.0 / steps:.4f}")
