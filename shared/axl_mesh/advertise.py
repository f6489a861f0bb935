"""Bind address and advertised URL: where a service listens, and the URL other hosts should call it at.

A service binds ``AXL_HOST`` (127.0.0.1 by default; 0.0.0.0 or :: for every interface) and tells the registry the
URL others should use. The two are separate, as Consul's ``bind_addr``/``advertise_addr`` and a Kubernetes pod's
listen address behind its Service are, because they differ whenever the bind is a wildcard or the service sits
behind NAT, a proxy or a container network. The advertised URL is, first match wins:

1. ``AXL_ADVERTISE_URL`` as given (``AXL_PUBLIC_URL`` is its older name): a proxy, TLS, a compose service name
   (``http://coder-worker:8901``), a pod IP;
2. ``http://<AXL_ADVERTISE_HOST>:<AXL_PORT>``: the usual setting on a machine of a home-lab mesh;
3. ``http://<AXL_HOST>:<AXL_PORT>`` when ``AXL_HOST`` is one concrete address;
4. for a wildcard bind, the local address this host's traffic to the registry leaves from (the route's source
   address; nothing is sent): the one address the registry's side of the mesh can be expected to reach back.

A wildcard, an empty host or port 0 is never advertised (nobody can call it); where no URL can be derived the
service refuses to start with an :class:`AdvertiseError` naming the variables to set.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})  # noqa: S104 - names of the wildcard, not a bind


class AdvertiseError(ValueError):
    """No URL that other hosts could call can be advertised; the message says what to set."""


def _bare(host: str) -> str:
    return host.strip().strip("[]").lower()


def is_wildcard(host: str) -> bool:
    """Whether binding ``host`` listens on every interface (0.0.0.0, ::, empty): an address nobody can call."""
    return _bare(host) in WILDCARD_HOSTS


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost); a wildcard or another name is not."""
    host = _bare(host)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: IPv6 literals in brackets."""
    host = host.strip()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def check_advertise_url(value: str) -> str:
    """``value`` without a trailing slash, if other hosts could call it: http(s), a concrete host, no credentials,
    query or fragment (the callers append paths to it); else ValueError saying why."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"AXL_ADVERTISE_URL must be an http(s) URL with a host, got {value!r}")
    if is_wildcard(parts.hostname):
        raise ValueError(
            f"AXL_ADVERTISE_URL {value!r} names a wildcard address, which nobody can call: "
            "give this host's name or address as the other hosts reach it"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"AXL_ADVERTISE_URL must be a base URL (no credentials, query or fragment), got {value!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"AXL_ADVERTISE_URL {value!r}: {exc}") from None
    if port == 0:
        raise ValueError(f"AXL_ADVERTISE_URL {value!r} has port 0, which nobody can call")
    return value.strip().rstrip("/")


def check_advertise_host(value: str) -> str:
    """``value`` if it is a host name or address other hosts could call (not a wildcard, not a URL)."""
    host = value.strip()
    if is_wildcard(host):
        raise ValueError(
            f"AXL_ADVERTISE_HOST must be this host's name or address as the other hosts reach it, "
            f"not the wildcard {value!r}"
        )
    if "/" in host or "@" in host or any(c.isspace() for c in host):
        raise ValueError(
            f"AXL_ADVERTISE_HOST must be a bare host name or address (a whole URL goes in "
            f"AXL_ADVERTISE_URL), got {value!r}"
        )
    if ":" in host:  # only an IPv6 literal may hold colons; a port goes in AXL_PORT or AXL_ADVERTISE_URL
        try:
            ipaddress.IPv6Address(host.strip("[]"))
        except ValueError:
            raise ValueError(
                f"AXL_ADVERTISE_HOST must be a host without a port (the port is AXL_PORT; a "
                f"different one goes in AXL_ADVERTISE_URL), got {value!r}"
            ) from None
    return host


def local_address_toward(url: str) -> str | None:
    """The local address this host's packets to ``url``'s host leave from (the kernel's route choice; connecting
    a UDP socket sends nothing), or None when the host does not resolve or has no route."""
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        for family, kind, proto, _name, address in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_DGRAM):
            with socket.socket(family, kind, proto) as sock:
                try:
                    sock.connect(address)
                except OSError:
                    continue
                local = sock.getsockname()[0]
                if not is_wildcard(local):
                    return str(local)
    except (OSError, ValueError):
        return None
    return None


def advertised_url(
    *, bind_host: str, port: int, advertise_url: str | None, advertise_host: str | None, registry_url: str
) -> str:
    """The base URL a service bound to ``bind_host``:``port`` tells others to call (order in the module docstring);
    :class:`AdvertiseError` when there is none."""
    if advertise_url:
        return check_advertise_url(advertise_url)
    if port == 0:
        raise AdvertiseError(
            "AXL_PORT=0 binds a port chosen at start, which cannot be advertised: set AXL_PORT, "
            "or AXL_ADVERTISE_URL to the URL that reaches this service"
        )
    host = advertise_host.strip() if advertise_host else bind_host.strip()
    if is_wildcard(host):
        derived = local_address_toward(registry_url) if registry_url.strip() else None
        if derived is None:
            raise AdvertiseError(
                f"AXL_HOST={bind_host!r} listens on every interface, which is no address another host can call, "
                f"and no route to the registry ({registry_url!r}) shows which of this host's addresses to "
                "advertise instead: set AXL_ADVERTISE_HOST (this host's name or IP as the other hosts reach it) "
                "or AXL_ADVERTISE_URL"
            )
        host = derived
    return f"http://{url_host(host)}:{port}"
