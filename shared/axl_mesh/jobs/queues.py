"""RQ with JSON only: the queue, job class, serializer and connection every enqueue, fetch and worker uses."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import redis

from axl_mesh.jobs.names import QUANTIZE_FUNCTION, TRAIN_FUNCTION, TRAIN_MEMBER_FUNCTION
from axl_mesh.jobs.settings import JobsSettings
from axl_mesh.redis_util import reconnect_policy

if TYPE_CHECKING:
    from rq.job import Job


def rq_connection(settings: JobsSettings) -> redis.Redis:
    """The plain (bytes) client RQ wants."""
    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, **reconnect_policy())


# --- RQ, JSON only ------------------------------------------------------------------------------------------------
# Nothing read from Redis is unpickled. RQ's default serializer pickles a job's call and meta and unpickles them on
# every fetch (a worker dequeuing, a registry cleanup, a status read), so whoever can write to Redis could run code
# in a worker. Every queue, worker and job fetch goes through the helpers below: RQ's JSON serializer, and a job
# class that runs only our job functions and no callbacks (those are names in the job's hash too).

JOB_FUNCTIONS = frozenset({TRAIN_FUNCTION, TRAIN_MEMBER_FUNCTION, QUANTIZE_FUNCTION})


class ForeignJobError(RuntimeError):
    """A job in our queues names a function that is not one of ``JOB_FUNCTIONS``."""


def rq_serializer() -> Any:
    from rq.serializers import JSONSerializer

    return JSONSerializer


@functools.cache
def rq_job_class() -> type[Job]:
    from rq.job import Job

    class AxlJob(Job):
        @property
        def func(self) -> Any:
            if self.func_name not in JOB_FUNCTIONS:
                raise ForeignJobError(f"refusing to run {self.func_name!r}: not an AXL job function")
            return super().func

        # Ours never set callbacks; a job hash written by someone else must not make the worker import and run one.
        success_callback = failure_callback = stopped_callback = property(lambda self: None)

    return AxlJob


def rq_queue(name: str, connection: redis.Redis) -> Any:
    """The RQ queue ``name`` with the JSON serializer and our job class (enqueue, count, registries)."""
    from rq import Queue

    return Queue(str(name), connection=connection, serializer=rq_serializer(), job_class=rq_job_class())


def fetch_rq_job(job_id: str, connection: redis.Redis) -> Any:
    """RQ's job ``job_id``, read as JSON (raises ``rq.exceptions.NoSuchJobError``)."""
    return rq_job_class().fetch(job_id, connection=connection, serializer=rq_serializer())
