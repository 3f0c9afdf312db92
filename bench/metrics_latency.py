"""Live metrics latency: a fake trainer writes 20 metric events/s to its events file, the worker's
real supervisor loop tails it into the database (and Redis), and 100 websocket clients watch the
run's page; prints p50/p95/max latency from the event written by the trainer to the message
received, and dropped clients, for the embedded mode (SQLite, no server between worker and web)
and the Redis mode, in one run.
Goals: p95 < 300 ms embedded, < 100 ms Redis, no client dropped. Ends with one line of JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

from _setup import ROOT, fresh_data_dir, login, start_server

FAKE_TRAINER = """
import json, sys, time
path, delay, rate, seconds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
time.sleep(delay)
interval, n = 1 / rate, int(seconds * rate)
start = time.time()
with open(path, "a") as f:
    for i in range(n):
        f.write(json.dumps({"event": "metric", "step": i + 1, "time": time.time(), "values": {"loss": 3.0 - i * 1e-3}})
                + "\\n")
        f.flush()
        time.sleep(max(0.0, start + (i + 1) * interval - time.time()))
"""

FAKE_WORKER = """
import subprocess, sys, django
django.setup()
from webapp.runs import supervisor
from webapp.runs.models import Run
from webapp.workspaces.models import Workspace
run = Run.objects.create(workspace=Workspace.objects.get(name="Demo"), name="latency", config_yaml="x",
                         status="running")
run.run_dir.mkdir(parents=True, exist_ok=True)
print(run.pk, flush=True)
events = run.run_dir / "events.jsonl"
trainer = subprocess.Popen([sys.executable, "-c", {trainer!r}, str(events), "{start_delay}", "{rate}", "{seconds}"])
supervisor._watch(run.pk, trainer, 0, events)  # the worker's own loop: tail, record, publish
"""


async def client(url: str, cookie: str, origin: str, expected: int, latencies: list, seconds: float) -> bool:
    from websockets.asyncio.client import connect

    seen = set()
    try:
        async with connect(url, additional_headers={"Cookie": cookie}, origin=origin, open_timeout=30) as ws:
            deadline = time.time() + seconds
            while time.time() < deadline and len(seen) < expected:
                try:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), timeout=max(0.1, deadline - time.time())))
                except TimeoutError:
                    break
                if msg["type"] == "points":
                    now = time.time()
                    for p in msg["points"]:
                        if p["seq"] not in seen:
                            seen.add(p["seq"])
                            if not msg["history"]:  # history is what happened before we connected
                                latencies.append(1000 * (now - p["time"]))
    except Exception as exc:  # a dropped client is a result, not a crash
        print(f"client dropped: {exc!r}", file=sys.stderr)
        return False
    return len(seen) == expected


async def measure(mode: str, clients: int, rate: int, seconds: float) -> dict:
    env = {**os.environ}
    env.pop("REDIS_URL", None)
    env.pop("DATABASE_URL", None)
    if mode == "redis":
        env["REDIS_URL"] = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    env["TRAINYARD_DATA_DIR"] = str(fresh_data_dir())
    os.environ["TRAINYARD_DATA_DIR"] = env["TRAINYARD_DATA_DIR"]
    server, base = start_server(env, stderr=open(f"/tmp/latency-{mode}.log", "w"))
    try:
        _, _, cookie = login(base)
        worker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                FAKE_WORKER.format(trainer=FAKE_TRAINER, rate=rate, seconds=seconds, start_delay=8),
            ],
            cwd=ROOT,
            env={**env, "DJANGO_SETTINGS_MODULE": "webapp.settings"},
            stdout=subprocess.PIPE,
            text=True,
        )
        run_id = int(worker.stdout.readline())
        expected = int(seconds * rate)
        latencies: list[float] = []
        url = base.replace("http://", "ws://") + f"/ws/runs/{run_id}/"
        results = await asyncio.gather(
            *[client(url, cookie, base, expected, latencies, seconds + 20) for _ in range(clients)]
        )
        worker.wait(timeout=60)
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies.sort()
    return {
        "mode": mode,
        "clients": clients,
        "events": int(seconds * rate),
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p95_ms": round(statistics.quantiles(latencies, n=20)[-1], 1) if len(latencies) > 1 else None,
        "max_ms": round(latencies[-1], 1) if latencies else None,
        "complete_clients": sum(results),
        "dropped_clients": clients - sum(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--modes", default="embedded,redis")
    args = parser.parse_args()
    out = {}
    for mode, goal in (("embedded", 300), ("redis", 100)):
        if mode not in args.modes.split(","):
            continue
        figures = asyncio.run(measure(mode, args.clients, args.rate, args.seconds))
        figures["goal_p95_ms"] = goal
        out[mode] = figures
        print(
            f"{mode:9s} p50 {figures['p50_ms']} ms  p95 {figures['p95_ms']} ms  max {figures['max_ms']} ms  "
            f"(goal p95 < {goal}); {figures['complete_clients']}/{args.clients} clients got every point"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
