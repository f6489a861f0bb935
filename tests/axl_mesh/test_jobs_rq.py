"""RQ runs no pickles: jobs are JSON in Redis, and what someone else wrote into our queues is never unpickled nor run.

Anyone who can write to Redis could enqueue a job; with RQ's default serializer the worker unpickles its data and
meta (code execution). These tests write such jobs by hand and run the real trainer worker over them.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import redis
from rq import Queue

from axl_mesh.jobs import TRAIN_FUNCTION, QueueName, fetch_rq_job, new_id, rq_queue
from tests.support import REPO_ROOT, free_port


class _MakesADirectoryWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.path),)


def test_a_queued_job_is_json_in_redis_and_round_trips(redis_url: str) -> None:
    conn = redis.Redis.from_url(redis_url)
    job_id = new_id("ftjob")
    rq_queue(QueueName.TRAIN, conn).enqueue(TRAIN_FUNCTION, job_id, job_id=job_id, meta={"attempt": 1})
    raw = conn.hgetall(f"rq:job:{job_id}")
    data = zlib.decompress(raw[b"data"])
    assert json.loads(data) == [TRAIN_FUNCTION, None, [job_id], {}]
    assert json.loads(raw[b"meta"]) == {"attempt": 1}
    job = fetch_rq_job(job_id, conn)
    assert (job.func_name, list(job.args), job.kwargs, job.meta) == (TRAIN_FUNCTION, [job_id], {}, {"attempt": 1})
    conn.close()


def _run_worker_burst(redis_url: str, tmp_path: Path, queue: str = "trainer_worker") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXL_")}
    env.update({"AXL_REDIS_URL": redis_url, "AXL_PORT": str(free_port()), "AXL_DATA_DIR": str(tmp_path / "data"),
                "AXL_JOBS_KEY_PREFIX": "axl:rq-test", "AXL_REAPER_INTERVAL_SECONDS": "1",
                "AXL_HEARTBEAT_INTERVAL_SECONDS": "1"})
    return subprocess.run([sys.executable, "-m", f"services.{queue}", "--burst"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_pickled_job_written_into_redis_is_never_unpickled(redis_url: str, tmp_path: Path) -> None:
    conn = redis.Redis.from_url(redis_url)
    marker = tmp_path / "unpickled"
    exploit = pickle.dumps(_MakesADirectoryWhenUnpickled(marker))
    assert not marker.exists()
    # A job as RQ's default (pickle) serializer writes it, its call and meta replaced by the payload.
    job = Queue(QueueName.TRAIN.value, connection=conn).enqueue(TRAIN_FUNCTION, "ftjob-" + "0" * 24)
    conn.hset(f"rq:job:{job.id}", mapping={"data": zlib.compress(exploit), "meta": exploit})

    result = _run_worker_burst(redis_url, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not marker.exists(), "the worker unpickled a job from Redis"
    assert conn.hget(f"rq:job:{job.id}", "status") == b"failed"  # refused, not run
    conn.close()


def test_a_json_job_naming_another_function_is_not_run(redis_url: str, tmp_path: Path) -> None:
    """JSON is not enough: a job is a function name, and only our two job functions run."""
    conn = redis.Redis.from_url(redis_url)
    marker = tmp_path / "ran"
    job = rq_queue(QueueName.QUANTIZE, conn).enqueue("os.mkdir", str(marker))
    result = _run_worker_burst(redis_url, tmp_path, "quantizer")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not marker.exists(), "the worker ran a function that is not a job function"
    assert conn.hget(f"rq:job:{job.id}", "status") == b"failed"
    assert "not an AXL job function" in (result.stdout + result.stderr)
    conn.close()
