"""Added latency of the gateway hop: a few hundred small non-streamed requests (max_tokens 1) sent to a model worker
directly and through the gateway, interleaved; the difference of the medians (target: under 2 ms) and of the p95s.

The worker serves a random-init `tiny` checkpoint so that its own time is small and steady (the hop does not
depend on the model). Boots a private mesh as local processes (redis-server, registry, one worker serving a random-init `micro`
checkpoint, the gateway); `local_mesh()` is shared with `gateway_streams`.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support import RedisServer, ServiceProcess

from .common import defaults

SECRET = "bench-registry-secret"
REQUESTS, WARMUP = 300, 30


@dataclass
class LocalMesh:
    worker: ServiceProcess
    gateway: ServiceProcess
    model_id: str


def random_checkpoint(path: Path, preset: str = "micro") -> Path:
    """A random-init model saved as a checkpoint (speed does not depend on the weights)."""
    import torch

    from axl_model import ModelConfig, MultiScaleTransformer, save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(MultiScaleTransformer(ModelConfig.from_name(preset)).eval(), path)


@contextlib.contextmanager
def local_mesh(threads: int | None = None, max_batch: int = 8, preset: str = "micro",
               worker_env: dict[str, str] | None = None, worker_start_seconds: float = 120) -> Iterator[LocalMesh]:
    """worker_env: more settings of the worker (e.g. AXL_PREFILL_CHUNK_TOKENS); worker_start_seconds: how long its
    /readyz may take (AXL_COMPILE=1 compiles before it: minutes cold on a loaded machine)."""
    extra_env = dict(worker_env or {})
    with tempfile.TemporaryDirectory(prefix="axl-bench-mesh-") as tmp:
        root = Path(tmp)
        checkpoint = random_checkpoint(root / preset, preset)
        redis = RedisServer(root / "redis.log").start()
        services: list[ServiceProcess] = []
        try:
            registry = ServiceProcess("services.mesh_registry", {
                "AXL_REDIS_URL": redis.url, "AXL_REGISTRY_SECRET": SECRET, "AXL_LOG_LEVEL": "warning",
            }, log_path=root / "registry.log")
            services.append(registry.start())
            worker_env = {"AXL_CHECKPOINT": str(checkpoint), "AXL_SPECIALIST": "coder", "AXL_LOG_LEVEL": "warning",
                          "AXL_REGISTRY_URL": registry.url, "AXL_REGISTRY_SECRET": SECRET,
                          "AXL_MAX_BATCH": str(max_batch)}
            if threads:
                worker_env["AXL_NUM_THREADS"] = str(threads)
            worker_env.update(extra_env)
            worker = ServiceProcess("services.model_worker", worker_env, log_path=root / "worker.log",
                                    health_path="/readyz")
            services.append(worker.start(worker_start_seconds))
            gateway = ServiceProcess("services.api_gateway", {
                "AXL_REGISTRY_URL": registry.url, "AXL_REGISTRY_SECRET": SECRET, "AXL_LOG_LEVEL": "warning",
            }, log_path=root / "gateway.log", health_path="/readyz")
            services.append(gateway.start(60))
            yield LocalMesh(worker=worker, gateway=gateway, model_id="axl-coder")
        finally:
            for service in reversed(services):
                service.stop()
            redis.stop()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(args) -> dict:
    # The `tiny` preset keeps the worker's own time small and steady, so the gateway's share is what moves.
    with local_mesh(getattr(args, "threads", None), preset="tiny") as mesh:
        direct_body = {"prompt": "x = ", "max_tokens": 1, "temperature": 0.0, "stream": False}
        gateway_body = {"model": mesh.model_id, **direct_body}
        direct_url = mesh.worker.url + "/internal/v1/generate"
        direct_auth = {"Authorization": f"Bearer {SECRET}"}
        gateway_url = mesh.gateway.url + "/v1/completions"
        direct, through = [], []
        assert mesh.gateway.proc is not None
        gateway_pid = mesh.gateway.proc.pid
        with httpx.Client(timeout=30) as client:
            for i in range(WARMUP + REQUESTS):
                if i == WARMUP:
                    cpu_before = process_cpu_seconds(gateway_pid)
                for url, body, into in ((direct_url, direct_body, direct), (gateway_url, gateway_body, through)):
                    started = time.perf_counter()
                    # The direct call carries the mesh secret, as the gateway's own call to the worker does.
                    response = client.post(url, json=body, headers=direct_auth if url == direct_url else None)
                    elapsed = time.perf_counter() - started
                    response.raise_for_status()
                    if i >= WARMUP:
                        into.append(elapsed * 1000)
            gateway_cpu_ms = (process_cpu_seconds(gateway_pid) - cpu_before) * 1000 / REQUESTS
    figures = {
        "direct_p50_ms": statistics.median(direct),
        "gateway_p50_ms": statistics.median(through),
        "added_p50_ms": statistics.median(through) - statistics.median(direct),
        # Each gateway request is sent right after a direct one: their difference cancels slow drift (load).
        "added_paired_median_ms": statistics.median(t - d for t, d in zip(through, direct)),
        "added_p95_ms": _percentile(through, 0.95) - _percentile(direct, 0.95),
        # CPU the gateway process spends per request: what the hop costs when the machine is not contended
        # (wall-clock figures above include waiting for a CPU when other processes load the machine).
        "gateway_cpu_ms_per_request": gateway_cpu_ms,
        "load_average_1min": os.getloadavg()[0],
        "requests": REQUESTS,
    }
    figures["target_p50_under_2ms"] = "met" if figures["added_p50_ms"] < 2.0 else "missed"
    for key, value in figures.items():
        print(f"{key:>24}: {value:.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    return figures


if __name__ == "__main__":
    run(defaults())
