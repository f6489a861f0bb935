"""Load: many concurrent clients against a running mesh for a fixed time, half of them streaming.

    python -m bench load                                     # boots a private mesh (random-init tiny model)
    python -m bench load --url http://127.0.0.1:8880 --api-key sk-...   # against `make up`
    python -m bench load --clients 50 --duration 60

Each client sends completions back to back (short prompts, 16 tokens; every other client streams). The promise
checked: every answer is a 200, or a 429/503 that carries `Retry-After` (the mesh sheds load, it does not fail);
anything else, a stream that breaks without an error event, or a request past its deadline, is counted as a
failure. Printed: the count per status, p50/p99 latency (time to the last byte), and each mesh process's resident
memory before and after (growth under steady load would be a leak). Not a test: the figures depend on the machine.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import httpx

from .gateway_latency import local_mesh

PROMPTS = ["def add(a, b):\n    return", "import os\n\n", "class Stack:\n    def push(self, item):\n",
           "for i in range(10):\n    ", "# read a file\nwith open(path) as f:\n"]
REQUEST_DEADLINE_SECONDS = 120.0


def mesh_processes() -> dict[int, str]:
    """Pid -> service name of this machine's mesh processes (`python -m services.<name>`)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            for i, arg in enumerate(argv[:-1]):
                if arg == b"-m" and argv[i + 1].startswith(b"services."):
                    found[int(entry)] = argv[i + 1].decode()
    return found


def rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


async def one_client(client: httpx.AsyncClient, url: str, model: str, stream: bool, until: float,
                     statuses: Counter, latencies: list[float], problems: list[str]) -> None:
    rng = random.Random()
    while time.monotonic() < until:
        body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": 16, "temperature": 0.8,
                "stream": stream}
        started = time.perf_counter()
        try:
            async with asyncio.timeout(REQUEST_DEADLINE_SECONDS):
                async with client.stream("POST", url, json=body) as response:
                    text = (await response.aread()).decode("utf-8", "replace")
        except (TimeoutError, httpx.HTTPError) as exc:
            statuses["failed"] += 1
            problems.append(f"{type(exc).__name__}: {exc}")
            continue
        latencies.append(time.perf_counter() - started)
        status = response.status_code
        if status in (429, 503):
            statuses[status] += 1
            if "retry-after" not in response.headers:
                statuses["shed without Retry-After"] += 1
            await asyncio.sleep(min(float(response.headers.get("retry-after", "1") or 1), 2.0))
        elif status != 200:
            statuses[status] += 1
            problems.append(f"{status}: {text[:200]}")
        elif stream and not text.rstrip().endswith("data: [DONE]"):
            statuses["stream without [DONE]"] += 1
            problems.append(text[-200:])
        else:
            statuses[200] += 1


async def drive(url: str, api_key: str | None, model: str, clients: int, duration: float) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    statuses: Counter = Counter()
    latencies: list[float] = []
    problems: list[str] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(headers=headers, timeout=REQUEST_DEADLINE_SECONDS, limits=limits) as client:
        until = time.monotonic() + duration
        await asyncio.gather(*(one_client(client, f"{url}/v1/completions", model, i % 2 == 1, until, statuses,
                                          latencies, problems) for i in range(clients)))
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * (len(latencies) - 1)))] * 1000 if latencies else float("nan")

    bad = sum(n for key, n in statuses.items() if key not in (200, 429, 503))
    return {"requests": sum(statuses.values()), "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "failures": bad, "first_problems": problems[:5]}


def run(args) -> dict:
    clients, duration = getattr(args, "clients", 50), getattr(args, "duration", 60.0)
    url, api_key = getattr(args, "url", None), getattr(args, "api_key", None)
    with contextlib.ExitStack() as stack:
        model = getattr(args, "model", None) or "axl-coder"
        if url is None:
            mesh = stack.enter_context(local_mesh(threads=1, preset="tiny"))
            url = mesh.gateway.url
        processes = mesh_processes()
        before = {pid: rss_mib(pid) for pid in processes}
        print(f"{clients} clients ({clients // 2} streaming) for {duration:.0f} s against {url}")
        figures = asyncio.run(drive(url, api_key, model, clients, duration))
        for pid, name in sorted(processes.items(), key=lambda item: item[1]):
            after = rss_mib(pid)
            if before.get(pid) is not None and after is not None:
                figures[f"rss_growth_mib.{name}.{pid}"] = after - before[pid]
                print(f"{name:>28} (pid {pid}): RSS {before[pid]:.0f} -> {after:.0f} MiB")
    print(json.dumps({k: v for k, v in figures.items() if not k.startswith("rss_")}, indent=2))
    figures["verdict"] = "only 200 / 429 / 503 with Retry-After" if figures["failures"] == 0 else "FAILURES"
    print(f"verdict: {figures['verdict']}")
    return {k: v for k, v in figures.items() if not isinstance(v, (dict, list))}
