import logging

from axl_mesh.settings import RoutineRequestFilter


def access_record(path: str, status: int) -> logging.LogRecord:
    """A record shaped like uvicorn's access log line."""
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                             ("127.0.0.1:5000", "GET", path, "1.1", status), None)


def test_routine_requests_stay_out_of_the_access_log():
    keep = RoutineRequestFilter().filter
    assert not keep(access_record("/healthz", 200))
    assert not keep(access_record("/metrics", 200))
    assert not keep(access_record("/v1/instances/axl-coder-1/heartbeat", 200))
    assert keep(access_record("/readyz", 503))  # a failing probe is news
    assert keep(access_record("/v1/completions", 200))
    assert keep(logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "plain message", None, None))
