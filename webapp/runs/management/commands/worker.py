"""Run this host's worker: huey's consumer (same options as `run_huey`) plus Trainyard's polite stop.

SIGTERM, SIGINT or SIGHUP first tells every run this worker holds to stop its trainer and end
`interrupted` (logs, metrics and checkpoints kept: resume it), then lets huey stop as usual; the
process waits up to STOP_SECONDS for those runs to be recorded. Without it, huey's threads die with
the process and its runs look alive until a reaper notices. The reaper (tasks.py) starts first, and
its first pass ends the runs a dead predecessor on this host left behind.
"""

from __future__ import annotations

import logging
import signal

from huey.contrib.djhuey.management.commands import run_huey

STOP_SECONDS = 30  # a trainer gets SIGTERM, then SIGKILL after 10 s; then its run is recorded


class Command(run_huey.Command):
    help = __doc__

    def handle(self, *args, **options):
        from huey.contrib.djhuey import HUEY

        from webapp.runs import tasks, watch

        tasks.start_reaper()  # at once: huey's worker threads first import the heavy libraries
        create_consumer = HUEY.create_consumer

        def create_politer_consumer(**config):
            consumer = create_consumer(**config)
            huey_handler = consumer._handle_signal  # what consumer.start() installs for each signal

            def on_signal(signum, frame):
                # First: huey's graceful stop would wait for every run to finish training.
                watch.stop_all(f"stopped ({signal.Signals(signum).name})")
                huey_handler(signum, frame)

            consumer._handle_signal = on_signal
            return consumer

        HUEY.create_consumer = create_politer_consumer
        try:
            super().handle(*args, **options)
        finally:
            watch.stop_all()
            if not watch.wait_until_idle(STOP_SECONDS):
                logging.getLogger("trainyard.worker").warning("runs still being recorded after %s s", STOP_SECONDS)
