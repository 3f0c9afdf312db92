"""Start the web server (uvicorn, ASGI) and a huey worker together; Ctrl-C stops both.

uvicorn rather than daphne: it reads request bodies with back-pressure, so a 1 GB upload streams
to a temporary file instead of being queued in memory.
"""

import os
import signal
import subprocess
import sys
import time

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--workers",
            type=int,
            default=None,
            help="huey worker threads; default: one per device (a run holds one while it trains) plus two, "
            "so dataset statistics, the playground and merges never wait for a run to end",
        )
        parser.add_argument("--login", default="", help="login hint to print, e.g. demo / trainyard")

    def handle(self, *args, host, port, workers, login, **opts):
        from webapp.runs.gpus import inventory

        workers = workers or len(inventory()) + 2
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        procs = [
            subprocess.Popen([sys.executable, "manage.py", "worker", "--workers", str(workers)], env=env),
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "webapp.asgi:application",
                    "--host",
                    host,
                    "--port",
                    str(port),
                    "--ws",
                    "websockets",
                    "--lifespan",
                    "off",
                    "--no-access-log",
                ],
                env=env,
            ),
        ]
        self.stdout.write(self.style.SUCCESS(f"\nTrainyard is running: http://{host}:{port}/"))
        if login:
            self.stdout.write(f"log in as {login}\n")
        stop = {"now": False}

        def on_signal(signum, frame):
            stop["now"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            while not stop["now"] and all(p.poll() is None for p in procs):
                time.sleep(0.5)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
        failed = [p.args[2] for p in procs if p.returncode not in (0, -2, -15, None)]
        if failed and not stop["now"]:
            raise SystemExit(f"stopped because a process exited: {failed}")
