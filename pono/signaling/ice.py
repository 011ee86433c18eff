"""ICE configuration: the STUN/TURN servers the browser and aiortc use, and where aiortc gathers."""

from __future__ import annotations

from collections.abc import Callable

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

from pono.settings import IceServer

_original_host_addresses = aioice.ice.get_host_addresses


def restrict_host_addresses(allowed: list[str]) -> Callable[[], None]:
    """Gather host candidates only on `allowed` addresses (all interfaces when empty).

    aioice has no option for this and skips 127.0.0.1 by default, so loopback-only deployments and
    tests (and hosts with interfaces that must not leak into SDP) need the lookup replaced.
    This is process-wide, like the server's configuration it comes from. Returns a function that puts back
    the lookup in place before the call (not aioice's own): a test that changes it for a moment must
    restore what the process's server was using, or later calls in that process gather no loopback address.
    """
    previous = aioice.ice.get_host_addresses

    def restore() -> None:
        aioice.ice.get_host_addresses = previous

    if not allowed:
        aioice.ice.get_host_addresses = _original_host_addresses
        return restore
    wanted = list(allowed)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in wanted if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses
    return restore


def rtc_configuration(servers: list[IceServer]) -> RTCConfiguration:
    # iceServers=None would make aiortc fall back to a public Google STUN server; [] means none.
    return RTCConfiguration(iceServers=[
        RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in servers
    ])
