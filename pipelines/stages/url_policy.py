"""Which URLs the pipeline may fetch: http(s) only, and never the internal network unless allowed.

A URL is refused as `invalid_url` when it cannot be fetched as written (a space or control character,
no host, credentials, a port out of range), as `dns_error` when its host does not resolve, and as
`url_policy` when its scheme is not http/https or any address its host resolves to is private, loopback,
link-local, multicast, reserved or unspecified — unless that address lies in one of the explicitly
allowed networks (e.g. `127.0.0.1/32` for the synthetic world's server).

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
from typing import NamedTuple
from urllib.parse import urlsplit

Resolver = Callable[[str], list[str]]
POLICY_REASON = "url_policy"  # every refusal message starts with it, so a worker's error text names it


INVALID_URL_REASON = "invalid_url"
DNS_REASON = "dns_error"


class UrlPolicyError(OSError):
    """A connection the URL policy refuses."""


class Refusal(NamedTuple):
    """Why a URL is not fetched: a reject reason and a detail for people."""

    reason: str
    detail: str


def malformation(url: str) -> str | None:
    """What makes `url` unfetchable as written (a space or control character, no host, credentials, a port
    out of range), or None. The detail never repeats the credentials."""
    if any(character.isspace() or not character.isprintable() for character in url):
        return "the URL contains a space or a control character; percent-encode it (a space is %20)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        return f"malformed URL ({error})"
    if parts.scheme in ("http", "https") and not parts.hostname:
        return "URL has no host"
    if parts.username is not None or parts.password is not None:
        return "the URL carries credentials (user:password@host); give the URL without them"
    if port == 0:
        return "port 0 is not a port a server listens on"
    return None


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

    def check(self, url: str) -> Refusal | None:
        """None when `url` may be fetched, otherwise why it is refused: `invalid_url` (it cannot be fetched as
        written), `dns_error` (its host does not resolve) or `url_policy` (the policy forbids it)."""
        problem = malformation(url)
        if problem:
            return Refusal(INVALID_URL_REASON, problem)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return Refusal(POLICY_REASON, f"scheme {parts.scheme or '(none)'!r} is not http or https")
        try:
            addresses = self.resolver(parts.hostname)
        except (OSError, UnicodeError) as error:
            return Refusal(DNS_REASON, f"host {parts.hostname!r} does not resolve ({error})")
        refusal = self._refusal(parts.hostname, addresses)
        return Refusal(POLICY_REASON, refusal) if refusal else None

    def check_many(self, urls: list[str], threads: int = 32) -> list[Refusal | None]:
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
