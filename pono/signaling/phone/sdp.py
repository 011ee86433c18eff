"""SDP offer/answer (RFC 3264) for phone calls: G.711 (PCMU, PCMA) at 8 kHz with RFC 4733 telephone-event,
ptime 20. The offer is parsed with aiortc's SDP parser; where its media may go is sdp_policy's business."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field

from aiortc.sdp import SessionDescription

SUPPORTED = ("PCMU", "PCMA")  # in our order of preference when the offer lists both
_STATIC = {0: ("PCMU", 8000), 8: ("PCMA", 8000)}
_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


class SdpError(ValueError):
    """The offer cannot be accepted (→ 488 Not Acceptable Here, with the reason in a Warning header)."""


@dataclass(frozen=True)
class MediaLine:
    """One offered m= line, as RFC 3264 §6 needs it to answer (refused lines are answered with port 0)."""

    kind: str  # audio, video, image, application…
    port: int
    proto: str  # RTP/AVP, RTP/SAVP, udptl…
    formats: tuple[str, ...]


@dataclass(frozen=True)
class Offer:
    """The audio stream we take from an offer. `address` is its connection address exactly as written
    (c= of the m-line, else of the session; "" when there is none); `port` its RTP port."""

    address: str
    port: int
    codec: str  # PCMU or PCMA
    payload_type: int
    dtmf_type: int | None
    direction: str  # sendrecv / sendonly / recvonly / inactive, as the offerer sees it
    media: tuple[MediaLine, ...] = field(default=())  # every offered m= line, in order
    chosen: int = 0  # the index in `media` of the line we answer

    @property
    def held(self) -> bool:
        """The legacy (RFC 2543) hold: an unspecified connection address, 0.0.0.0 (or ::)."""
        return self.address in ("0.0.0.0", "::")


def _parse(sdp: str) -> SessionDescription:
    if not sdp.lstrip().startswith("v=0"):
        raise SdpError("not SDP")
    # aiortc reads WebRTC's SDP and asserts on some attributes phones write differently (a=rtcp:PORT alone,
    # an fmtp for a static payload type without rtpmap, three-part extmap): it is given only what we use.
    kept = [_m_line(line.strip()) for line in sdp.splitlines()
            if line[:2] in ("v=", "o=", "s=", "c=", "t=", "m=") or line.startswith("a=rtpmap:")
            or (line.startswith("a=") and line[2:].strip() in _DIRECTIONS)]
    try:
        return SessionDescription.parse("\r\n".join(kept) + "\r\n")
    except Exception as exc:  # aiortc asserts on what it cannot read
        raise SdpError(f"malformed SDP ({type(exc).__name__})") from None


def _m_line(line: str) -> str:
    """An m= line as aiortc's parser takes it: no port count (49170/2), the transport upper-cased (udptl)."""
    if not line.startswith("m="):
        return line
    fields = line[2:].split()
    if len(fields) >= 3:
        fields[1], fields[2] = fields[1].split("/")[0], fields[2].upper()
    return "m=" + " ".join(fields)


def parse_offer(sdp: str) -> Offer:
    """Pick the first offered audio m-line with a codec we support (the first of them in the offer's order).

    Raises SdpError (→ 488) for malformed SDP or when no audio line offers PCMU or PCMA at 8 kHz over plain
    RTP/AVP. Addresses are not judged here (see sdp_policy.media_destination)."""
    session = _parse(sdp)
    session_direction = next((line[2:].strip() for line in _session_lines(sdp)
                              if line.startswith("a=") and line[2:].strip() in _DIRECTIONS), "sendrecv")
    offered = [line.strip()[2:].split() for line in sdp.splitlines() if line.startswith("m=")]
    lines = tuple(MediaLine(m.kind, m.port, raw[2], tuple(raw[3:])) for m, raw in zip(session.media, offered,
                                                                                     strict=True))
    for index, media in enumerate(session.media):
        if media.kind != "audio" or media.port == 0 or media.profile != "RTP/AVP":
            continue  # no SRTP or DTLS here
        names = dict(_STATIC)
        for codec in media.rtp.codecs:
            names[codec.payloadType] = (codec.mimeType.split("/", 1)[1].upper(), codec.clockRate)
        formats = [int(f) for f in media.fmt]
        dtmf = next((pt for pt in formats if names.get(pt) == ("TELEPHONE-EVENT", 8000)), None)
        for pt in formats:
            name, rate = names.get(pt, ("", 0))
            if name in SUPPORTED and rate == 8000:
                return Offer(media.host or session.host or "", media.port, name, pt, dtmf,
                             media.direction or session_direction, lines, index)
    raise SdpError("no supported audio codec offered (PCMU or PCMA at 8 kHz)")


