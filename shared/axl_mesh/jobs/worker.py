"""The worker process of a job queue: the RQ worker, the reaper thread and ``/healthz`` + ``/metrics``."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import redis

from axl_mesh.jobs.metrics import JobsCollector
from axl_mesh.jobs.names import QueueName
from axl_mesh.jobs.queues import rq_connection, rq_job_class, rq_queue, rq_serializer
from axl_mesh.jobs.reaper import Reaper
from axl_mesh.jobs.settings import JobsSettings
from axl_mesh.jobs.store import JobStore

if TYPE_CHECKING:
    from rq import Worker
    from rq.job import Job

logger = logging.getLogger(__name__)


def _worker_class(heartbeat_ttl_seconds: int) -> type[Worker]:
    from rq import Worker

    class AxlWorker(Worker):
        """RQ's forking worker with a heartbeat TTL of seconds, not RQ's ``monitoring interval + 60 s``, so the
        reaper finds the job of a killed worker quickly (``AXL_HEARTBEAT_TTL_SECONDS``)."""

        def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
            return heartbeat_ttl_seconds

    return AxlWorker


def build_worker(settings: JobsSettings, queue: QueueName, conn: redis.Redis, *, name: str | None = None) -> Any:
    """The RQ worker for ``queue``: JSON only, our job class, our heartbeat TTL."""
    worker_class = _worker_class(settings.heartbeat_ttl_seconds)
    return worker_class(
        [rq_queue(queue.value, conn)],
        connection=conn,
        name=name,
        serializer=rq_serializer(),
        job_class=rq_job_class(),
        job_monitoring_interval=settings.heartbeat_interval_seconds,
        # RQ also cleans registries while idle; the reaper does it on time whatever the worker is doing.
        maintenance_interval=max(15, int(settings.reaper_interval_seconds)),
        worker_ttl=max(30, settings.heartbeat_ttl_seconds * 2),
    )


def serve_health_and_metrics(host: str, port: int, registry: Any) -> Any:
    """``/healthz`` and ``/metrics`` on a thread of the worker's main process (the job runs in a forked child)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/healthz":
                body, ctype, status = b'{"status":"ok"}', "application/json", 200
            elif self.path == "/metrics":
                body, ctype, status = generate_latest(registry), CONTENT_TYPE_LATEST, 200
            else:
                body, ctype, status = (
                    b'{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}',
                    "application/json",
                    404,
                )
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug("http: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="axl-worker-http", daemon=True).start()
    return server


def run_worker(
    settings: JobsSettings, queue: QueueName, *, burst: bool = False, name: str | None = None, on_tick: Any = None
) -> bool:
    """Work ``queue`` until stopped (or, with ``burst``, until it is empty): the RQ worker, the reaper thread and
    the ``/healthz`` + ``/metrics`` endpoints. Returns whether any job ran."""
    from prometheus_client import CollectorRegistry

    conn = rq_connection(settings)
    store = JobStore(conn, settings)
    store.adopt_legacy_records()
    registry = CollectorRegistry()
    registry.register(JobsCollector(store))
    server = serve_health_and_metrics(settings.host, settings.port, registry)
    reaper = Reaper(settings, [q.value for q in QueueName], on_tick=on_tick)
    reaper.tick()  # recover what a previous crash left behind before taking new work
    reaper.start()
    worker = build_worker(settings, queue, conn, name=name)
    # RQ logs each registry clean-up at INFO (every 15 s here): keep job lines, drop the routine.
    logging.getLogger("rq.worker").addFilter(lambda record: "cleaning" not in record.getMessage())
    try:
        return worker.work(burst=burst, logging_level=settings.log_level.upper())
    finally:
        reaper.stop()
        server.shutdown()
