#!/usr/bin/env python3
"""Container health check: ``axl-healthcheck [PATH]`` exits 0 when GET http://127.0.0.1:$AXL_PORT/PATH answers 200.

Standard library only (the slim image has no curl). PATH defaults to ``$AXL_HEALTH_PATH`` or ``/healthz``; model
workers use ``/readyz`` (503 until their model is loaded).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else os.environ.get("AXL_HEALTH_PATH", "/healthz")
    url = f"http://127.0.0.1:{os.environ.get('AXL_PORT', '8880')}{path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - a fixed loopback URL
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
