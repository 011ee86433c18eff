"""SDP offer/answer for phone calls: G.711 (PCMU, PCMA) at 8 kHz with RFC 4733 telephone-event, ptime 20."""

from __future__ import annotations

import time
from dataclasses import dataclass

SUPPORTED = ("PCMU", "PCMA")  # in our order of preference when the offer lists both
_STATIC = {0: ("PCMU", "8000"), 8: ("PCMA", "8000")}


class SdpError(ValueError):
    pass


@dataclass(frozen=True)
class Offer:
    address: str
    port: int
    codec: str
    payload_type: int
    dtmf_type: int | None
    direction: str  # sendrecv / sendonly / recvonly / inactive, as the offerer sees it


def parse_offer(sdp: str) -> Offer:
    """Pick the first offered codec we support. Raises SdpError (→ 488) when there is none."""
    session_address = ""
    media: list[list[str]] = []
    for raw in sdp.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if line.startswith("m="):
            media.append([line])
        elif media:
            media[-1].append(line)
        elif line.startswith("c="):
            session_address = line.split()[-1]
    if not sdp.lstrip().startswith("v=0"):
        raise SdpError("not SDP")
    for section in media:
        fields = section[0][2:].split()
        if len(fields) < 4 or fields[0] != "audio" or not fields[1].isdigit() or int(fields[1]) == 0:
            continue
        if not fields[2].startswith("RTP/AVP"):
            continue  # no SRTP or DTLS here
        formats = [int(f) for f in fields[3:] if f.isdigit()]
        names = dict(_STATIC)
        address, direction = session_address, "sendrecv"
        for line in section[1:]:
            if line.startswith("a=rtpmap:"):
                pt, _, encoding = line[9:].partition(" ")
                name, _, rest = encoding.partition("/")
                if pt.isdigit():
                    names[int(pt)] = (name.upper(), rest.split("/")[0])
            elif line.startswith("c="):
                address = line.split()[-1]
            elif line[2:] in ("sendrecv", "sendonly", "recvonly", "inactive"):
                direction = line[2:]
        dtmf = next((pt for pt in formats if names.get(pt) == ("TELEPHONE-EVENT", "8000")), None)
        for pt in formats:
            name, rate = names.get(pt, ("", ""))
            if name in SUPPORTED and rate == "8000":
                return Offer(address, int(fields[1]), name, pt, dtmf, direction)
    raise SdpError("no supported audio codec offered (PCMU or PCMA at 8 kHz)")


_SESSION_ID = int(time.time())


def answer(offer: Offer, address: str, port: int, version: int = 1) -> str:
    """Our answer: the chosen codec, telephone-event when offered, ptime 20, and the mirrored direction."""
    formats = [str(offer.payload_type)] + ([str(offer.dtmf_type)] if offer.dtmf_type is not None else [])
    direction = {"sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}.get(offer.direction,
                                                                                           "sendrecv")
    held = offer.address in ("0.0.0.0", "")
    lines = [
        "v=0",
        # One session id per media port, so a re-offer in the same dialog only bumps the version.
        f"o=pono {_SESSION_ID + port} {version} IN IP4 {address}",
        "s=pono",
        f"c=IN IP4 {address}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {' '.join(formats)}",
        f"a=rtpmap:{offer.payload_type} {offer.codec}/8000",
    ]
    if offer.dtmf_type is not None:
        lines += [f"a=rtpmap:{offer.dtmf_type} telephone-event/8000", f"a=fmtp:{offer.dtmf_type} 0-15"]
    lines += ["a=ptime:20", f"a={'recvonly' if held else direction}"]
    return "\r\n".join(lines) + "\r\n"
