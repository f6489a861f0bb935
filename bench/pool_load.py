"""A pool worker's cold and warm requests: ``python -m bench.pool_load [--preset micro] [--models 3]``.

Builds a private model store of ``--models`` randomly initialised checkpoints of ``--preset`` (load time does not
depend on the weights' values), starts a pool worker (AXL_WORKER_MODE=pool, standalone, one thread) with a budget
of 2.5 models, and asks for model 0, 1, 0, 2, 1 (one token, greedy): each answer's wall time (a cold one includes
the estimate, the load and any LRU unload), the models held after it, the pool's estimated bytes and the process's
RSS. Prints one line per request and a JSON summary; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-pool-secret"
AUTH = {"Authorization": f"Bearer {SECRET}"}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool_load", description=__doc__)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    import torch

    from axl_mesh.model_store import ModelStore
    from axl_model import ModelConfig, MultiScaleTransformer, save_checkpoint
    from services.model_worker.pool import estimate_serving_bytes

    root = Path(tempfile.mkdtemp(prefix="axl-bench-pool-"))
    store = ModelStore(root / "models")
    config = ModelConfig.from_name(args.preset)
    names = [f"ft:{args.preset}:bench{i}:{i:08d}" for i in range(args.models)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        save_checkpoint(MultiScaleTransformer(config).eval(), root / f"ckpt-{i}")
        store.add(name, root / f"ckpt-{i}", specialist="coder", base=args.preset,
                  context_length=config.max_seq_len)
    estimate = estimate_serving_bytes(config, dtype=args.dtype, max_batch=8, prefill_chunk=256)
    budget_mb = 2.5 * estimate / (1 << 20)
    port = 18000 + os.getpid() % 1000
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXL_")}
    env.update({"AXL_WORKER_MODE": "pool", "AXL_REGISTRY_URL": "", "AXL_REGISTRY_SECRET": SECRET,
                "AXL_MODEL_STORE_DIR": str(store.root), "AXL_POOL_MEMORY_BUDGET_MB": f"{budget_mb:.1f}",
                "AXL_NUM_THREADS": "1", "AXL_MAX_BATCH": "8", "AXL_DTYPE": args.dtype, "AXL_PORT": str(port),
                "AXL_LOG_LEVEL": "warning", "PYTHONPATH": f"{REPO_ROOT / 'shared'}:{REPO_ROOT}"})
    log = (root / "pool.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.model_worker"], cwd=REPO_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"the pool did not start; see {root / 'pool.log'}")
            time.sleep(0.1)
        base_rss = rss_mib(proc.pid)
        print(f"{args.preset} {args.dtype}: estimate {estimate / (1 << 20):.1f} MiB per model, budget "
              f"{budget_mb:.1f} MiB; pool RSS with nothing loaded {base_rss:.0f} MiB")
        for index in (0, 1, 0, 2, 1, 1):
            name = names[index % len(names)]
            started = time.perf_counter()
            answer = httpx.post(url + "/internal/v1/generate", headers=AUTH, timeout=300, json={
                "model": name, "prompt": "def fibonacci(n):", "max_tokens": 1, "temperature": 0})
            seconds = time.perf_counter() - started
            pool = httpx.get(url + "/internal/v1/pool", headers=AUTH, timeout=10).json()
            row = {"model": index, "status": answer.status_code, "seconds": round(seconds, 3),
                   "held": [names.index(m["model"]) for m in pool["models"]],
                   "estimated_mib": round(pool["memory_used_bytes"] / (1 << 20), 1),
                   "rss_mib": round(rss_mib(proc.pid), 1)}
            rows.append(row)
            print(f"  model {index}: {answer.status_code} in {seconds:.3f}s; holding {row['held']}, estimated "
                  f"{row['estimated_mib']} MiB, RSS {row['rss_mib']} MiB")
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps({"preset": args.preset, "dtype": args.dtype, "estimate_mib": round(estimate / (1 << 20), 1),
                      "base_rss_mib": round(base_rss, 1), "requests": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
