"""Which URLs the pipeline may fetch: http(s) only, and never the internal network unless allowed.

A URL is refused when its scheme is not http/https, its host is missing, or any address its host
resolves to is private, loopback, link-local, multicast, reserved or unspecified — unless that address
lies in one of the explicitly allowed networks (e.g. `127.0.0.1/32` for the synthetic world's server).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

Resolver = Callable[[str], list[str]]


def resolve_host(host: str) -> list[str]:
    """Every IP address `host` resolves to (IP literals resolve to themselves)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})


@dataclass(frozen=True)
class UrlPolicy:
    """Decides whether a URL may be fetched. `check(url)` returns None if allowed, else a reason detail."""

    allowed_networks: tuple[str, ...] = ()
    resolver: Resolver = field(default=resolve_host, compare=False, repr=False)

    def __post_init__(self) -> None:
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"allowed network {network!r} is not a CIDR such as 127.0.0.1/32") from None

    def check(self, url: str) -> str | None:
        """None when `url` may be fetched, otherwise a human-readable reason it is refused."""
        try:
            parts = urlsplit(url)
        except ValueError as error:
            return f"malformed URL ({error})"
        if parts.scheme not in ("http", "https"):
            return f"scheme {parts.scheme or '(none)'!r} is not http or https"
        if not parts.hostname:
            return "URL has no host"
        try:
            addresses = self.resolver(parts.hostname)
        except (OSError, UnicodeError) as error:
            return f"host {parts.hostname!r} does not resolve ({error})"
        for address in addresses:
            if not self._address_allowed(ipaddress.ip_address(address.split("%")[0])):
                return f"host {parts.hostname!r} resolves to non-public address {address}"
        return None

    def _address_allowed(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if any(address in ipaddress.ip_network(n, strict=False) for n in self.allowed_networks):
            return True
        return address.is_global and not address.is_multicast
