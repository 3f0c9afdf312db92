"""Start latency the user feels: from "Start run" (POST /api/runs/) to the first metric point on the run
page's websocket, on the tiny demo model, with the web server and the huey worker started as `make run`
starts them (`manage.py serve`: uvicorn + `run_huey`, embedded SQLite + SqliteHuey by default, PostgreSQL +
Redis with --database/--redis). Against it, in the same run and interleaved: one fresh process that imports
torch/transformers/peft, loads the same model with the same LoRA and takes one optimizer step (the bare
cost of training anything). Prints both, the ratio (goal <= 1.3), where the run's time went (queue, trainer
start, data, model, first step), then one line of JSON.

The user clicks "Start run" on a server that has been up a while: each click comes after --idle seconds
(60) and once the server's processes have gone quiet (no CPU use for a second), whatever they did before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _setup import ROOT, free_port, login

# The same model, LoRA (r 8, alpha 16, every linear layer) and batch (4 rows, sequence_len 256) as the
# demo config below, one optimizer step; threads as the trainer sets them on a CPU.
BARE = r"""
import json, os, sys, time
import torch, transformers, peft
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(int(os.environ.get("TRAINYARD_CPU_THREADS", "1")))
model_dir, data = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
rows = [json.loads(line) for line in open(data)][:4]
texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
model = AutoModelForCausalLM.from_pretrained(model_dir)
model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                                   task_type="CAUSAL_LM"))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
loss = model(**batch, labels=batch["input_ids"]).loss
loss.backward()
optimizer.step()
print(json.dumps({"done": time.time(), "loss": loss.item()}), flush=True)
"""

CONFIG = """\
base_model: tiny-chat
datasets:
  - path: demo-chat
    type: chat_template
sequence_len: 256
adapter: lora
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
micro_batch_size: 4
max_steps: {steps}
learning_rate: 0.003
"""


def tree_cpu_ticks(root: int) -> int:
    """CPU ticks (user + system) used so far by `root` and every process below it."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        ticks[pid] = int(fields[11]) + int(fields[12])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total


def wait_quiet(root: int, timeout: float = 180.0) -> float:
    """Wait until the server's processes used (almost) no CPU for a second; the seconds waited."""
    start = time.monotonic()
    last = tree_cpu_ticks(root)
    while time.monotonic() - start < timeout:
        time.sleep(1.0)
        now = tree_cpu_ticks(root)
        if now - last <= 3:  # 3 ticks = 30 ms of CPU in one second: polling, heartbeats
            return time.monotonic() - start
        last = now
    return time.monotonic() - start


def bare_seconds(model_dir: Path, data: Path, env: dict) -> float:
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-c", BARE, str(model_dir), str(data)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["done"] - started


async def first_point(base: str, cookie: str, run_id: int, timeout: float = 300.0) -> float:
    """Epoch time at which the run page's websocket delivered the run's first metric point."""
    from websockets.asyncio.client import connect

    url = base.replace("http://", "ws://") + f"/ws/runs/{run_id}/"
    deadline = time.time() + timeout
    async with connect(url, additional_headers={"Cookie": cookie}, origin=base) as ws:
        while time.time() < deadline:
            msg = json.loads(await asyncio.wait_for(ws.recv(), timeout=deadline - time.time()))
            if msg["type"] == "points" and msg["points"]:
                return time.time()
            if msg["type"] == "status" and msg["final"]:
                raise RuntimeError(f"run {run_id} ended {msg['status']} before a metric: {msg['message']}")
    raise TimeoutError(f"no metric point from run {run_id} in {timeout:.0f} s")


