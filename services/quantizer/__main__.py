"""Run the quantizer worker: ``python -m services.quantizer [--burst]`` (settings from AXL_* variables).

It takes jobs from the ``axl-quantize`` queue (asked for directly, or after a fine-tuning job that listed
``quantize`` types) and writes GGUF files (and Ollama Modelfiles) of a model-store model.
"""

from __future__ import annotations

import argparse
import os
import socket

from axl_mesh.jobs import QueueName, run_worker
from services.quantizer.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.quantizer", description=__doc__)
    parser.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    args = parser.parse_args(argv)
    settings = Settings()
    settings.configure_logging()
    run_worker(settings, QueueName.QUANTIZE, burst=args.burst, name=f"quantizer-{socket.gethostname()}-{os.getpid()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
