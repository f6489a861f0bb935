"""Training throughput on this machine of `axl train` as 1 process x 2 threads (batch 8) against a torchrun group
of 2 ranks x 1 thread (batch 4 each: the same global batch of 8 x 256), micro, Lion; and what a group across
machines would move per step: the ring all-reduce of the gradients, and its time on a 1 GbE link.

Both runs are real `axl train` runs (the group through `torchrun --standalone`) on the standard library, with a
wall-clock budget; bytes/s counts training steps only (not start-up, data preparation or validation)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from axl_model.config import ModelConfig
from axl_model.distributed import all_reduce_bytes_per_step

from .common import CACHE_DIR, defaults, stdlib_sources

GLOBAL_BATCH, SEQ_LEN, MEASURE_SECONDS, RANKS = 8, 256, 40.0, 2
GIGABIT_BYTES_PER_S = 125e6  # 1 GbE line rate; real TCP throughput is ~90-95% of it


def worker(config_json: str, result_file: str) -> None:
    """One run (or one rank of it): train, and rank 0 writes {"bytes_per_s", "steps"} to result_file."""
    from axl_model.distributed import TrainingGroup
    from axl_model.train import TrainConfig, train

    result = train(TrainConfig(**json.loads(config_json)))
    if TrainingGroup.from_env().is_main:
        Path(result_file).write_text(json.dumps({"bytes_per_s": result.bytes_per_s, "steps": result.steps}))


def measure(ranks: int, folder: Path) -> dict:
    out = folder / f"ranks-{ranks}"
    config = dict(out_dir=str(out), preset="micro", data=stdlib_sources(), data_cache_dir=str(CACHE_DIR / "data"),
                  batch_size=GLOBAL_BATCH // ranks, seq_len=SEQ_LEN, max_time=MEASURE_SECONDS, eval_interval=0,
                  checkpoint_interval=0, eval_tokens=4096, num_threads=2 // ranks, progress=False, resume=False)
    result_file = folder / f"result-{ranks}.json"
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    entry = ["-m", "bench.distributed_throughput", "--worker"]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "shared"), str(repo), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([*launcher, *entry, json.dumps(config), str(result_file)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return json.loads(result_file.read_text())


def run(args) -> dict:
    from axl_model.data import prepare_data

    prepare_data(stdlib_sources(), CACHE_DIR / "data", progress=True)  # once, before either run is timed
    with tempfile.TemporaryDirectory(prefix="axl-bench-ddp-") as tmp:
        single = measure(1, Path(tmp))
        group = measure(RANKS, Path(tmp))
    ratio = group["bytes_per_s"] / single["bytes_per_s"]
    print(f"micro, global batch {GLOBAL_BATCH} x {SEQ_LEN}, Lion, {MEASURE_SECONDS:.0f} s each:")
    print(f"  1 process x 2 threads (batch {GLOBAL_BATCH}): {single['bytes_per_s']:,.0f} bytes/s ({single['steps']} steps)")
    print(f"  {RANKS} ranks x 1 thread (batch {GLOBAL_BATCH // RANKS} each, gloo): {group['bytes_per_s']:,.0f} bytes/s "
          f"({group['steps']} steps)")
    print(f"  ratio {RANKS} ranks / 1 process: {ratio:.2f}")
    params = ModelConfig.from_name("micro").param_count()
    volume = all_reduce_bytes_per_step(params, RANKS)
    seconds = volume / GIGABIT_BYTES_PER_S
    step_s = GLOBAL_BATCH * SEQ_LEN / single["bytes_per_s"]
    print(f"across 2 machines: the ring all-reduce moves {params / 1e6:.2f}M params x 4 bytes x 2(N-1)/N = "
          f"{volume / 1e6:.1f} MB per rank per step: {seconds * 1000:.0f} ms at 1 GbE line rate, against "
          f"{step_s * 1000:.0f} ms of compute for a batch of {GLOBAL_BATCH} here")
    return {"single_bytes_per_s": single["bytes_per_s"], "ranks_bytes_per_s": group["bytes_per_s"],
            "ratio": ratio, "allreduce_mb_per_step": volume / 1e6, "allreduce_ms_1gbe": seconds * 1000}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:])
    else:
        run(defaults())
