"""The launcher's addresses: the URL its banner gives for the gateway (the advertised one, not loopback, when the
mesh serves other machines) and the address of the redis-server it starts (loopback unless ``redis_bind``)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pytest

from deploy.launcher import ConfigError, Console, LocalRedis, Mesh, MeshConfig


def _banner(config: dict[str, Any]) -> str:
    stream = io.StringIO()
    Mesh(MeshConfig.from_dict({"workers": [{"specialist": "coder", "port": 8901}], **config}),
         Console(stream)).announce()
    return stream.getvalue()


@pytest.mark.parametrize(("config", "shown", "local"), [
    ({}, "http://127.0.0.1:8880/v1", None),  # make up's default: loopback
    ({"host": "0.0.0.0", "advertise_host": "box.lan", "gateway": {"api_keys": ["k"]}},
     "http://box.lan:8880/v1", "http://127.0.0.1:8880/v1"),
    ({"host": "0.0.0.0", "gateway": {"api_keys": ["k"]}}, "http://127.0.0.1:8880/v1", None),  # nothing advertised
    ({"host": "10.1.2.3", "gateway": {"api_keys": ["k"], "port": 9000}}, "http://10.1.2.3:9000/v1", None),
    ({"host": "10.1.2.3", "advertise_host": "nat.example.org", "gateway": {"api_keys": ["k"]}},
     "http://nat.example.org:8880/v1", None),  # a concrete bind: not reachable on loopback
    ({"host": "0.0.0.0", "advertise_host": "fd00::5", "gateway": {"api_keys": ["k"]}},
     "http://[fd00::5]:8880/v1", "http://127.0.0.1:8880/v1"),
    ({"advertise_host": "box.lan"}, "http://127.0.0.1:8880/v1", None),  # bound to loopback: only loopback works
])
def test_the_banner_shows_the_url_other_hosts_should_use(config: dict[str, Any], shown: str, local: str | None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AXL_ADVERTISE_HOST", raising=False)
    text = _banner(config)
    assert f"AXL mesh is up: {shown}  " in text
    assert f"curl {shown}/completions" in text
    assert (f"on this machine also: {local}" in text) if local else "on this machine also" not in text


def test_the_banner_reads_advertise_host_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """AXL_ADVERTISE_HOST exported for `make up` reaches every service (they inherit it): the banner says it too."""
    monkeypatch.setenv("AXL_ADVERTISE_HOST", "192.168.7.7")
    assert "AXL mesh is up: http://192.168.7.7:8880/v1" in _banner({"host": "0.0.0.0", "gateway": {"api_keys": ["k"]}})


@pytest.mark.parametrize("bind", ["box.lan", "::", "fd00::5", "127.0.0.1:6379", ""])
def test_redis_bind_must_be_an_ipv4_address(bind: str) -> None:
    with pytest.raises(ConfigError, match="redis_bind must be an IPv4 address"):
        MeshConfig.from_dict({"redis_bind": bind})


def test_redis_binds_loopback_unless_told(tmp_path: Path) -> None:
    assert MeshConfig.from_dict({}).redis_bind == "127.0.0.1"
    redis = LocalRedis("redis://127.0.0.1:6379/0", tmp_path, Console(io.StringIO()), bind="0.0.0.0")
    assert all("@127.0.0.1:" in url for url in redis.urls.values())  # this machine's services connect on loopback


def test_the_started_redis_listens_on_redis_bind_only(tmp_path: Path) -> None:
    """A real redis-server started on 127.0.0.2 (a second loopback address standing for a LAN one): the services'
    URLs name it, its users log in there, and nothing answers on 127.0.0.1 at that port."""
    import redis as redis_client
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from tests.support import free_port

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    wanted = free_port()
    redis = LocalRedis(f"redis://127.0.0.1:{wanted}/0", tmp_path, Console(io.StringIO()), bind="127.0.0.2").start()
    try:
        assert all(f"@127.0.0.2:{redis.port}/" in url for url in redis.urls.values())
        for url in redis.urls.values():
            assert redis_client.Redis.from_url(url).ping()
        elsewhere = redis_client.Redis(host="127.0.0.1", port=redis.port, retry=Retry(NoBackoff(), 0),
                                       socket_connect_timeout=2)
        with pytest.raises(redis_client.ConnectionError):
            elsewhere.ping()
    finally:
        redis.stop()
