"""The Prometheus collector of the job system, read from Redis at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from axl_mesh.jobs.names import JobKind, QueueName
from axl_mesh.jobs.queues import rq_queue
from axl_mesh.jobs.store import DURATION_BUCKETS, JobStore, as_text
from axl_mesh.jobs_protocol import JobStatus

logger = logging.getLogger(__name__)


class JobsCollector(Collector):
    """Prometheus view of the job system, read from Redis at scrape time (so every scrape of any worker agrees).

    A scrape reads the active jobs only; jobs that ended are counters kept per status when they end."""

    def __init__(self, store: JobStore, queues: Iterable[str] = tuple(QueueName)) -> None:
        self.store = store
        self.queues = list(queues)

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("axl_job_queue_depth", "Jobs waiting per queue", labels=["queue"])
        by_status = GaugeMetricFamily("axl_jobs", "Jobs by kind and status", labels=["kind", "status"])
        step = GaugeMetricFamily("axl_training_step", "Current step of running training jobs", labels=["job_id"])
        loss = GaugeMetricFamily("axl_training_loss", "Last training loss of running jobs", labels=["job_id"])
        speed = GaugeMetricFamily("axl_training_bytes_per_second", "Training throughput", labels=["job_id"])
        try:
            for name in self.queues:
                depth.add_metric([name], rq_queue(name, self.store.redis).count)
            for kind in JobKind:
                counts = {s.value: 0 for s in JobStatus}
                counts.update(self.store.ended_counts(kind))
                for record_id in self.store.active_ids(kind):
                    record = self.store.get(kind, record_id)
                    if record is None or JobStatus(record["status"]).terminal:
                        continue
                    counts[record["status"]] = counts.get(record["status"], 0) + 1
                    progress = record.get("progress")
                    if kind == JobKind.FINE_TUNE and record["status"] == JobStatus.RUNNING and progress:
                        step.add_metric([record_id], progress.get("step") or 0)
                        if progress.get("loss") is not None:
                            loss.add_metric([record_id], progress["loss"])
                        if progress.get("bytes_per_s") is not None:
                            speed.add_metric([record_id], progress["bytes_per_s"])
                for status, count in counts.items():
                    by_status.add_metric([kind.value, status], count)
            durations = self._durations()
        except redis.RedisError:
            logger.warning("jobs metrics: Redis unavailable")
            return
        yield from (depth, by_status, step, loss, speed, *durations)

    def _durations(self) -> list[Any]:
        family = HistogramMetricFamily(
            "axl_job_duration_seconds", "Wall time of ended jobs by kind and status", labels=["kind", "status"]
        )
        for kind in JobKind:
            stored = self.store.redis.hgetall(self.store.durations_key(kind))
            raw = {as_text(k): float(v) for k, v in stored.items()}
            statuses = {k.split(":", 1)[0] for k in raw}
            for status in sorted(statuses):
                buckets = [(str(b), raw.get(f"{status}:{b}", 0.0)) for b in DURATION_BUCKETS]
                buckets.append(("+Inf", raw.get(f"{status}:+Inf", 0.0)))
                family.add_metric([kind.value, status], buckets, raw.get(f"{status}:sum", 0.0))
        return [family]
