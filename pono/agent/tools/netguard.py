"""Where tools may connect: the host allow-list shared by webhook tools and MCP servers over HTTP.

`PONO_WEBHOOK_ALLOWED_HOSTS` entries are host names (`"api.example.com"`, matched exactly, case-insensitive),
IP addresses (`"127.0.0.1"`, `"::1"`) or CIDR blocks (`"10.20.0.0/16"`). A URL's host must be a listed name,
or an IP literal inside a listed IP/CIDR.

Every address a listed name resolves to must be public (`ipaddress`'s `is_global`, not multicast), unless a
listed IP/CIDR covers it: loopback, private (RFC 1918, ULA), link-local (cloud metadata at 169.254.169.254),
shared (CGNAT), reserved and unspecified addresses must be listed as an IP or CIDR to be reached, even
through a listed name. So an internal service needs two entries: its name and its address or block.

The check runs on the addresses the connection will actually use: `GuardedResolver` (aiohttp, for webhooks)
and `GuardedNetworkBackend` (httpcore2, under the MCP SDK's httpx2 client) resolve with the event loop's
`getaddrinfo` (a worker thread, off the loop), refuse the whole name if any address is refused, and hand
the checked addresses to the connector, so a second DNS answer (a rebind) is never used.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import httpcore2
import httpx2
from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressRefused(PermissionError):
    """A host or address the allow-list does not admit. Never retried."""


def refusal_in(exc: BaseException, kinds: tuple[type[BaseException], ...] = (AddressRefused,)) \
        -> BaseException | None:
    """The first exception of `kinds` (a refusal) wrapped in `exc`: `exc` itself, its causes and contexts,
    aiohttp's `os_error`, an exception group's members. None when there is none (at most 50 looked at)."""
    pending, seen = [exc], set()
    while pending and len(seen) < 50:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kinds):
            return current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        linked = (current.__cause__, current.__context__, getattr(current, "os_error", None))
        pending.extend(e for e in linked if isinstance(e, BaseException))
    return None


def _ip(value: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(value.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address


def is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address; False for loopback, private, link-local, CGNAT..."""
    return address.is_global and not address.is_multicast


class HostPolicy:
    """The allow-list, parsed once. `entries`: `PONO_WEBHOOK_ALLOWED_HOSTS` (names, IPs, CIDRs)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.names: set[str] = set()
        self.networks: list[IPNetwork] = []
        for entry in entries:
            entry = entry.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.names.add(entry)

    def _listed_ip(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)

    def check_host(self, host: str) -> None:
        """Raise AddressRefused unless `host` (a URL's host name or IP literal) is on the list."""
        host = host.lower().rstrip(".")
        address = _ip(host)
        if address is not None:
            if not self._listed_ip(address):
                raise AddressRefused(f"address {host!r} is not on the tool host allow-list "
                                     "(PONO_WEBHOOK_ALLOWED_HOSTS)")
        elif host not in self.names:
            raise AddressRefused(f"host {host!r} is not on the tool host allow-list (PONO_WEBHOOK_ALLOWED_HOSTS)")

    def check_address(self, host: str, address: str) -> None:
        """Raise AddressRefused if `host` resolved to a non-public `address` that no listed IP/CIDR covers."""
        ip = _ip(address)
        if ip is None:
            raise AddressRefused(f"host {host!r} resolved to an unparseable address {address!r}")
        if not is_public(ip) and not self._listed_ip(ip):
            raise AddressRefused(
                f"host {host!r} resolves to the non-public address {ip}; list it (or its block) as an IP or CIDR "
                "in PONO_WEBHOOK_ALLOWED_HOSTS to allow it")

    async def resolve(self, host: str, port: int, family: int = socket.AF_UNSPEC) -> list[tuple[Any, ...]]:
        """`getaddrinfo` results for an allowed host, every address checked. An IP literal is not looked up.

        Raises AddressRefused (not listed, or an address refused) or OSError (the lookup failed).
        """
        self.check_host(host)
        literal = _ip(host)
        if literal is not None:
            kind = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            return [(kind, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (str(literal), port))]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"no address for {host!r}")
        for info in infos:
            self.check_address(host, info[4][0])
        return list(infos)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, through the allow-list: the connector connects only to the addresses checked here.

    Raises AddressRefused (an OSError, which aiohttp wraps in ClientConnectorDNSError) for a refused name or
    address. aiohttp skips resolvers for IP literals: check those with `HostPolicy.check_host` first.
    """

    def __init__(self, policy: HostPolicy) -> None:
        self.policy = policy

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> \
            list[ResolveResult]:
        infos = await self.policy.resolve(host, port, family)
        return [ResolveResult(hostname=host, host=info[4][0], port=info[4][1], family=info[0], proto=info[2],
                              flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV) for info in infos]

    async def close(self) -> None:
        return None


class GuardedNetworkBackend(httpcore2.AsyncNetworkBackend):
    """httpcore2's network backend, through the allow-list: resolves and checks the host (IP literals too),
    then connects to a checked address, trying each in turn. TLS still verifies the original host name.
    Raises AddressRefused for a refused host or address; httpcore2's ConnectError when none answers."""

    def __init__(self, policy: HostPolicy, inner: httpcore2.AsyncNetworkBackend | None = None) -> None:
        self.policy = policy
        self.inner = inner or httpcore2.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore2.AsyncNetworkStream:
        async with asyncio.timeout(timeout):
            infos = await self.policy.resolve(host, port)
        failure: Exception | None = None
        for info in infos:
            try:
                return await self.inner.connect_tcp(info[4][0], port, timeout, local_address, socket_options)
            except httpcore2.ConnectError as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore2.AsyncNetworkStream:
        raise AddressRefused("tools connect over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx2.AsyncHTTPTransport):
    """An httpx2 transport whose connections go through `GuardedNetworkBackend`, with no proxy from the
    environment (a proxy would connect for us, past the check)."""

    def __init__(self, policy: HostPolicy) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore2.AsyncConnectionPool(ssl_context=httpx2.create_ssl_context(trust_env=False),
                                                   network_backend=GuardedNetworkBackend(policy))


def guarded_http_client(policy: HostPolicy, **options: Any) -> httpx2.AsyncClient:
    """An httpx2 client (for the MCP SDK) that connects only where `policy` allows and follows no redirects
    itself. `options`: more AsyncClient arguments (timeout, headers)."""
    return httpx2.AsyncClient(transport=GuardedTransport(policy), trust_env=False, follow_redirects=False, **options)
