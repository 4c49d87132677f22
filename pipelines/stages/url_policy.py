"""Which URLs the pipeline may fetch: http(s) only, and never the internal network unless allowed.

A URL is refused when its scheme is not http/https, its host is missing, or any address its host
resolves to is private, loopback, link-local, multicast, reserved or unspecified — unless that address
lies in one of the explicitly allowed networks (e.g. `127.0.0.1/32` for the synthetic world's server).

`check` judges a URL before it is fetched; `check_many` judges a whole URL list, resolving each distinct
host once and many hosts at a time. `connect` enforces the same rule on every connection a
fetcher opens (after redirects too): it resolves the host once, checks every address, and connects
only to the addresses it checked, so a DNS answer cannot change between the check and the connect.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

Resolver = Callable[[str], list[str]]
POLICY_REASON = "url_policy"  # every refusal message starts with it, so a worker's error text names it


class UrlPolicyError(OSError):
    """A connection the URL policy refuses."""


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
        return self._refusal(parts.hostname, addresses)

    def check_many(self, urls: list[str], threads: int = 32) -> list[str | None]:
        """`check` of every URL. Each distinct host is resolved once, `threads` at a time: a web URL list
        names far fewer hosts than URLs, and each DNS answer can take milliseconds."""
        hosts = {host for url in urls if (host := _hostname(url))}
        with ThreadPoolExecutor(threads) as pool:
            answers = dict(zip(hosts, pool.map(self._resolve_or_error, hosts)))

        def answered(host: str) -> list[str]:
            answer = answers[host]
            if isinstance(answer, Exception):
                raise answer
            return answer

        cached = replace(self, resolver=answered)
        return [cached.check(url) for url in urls]

    def _resolve_or_error(self, host: str) -> list[str] | OSError | UnicodeError:
        try:
            return self.resolver(host)
        except (OSError, UnicodeError) as error:
            return error

    def connect(
        self, address: tuple[str, int], timeout: float, source_address: tuple[str, int] | None = None
    ) -> socket.socket:
        """`socket.create_connection` that refuses (UrlPolicyError) a host resolving to any address the
        policy does not allow, and otherwise connects to the first checked address that answers."""
        host, port = address
        addresses = self.resolver(host)
        refusal = self._refusal(host, addresses)
        if refusal:
            raise UrlPolicyError(f"{POLICY_REASON}: {refusal}")
        error: OSError = OSError(f"host {host!r} resolves to no address")
        for ip in addresses:
            try:
                return socket.create_connection((ip, port), timeout, source_address)
            except OSError as failed:
                error = failed
        raise error

    def _refusal(self, host: str, addresses: list[str]) -> str | None:
        for address in addresses:
            if not self._address_allowed(ipaddress.ip_address(address.split("%")[0])):
                return f"host {host!r} resolves to non-public address {address}"
        return None

    def _address_allowed(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if any(address in ipaddress.ip_network(n, strict=False) for n in self.allowed_networks):
            return True
        return address.is_global and not address.is_multicast


def _hostname(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None