def api(base: str, token: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def breakdown(run_id: int, clicked: float, seen: float) -> dict:
    """Where the seconds went: the queue (to the worker's pick-up), the trainer's start (to its first
    event), data and model preparation (to `running`), the first step (to the first metric), the page."""
    from webapp.runs.models import Run

    run = Run.objects.get(pk=run_id)
    events = [json.loads(line) for line in (run.run_dir / "events.jsonl").read_text().splitlines() if line]
    first_event = events[0]["time"]
    running = next(e["time"] for e in events if e.get("state") == "running")
    metric = next(e["time"] for e in events if e["event"] == "metric")
    picked = run.started_at.timestamp()
    return {
        "queue": round(picked - clicked, 2),
        "trainer_start": round(first_event - picked, 2),
        "prepare": round(running - first_event, 2),
        "first_step": round(metric - running, 2),
        "to_page": round(seen - metric, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps per run (only the first one is timed)")
    parser.add_argument("--idle", type=float, default=60, help="seconds the server idles before each click")
    parser.add_argument("--database", default="", help="DATABASE_URL (default: embedded SQLite)")
    parser.add_argument("--redis", default="", help="REDIS_URL (default: SqliteHuey, no Redis)")
    args = parser.parse_args()

    import tempfile

    data_dir = Path(tempfile.mkdtemp(prefix="trainyard-bench-"))
    env = {**os.environ, "TRAINYARD_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for key, value in (("DATABASE_URL", args.database), ("REDIS_URL", args.redis)):
        env.pop(key, None)
        if value:
            env[key] = value
    os.environ.update({k: v for k, v in env.items() if k in ("TRAINYARD_DATA_DIR", "DATABASE_URL", "REDIS_URL")})
    for key in ("DATABASE_URL", "REDIS_URL"):
        if key not in env:
            os.environ.pop(key, None)
    manage = [sys.executable, str(ROOT / "manage.py")]
    if args.database:  # a fresh schema: this benchmark's runs only
        subprocess.run(manage + ["flush", "--noinput"], env=env, cwd=ROOT, check=False, capture_output=True)
    subprocess.run(manage + ["migrate", "-v0"], env=env, cwd=ROOT, check=True)
    subprocess.run(manage + ["setup_demo"], env=env, cwd=ROOT, check=True, capture_output=True)

    sys.path.insert(0, str(ROOT))
    os.environ["DJANGO_SETTINGS_MODULE"] = "webapp.settings"
    import django

    django.setup()
    from django.conf import settings

    from webapp.runs.models import TrainingConfig
    from webapp.workspaces.models import Workspace
    from webapp.workspaces.services import create_api_token

    workspace = Workspace.objects.get(name="Demo")
    user = workspace.memberships.first().user
    _, token = create_api_token(user, workspace, "bench")
    config = TrainingConfig.objects.create(
        workspace=workspace, name="start-latency", yaml=CONFIG.format(steps=args.steps), created_by=user
    )
    model_dir = settings.TRAINYARD_MODEL_DIRS[0] / "tiny-chat"
    data = data_dir / "demo-data" / "chat.jsonl"

    port = free_port()
    log = open(data_dir / "serve.log", "w")
    server = subprocess.Popen(manage + ["serve", "--port", str(port)], env=env, cwd=ROOT, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/login/", timeout=2).close()
                break
            except OSError:
                time.sleep(0.2)
        _, _, cookie = login(base)
        # bare, run, bare, run, ..., bare: each run is set against the bare processes on either side of it,
        # so a machine whose load drifts (other jobs) weighs on both sides of each ratio alike.
        starts, bares, parts, ratios = [], [], [], []
        idle_from = time.monotonic()
        wait_quiet(server.pid)
        bares.append(bare_seconds(model_dir, data, env))
        for i in range(args.repeats):
            # A user reads the page before clicking: the server idles a while (huey's polling slows
            # down when its queue stays empty).
            time.sleep(max(0.0, args.idle - (time.monotonic() - idle_from)))
            wait_quiet(server.pid)
            clicked = time.time()
            run = api(base, token, "/api/runs/", {"config_id": config.pk, "name": f"latency-{i}"})
            seen = asyncio.run(first_point(base, cookie, run["id"]))
            starts.append(seen - clicked)
            parts.append(breakdown(run["id"], clicked, seen))
            while api(base, token, f"/api/runs/{run['id']}")["status"] in ("queued", "starting", "running"):
                time.sleep(0.5)
            idle_from = time.monotonic()
            wait_quiet(server.pid)
            bares.append(bare_seconds(model_dir, data, env))
            ratios.append(starts[-1] / ((bares[-2] + bares[-1]) / 2))
            print(
                f"#{i + 1}: start run -> first point {starts[-1]:.2f} s, bare {bares[-2]:.2f} / {bares[-1]:.2f} s, "
                f"ratio {ratios[-1]:.3f} {parts[-1]}"
            )
    finally:
        server.send_signal(2)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    start, bare, ratio = statistics.median(starts), statistics.median(bares), statistics.median(ratios)
    figures = {
        "mode": "postgres+redis" if args.redis else "embedded",
        "repeats": args.repeats,
        "idle_s": args.idle,
        "start_to_first_point_s": round(start, 2),
        "bare_import_load_step_s": round(bare, 2),
        "ratio": round(ratio, 3),
        "goal": 1.3,
        "starts": [round(s, 2) for s in starts],
        "bares": [round(b, 2) for b in bares],
        "ratios": [round(r, 3) for r in ratios],
        "breakdown": parts,
    }
    print(f"start run -> first metric on the page: {start:.2f} s (median of {args.repeats})")
    print(f"bare process (import, load, one step):  {bare:.2f} s (median of {len(bares)})")
    print(f"ratio {figures['ratio']} (median of each run against the bare processes around it; goal <= 1.3)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