def _session_lines(sdp: str) -> list[str]:
    out = []
    for line in sdp.splitlines():
        if line.startswith("m="):
            break
        out.append(line)
    return out


_SESSION_ID = int(time.time())


def address_version(address: str) -> int:
    """6 for an IPv6 literal, else 4 (an IPv4 literal, or a host name as PONO_SIP_PUBLIC_ADDRESS may be)."""
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return 4


OUR_DTMF = 101  # the telephone-event payload type of our own offers


def _session(address: str, port: int, version: int) -> list[str]:
    family = f"IP{address_version(address)}"
    return ["v=0",
            # One session id per media port, so a re-offer in the same dialog only bumps the version.
            f"o=pono {_SESSION_ID + port} {version} IN {family} {address}", "s=pono", f"c=IN {family} {address}",
            "t=0 0"]


def _audio(port: int, codecs: list[tuple[int, str]], dtmf: int | None, direction: str) -> list[str]:
    """An audio m= section: `codecs` as (payload type, name) at 8 kHz, then telephone-event when given."""
    formats = [str(pt) for pt, _ in codecs] + ([str(dtmf)] if dtmf is not None else [])
    lines = [f"m=audio {port} RTP/AVP {' '.join(formats)}", *(f"a=rtpmap:{pt} {name}/8000" for pt, name in codecs)]
    if dtmf is not None:
        lines += [f"a=rtpmap:{dtmf} telephone-event/8000", f"a=fmtp:{dtmf} 0-15"]
    return [*lines, "a=ptime:20", f"a={direction}"]


def our_offer(address: str, port: int, version: int = 1, first: str = "PCMU") -> str:
    """The SDP we offer when the caller made no offer (RFC 3261 §13.3.1, §14.2: an INVITE or re-INVITE without
    SDP): PCMU and PCMA (`first` of them first: the codec in use, for a re-INVITE) and telephone-event
    (OUR_DTMF), sendrecv, at our media `address` (IN IP6 for an IPv6 literal) and `port`."""
    codecs = sorted(((pt, name) for pt, (name, _) in _STATIC.items()), key=lambda c: c[1] != first)
    return "\r\n".join(_session(address, port, version) + _audio(port, codecs, OUR_DTMF, "sendrecv")) + "\r\n"


def answer(offer: Offer, address: str, port: int, version: int = 1) -> str:
    """Our answer (RFC 3264 §6): one m= line per offered one, in order. The chosen audio line gets our
    codec, telephone-event when offered, ptime 20 and the mirrored direction; every other line is refused
    with port 0. `address` is our media address: IN IP6 for an IPv6 literal, else IN IP4."""
    direction = {"sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}.get(offer.direction,
                                                                                           "sendrecv")
    lines = _session(address, port, version)
    formats = [str(offer.payload_type)] + ([str(offer.dtmf_type)] if offer.dtmf_type is not None else [])
    media = offer.media or (MediaLine("audio", offer.port, "RTP/AVP", tuple(formats)),)
    for index, line in enumerate(media):
        if index != offer.chosen:
            lines.append(f"m={line.kind} 0 {line.proto} {' '.join(line.formats) or '0'}")
            continue
        lines += _audio(port, [(offer.payload_type, offer.codec)], offer.dtmf_type,
                        "recvonly" if offer.held else direction)
    return "\r\n".join(lines) + "\r\n"
