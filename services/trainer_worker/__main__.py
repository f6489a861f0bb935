"""Run the trainer worker: ``python -m services.trainer_worker [--burst]`` (settings from AXL_* variables).

It takes fine-tuning jobs from the ``axl-train`` queue one at a time, each in a forked process, and runs the
reaper that requeues the jobs of dead workers. ``--burst`` drains the queue and exits (tests, one-off runs).
"""

from __future__ import annotations

import argparse
import os
import socket

from axl_mesh.jobs import QueueName, open_store, run_worker
from services.trainer_worker.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trainer_worker", description=__doc__)
    parser.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    args = parser.parse_args(argv)
    settings = Settings()
    settings.configure_logging()
    name = f"trainer-{socket.gethostname()}-{os.getpid()}"
    store = open_store(settings)
    memory = settings.memory_bytes()

    def announce() -> None:
        # The gateway rejects jobs whose RAM estimate exceeds what live trainers have.
        if memory:
            store.announce_trainer(name, memory, ttl_seconds=max(30.0, settings.reaper_interval_seconds * 4))

    run_worker(settings, QueueName.TRAIN, burst=args.burst, name=name, on_tick=announce)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
