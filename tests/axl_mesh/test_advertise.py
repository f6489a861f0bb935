"""Bind address vs advertised URL (axl_mesh.advertise and ServiceSettings.advertised_url)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from axl_mesh.advertise import (
    AdvertiseError,
    advertised_url,
    check_advertise_host,
    check_advertise_url,
    is_loopback,
    is_wildcard,
    local_address_toward,
)
from axl_mesh.settings import ServiceSettings


@pytest.fixture(autouse=True)
def _no_axl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("AXL_"):
            monkeypatch.delenv(name)


def _url(**kwargs: object) -> str:
    args = {"bind_host": "127.0.0.1", "port": 8901, "advertise_url": None, "advertise_host": None,
            "registry_url": "http://127.0.0.1:8900", **kwargs}
    return advertised_url(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "", " 0.0.0.0 "])
def test_wildcards(host: str) -> None:
    assert is_wildcard(host) and not is_loopback(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.3", "::1", "[::1]", "localhost", "LocalHost"])
def test_loopbacks(host: str) -> None:
    assert is_loopback(host) and not is_wildcard(host)


def test_order_url_then_host_then_bind() -> None:
    assert _url() == "http://127.0.0.1:8901"
    assert _url(bind_host="192.168.1.20") == "http://192.168.1.20:8901"
    assert _url(bind_host="0.0.0.0", advertise_host="gpu-box.lan") == "http://gpu-box.lan:8901"
    assert _url(advertise_host="fd00::5") == "http://[fd00::5]:8901"
    assert _url(advertise_host="h", advertise_url="https://proxy.lan/axl/coder/") == "https://proxy.lan/axl/coder"


def test_a_wildcard_bind_advertises_the_address_that_reaches_the_registry() -> None:
    # Linux routes all of 127.0.0.0/8 to lo; the source address toward any of it is 127.0.0.1.
    assert _url(bind_host="0.0.0.0", registry_url="http://127.0.0.1:8900") == "http://127.0.0.1:8901"
    assert local_address_toward("http://127.0.0.1:1") == "127.0.0.1"
    assert local_address_toward("http://[::1]:1") in ("::1", None)  # None: a host without IPv6


@pytest.mark.parametrize("registry_url", ["http://registry.invalid:8900", "", "not a url"])
def test_a_wildcard_bind_without_a_route_is_refused_with_what_to_set(registry_url: str) -> None:
    with pytest.raises(AdvertiseError, match="AXL_ADVERTISE_HOST") as info:
        _url(bind_host="0.0.0.0", registry_url=registry_url)
    assert "0.0.0.0" in str(info.value)


def test_port_zero_is_never_advertised() -> None:
    with pytest.raises(AdvertiseError, match="AXL_PORT=0"):
        _url(port=0)
    assert _url(port=0, advertise_url="http://10.0.0.2:8901") == "http://10.0.0.2:8901"


@pytest.mark.parametrize("value", ["http://0.0.0.0:8901", "http://[::]:8901", "ftp://h:1", "h:8901", "http://",
                                   "http://u:p@h:1", "http://h:1/?x=1", "http://h:0", "http://h:99999"])
def test_bad_advertise_urls(value: str) -> None:
    with pytest.raises(ValueError, match="AXL_ADVERTISE_URL"):
        check_advertise_url(value)


@pytest.mark.parametrize("value", ["0.0.0.0", "::", "http://h", "h:8901", "a b", "u@h"])
def test_bad_advertise_hosts(value: str) -> None:
    with pytest.raises(ValueError, match="AXL_ADVERTISE_HOST"):
        check_advertise_host(value)


def test_settings_read_both_names_and_validate_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServiceSettings(port=8901).advertised_url() == "http://127.0.0.1:8901"
    monkeypatch.setenv("AXL_PUBLIC_URL", "http://old-name:8901")  # compose files of before still work
    assert ServiceSettings().advertised_url() == "http://old-name:8901"
    monkeypatch.setenv("AXL_ADVERTISE_URL", "http://new-name:8901/")
    assert ServiceSettings().advertised_url() == "http://new-name:8901"
    monkeypatch.delenv("AXL_PUBLIC_URL")
    monkeypatch.delenv("AXL_ADVERTISE_URL")
    monkeypatch.setenv("AXL_HOST", "0.0.0.0")
    monkeypatch.setenv("AXL_PORT", "8905")
    monkeypatch.setenv("AXL_ADVERTISE_HOST", "10.1.2.3")
    assert ServiceSettings().advertised_url() == "http://10.1.2.3:8905"
    monkeypatch.setenv("AXL_ADVERTISE_HOST", "0.0.0.0")
    with pytest.raises(ValidationError, match="AXL_ADVERTISE_HOST"):
        ServiceSettings()
    monkeypatch.delenv("AXL_ADVERTISE_HOST")
    monkeypatch.setenv("AXL_ADVERTISE_URL", "http://0.0.0.0:8905")
    with pytest.raises(ValidationError, match="wildcard"):
        ServiceSettings()
