"""Where an SDP offer may make Pono send RTP.

A caller names the media destination in `c=`, so an unchecked one turns Pono into a packet cannon aimed
wherever the caller likes (a cloud metadata address, a service on the host's loopback, the LAN). The rule:

- only IP literals: a hostname is refused (resolving it would also block the event loop on every packet);
- an unspecified address (0.0.0.0, ::) is the legacy RFC 2543 hold: nothing is sent, and it is never a
  destination;
- link-local (169.254/16, fe80::/10), multicast, broadcast and reserved addresses are always refused;
- loopback only when the SIP listener itself is bound to a loopback address (a test or a local proxy), or
  when PONO_SIP_MEDIA_NETWORKS lists it;
- other non-global addresses (RFC 1918, 100.64/10, IPv6 ULA…) only inside PONO_SIP_MEDIA_NETWORKS;
- the family must be the one of our own media address (an IPv6 offer needs an IPv6 PONO_SIP_PUBLIC_ADDRESS
  or PONO_SIP_HOST), so the answer can say IN IP6 truthfully.

Refusals raise SdpError, answered 488 with the reason in a Warning header (RFC 3261 §21.4.26).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from pono.signaling.phone.sdp import Offer, SdpError, address_version

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_loopback_host(host: str) -> bool:
    """Whether a listener host (an IP literal or "localhost") is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class MediaPolicy:
    """`networks`: CIDRs where non-global media destinations are allowed (PONO_SIP_MEDIA_NETWORKS);
    `loopback`: loopback destinations allowed (the SIP listener is on loopback)."""

    networks: tuple[Network, ...] = ()
    loopback: bool = False

    @classmethod
    def build(cls, networks: Sequence[str], listener_host: str) -> MediaPolicy:
        """From the setting's CIDR strings (ValueError when one is not a network) and the listener host."""
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in networks), is_loopback_host(listener_host))

    def destination(self, offer: Offer, our_address: str) -> tuple[str, int] | None:
        """Where RTP for this offer goes, (IP, port); None when the offer is a legacy hold (0.0.0.0 or ::).

        `our_address`: the address our answer will carry (its family must match).
        Raises SdpError for every refusal above."""
        written = offer.address
        if not written:
            raise SdpError("the audio stream has no connection address (c=)")
        try:
            address: Address = ipaddress.ip_address(written)
        except ValueError:
            raise SdpError(f"media address {written[:60]!r} is not an IP address (hostnames are refused)") from None
        if address.is_unspecified:
            return None
        ours = address_version(our_address)
        if address.version != ours:
            raise SdpError(f"IPv{address.version} media offered, but Pono's media address {our_address} is"
                           f" IPv{ours}")
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not 0 < offer.port < 65536:
            raise SdpError(f"media port {offer.port} is out of range")
        kind = _never(address)
        if kind is not None:
            raise SdpError(f"media address {address} is {kind}: never a media destination")
        listed = any(address in network for network in self.networks)
        if address.is_loopback and not (self.loopback or listed):
            raise SdpError(f"media address {address} is loopback: refused unless PONO_SIP_MEDIA_NETWORKS lists it")
        if not address.is_loopback and not address.is_global and not listed:
            raise SdpError(f"media address {address} is not public: refused unless PONO_SIP_MEDIA_NETWORKS"
                           " lists its network")
        return written, offer.port


def _never(address: Address) -> str | None:
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and (address == ipaddress.IPv4Address("255.255.255.255")
                                                       or address in ipaddress.IPv4Network("0.0.0.0/8")):
        return "broadcast or 'this network'"
    if address.is_reserved and not address.is_loopback:  # ::1 lies in IPv6's reserved ::/8
        return "reserved"
    return None
