"""A job mesh for tests: private Redis (the session's), a data folder, the gateway and workers as real processes.

    mesh = JobMesh(redis_url, tmp_path, start_service)
    client = mesh.client()                      # the openai SDK against the gateway
    trainer = mesh.start_trainer()              # python -m services.trainer_worker
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai

from tests.support import ServiceProcess

# Enough real code that a tiny model has something to learn, in the JSONL pair format the trainer reads.
PAIRS = "\n".join(
    '{"prompt": "def add_%d(a, b):\\n", "completion": "    return a + b + %d\\n"}' % (i, i) for i in range(40)
) + "\n"


class JobMesh:
    def __init__(self, redis_url: str, root: Path, start_service: Callable[..., ServiceProcess], **env: str) -> None:
        self.root = root
        self.start_service = start_service
        self.env = {
            "AXL_REDIS_URL": redis_url, "AXL_DATA_DIR": str(root / "data"), "AXL_JOBS_KEY_PREFIX": "axl:test-jobs",
            "AXL_REGISTRY_URL": "http://127.0.0.1:9", "AXL_REGISTRY_SECRET": "job-mesh-secret",
            "AXL_REAPER_INTERVAL_SECONDS": "1",
            "AXL_HEARTBEAT_INTERVAL_SECONDS": "1", "AXL_HEARTBEAT_TTL_SECONDS": "4", "AXL_CANCEL_GRACE_SECONDS": "5",
            "AXL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "AXL_LOG_LEVEL": "info", **env,
        }
        self.gateway = start_service("services.api_gateway", self.env)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.url + "/v1", api_key="test", max_retries=0, timeout=30)

    def start_trainer(self, **env: str) -> ServiceProcess:
        return self.start_service("services.trainer_worker", {**self.env, **env}, timeout_seconds=60)

    def start_quantizer(self, **env: str) -> ServiceProcess:
        return self.start_service("services.quantizer", {**self.env, **env}, timeout_seconds=60)

    def upload(self, client: openai.OpenAI, text: str = PAIRS, name: str = "pairs.jsonl") -> str:
        return client.files.create(file=(name, io.BytesIO(text.encode())), purpose="fine-tune").id


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_for_status(client: openai.OpenAI, job_id: str, statuses: set[str], timeout: float) -> Any:
    def ended() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in statuses else None

    return wait_for(ended, timeout, f"job {job_id} to reach {statuses}")


def event_messages(client: openai.OpenAI, job_id: str) -> list[str]:
    return [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=10000).data]
