"""WebRTC signaling endpoints: call tokens, ICE servers, offer/answer, hang-up."""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import itertools
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web
from aiortc import RTCIceParameters, RTCPeerConnection, RTCSessionDescription
from aiortc import sdp as aiortc_sdp
from aiortc.codecs import CODECS
from aiortc.exceptions import OperationError
from aiortc.rtcdtlstransport import X509_DIGEST_ALGORITHMS
from aiortc.rtcpeerconnection import find_common_codecs
from pydantic import BaseModel, Field

from pono.http import ApiError, read_json_model
from pono.signaling.call_tokens import (
    create_call_token,
    delete_call,
    spend_call_token,
    token_persona,
    verify_call_token,
)
from pono.signaling.ice import rtc_configuration
from pono.signaling.jitter import use_for_received_audio
from pono.signaling.services import SIGNALING
from pono.signaling.webrtc import WebRTCTransport

log = logging.getLogger(__name__)

MAX_SDP_CHARS = 64 * 1024
_NEGOTIATION_TIMEOUT_S = 10
_CONNECT_TIMEOUT_S = 30


class CallOffer(BaseModel):
    sdp: str = Field(min_length=1, max_length=MAX_SDP_CHARS)
    type: Literal["offer"]
    persona: str | None = Field(default=None, max_length=200)


async def ice_servers(request: web.Request) -> web.Response:
    services = request.app[SIGNALING]
    verify_call_token(request, services)
    servers = [s.model_dump(exclude_none=True) for s in services.settings.ice_servers]
    return web.json_response({"iceServers": servers})


# -- offers: checked and normalised before aiortc sees them, answered with what aiortc never saw ----------------
_LINE = re.compile(r"^[a-z]=")
_SCTP_PROFILES = ("UDP/DTLS/SCTP", "TCP/DTLS/SCTP", "DTLS/SCTP")
_AUDIO_CODECS = ", ".join(c.mimeType.split("/")[1] for c in CODECS["audio"])
_HINTS = {  # what a line that aiortc cannot read should look like
    "m=": "m=<media> <port> <proto> <fmt> ... (RFC 8866 §5.14)",
    "c=": "c=IN IP4|IP6 <address> (RFC 8866 §5.7)",
    "a=setup:": "an offer's a=setup is actpass, active or passive (RFC 8842 §5.2)",
    "a=fingerprint:": "a=fingerprint:<hash function> <hex bytes> (RFC 8122 §5)",
    "a=candidate:": "a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type> ... "
                    "(RFC 8839 §5.1)",
    "a=rtpmap:": "a=rtpmap:<payload type> <encoding>/<clock rate>[/<channels>] (RFC 8866 §6.6)",
    "a=fmtp:": "a=fmtp:<payload type of an a=rtpmap> <parameters> (RFC 8866 §6.15)",
}


# A browser gathers a few candidates per network interface (host, server-reflexive and relayed, UDP and TCP, IPv4
# and IPv6): well under this. Every remote candidate is an address the server sends ICE connectivity checks to,
# again and again until the call connects, so an offer with an unbounded list would have Pono send packets to
# any number of hosts the caller chose (RFC 8445 §14.2 bounds the checklist for the same reason).
MAX_CANDIDATES_PER_M_LINE = 32
_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")  # ice-char (RFC 8839 §5.4)
_MDNS_NAME = re.compile(r"[A-Za-z0-9-]{1,63}\.local")  # what aioice resolves (draft-ietf-mmusic-mdns-ice-candidates)


def _bad(message: str) -> ApiError:
    return ApiError(400, f"invalid SDP offer: {message}")


@dataclass
class Offer:
    """A caller's offer made fit for aiortc, and what answering the m= lines aiortc never saw takes."""

    sdp: str  # the offer aiortc gets: the taken m= lines only, each with a mid, a direction and its transport
    media: list[aiortc_sdp.MediaDescription]  # every m= line of the caller's offer, in order
    taken: list[int] = field(default_factory=list)  # indexes into media of the m= lines aiortc gets
    invented: set[str] = field(default_factory=set)  # mids given to m= lines that had none
    bundle: list[str] = field(default_factory=list)  # the answer's BUNDLE group, its tag first; [] for none

    @property
    def kinds(self) -> set[str]:
        """The kinds of the m= lines taken: "audio", "application" or both."""
        return {self.media[i].kind for i in self.taken}


def _readable(lines: list[str]) -> bool:
    try:
        aiortc_sdp.SessionDescription.parse("\r\n".join(lines))
    except Exception:
        return False
    return True


def _unreadable_line(lines: list[str]) -> int | None:
    """The index of the first line aiortc cannot read on its own (with its m= line and a=rtpmap lines)."""
    m_line: str | None = None
    rtpmaps: list[str] = []
    for n, line in enumerate(lines):
        if line.startswith("m="):
            m_line = line
            section = itertools.takewhile(lambda x: not x.startswith("m="), lines[n + 1:])
            rtpmaps = [x for x in section if x.startswith("a=rtpmap:") and _readable([line, x])]
        if not _readable([line] if m_line is None or line is m_line else [m_line, *rtpmaps, line]):
            return n
    return None


def _parse(text: str) -> aiortc_sdp.SessionDescription:
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if line and not _LINE.match(line):
            raise _bad(f"line {n} is not <type>=<value> (RFC 8866 §5): {line[:80]!r}")
    try:
        return aiortc_sdp.SessionDescription.parse(text)
    except Exception as exc:  # aiortc's parser asserts, indexes and converts as it reads
        n = _unreadable_line(lines)
        if n is None:
            raise _bad(f"it cannot be read ({type(exc).__name__}: {exc})") from None
        hint = next((h for prefix, h in _HINTS.items() if lines[n].startswith(prefix)), "")
        raise _bad(f"line {n + 1} cannot be read: {lines[n][:80]!r}" + (f"; {hint}" if hint else "")) from None


def _check_transport(label: str, media: aiortc_sdp.MediaDescription) -> None:
    """What ICE and DTLS need of an m= line we take, which aiortc would only miss once connecting."""
    if not media.ice.usernameFragment:
        raise _bad(f"{label} has no a=ice-ufrag (RFC 8839 §5.4)")
    if not media.ice.password:
        raise _bad(f"{label} has no a=ice-pwd (RFC 8839 §5.4)")
    for attr, value, least in (("ice-ufrag", media.ice.usernameFragment, 4), ("ice-pwd", media.ice.password, 22)):
        if not (least <= len(value) <= 256 and _ICE_CHARS.fullmatch(value)):
            raise _bad(f"{label} has a={attr}:{value[:40]}, which is not {least} to 256 letters, digits, '+' or '/' "
                       "(RFC 8839 §5.4)")
    _check_candidates(label, media)
    if media.dtls is None:
        raise _bad(f"{label} has no a=setup; an offer's is actpass (RFC 8842 §5.2)")
    fingerprints = media.dtls.fingerprints
    if not fingerprints:
        raise _bad(f"{label} has no a=fingerprint, so DTLS could not authenticate the caller (RFC 8122 §5)")
    usable = [f for f in fingerprints if f.algorithm.lower() in X509_DIGEST_ALGORITHMS]
    if not usable:
        used = ", ".join(sorted({f.algorithm for f in fingerprints}))
        raise _bad(f"{label} has a=fingerprint with {used} only; Pono checks sha-256, sha-384 or sha-512 "
                   "(RFC 8122 §5)")
    for f in usable:
        size = X509_DIGEST_ALGORITHMS[f.algorithm.lower()].digest_size
        if not re.fullmatch(rf"[0-9A-Fa-f]{{2}}(:[0-9A-Fa-f]{{2}}){{{size - 1}}}", f.value):
            raise _bad(f"{label} has a=fingerprint:{f.algorithm} that is not {size} colon-separated hex bytes "
                       "(RFC 8122 §5)")


def _port(value: int | None, least: int = 0) -> bool:
    return value is None or least <= value <= 65535


def _check_candidates(label: str, media: aiortc_sdp.MediaDescription) -> None:
    """The remote candidates aiortc will send connectivity checks to: few, and each one it can use."""
    if not _port(media.rtcp_port):
        raise _bad(f"{label} has a=rtcp:{media.rtcp_port}, a port out of 0-65535")
    if not _port(media.sctp_port):
        raise _bad(f"{label} has a=sctp-port:{media.sctp_port}, a port out of 0-65535 (RFC 8841 §5)")
    if len(media.ice_candidates) > MAX_CANDIDATES_PER_M_LINE:
        raise _bad(f"{label} has {len(media.ice_candidates)} a=candidate lines; Pono takes at most "
                   f"{MAX_CANDIDATES_PER_M_LINE}")
    for c in media.ice_candidates:
        problem = None
        if not 1 <= c.component <= 256:
            problem = "its component is not 1-256"
        elif not 1 <= c.priority <= 2**31 - 1:
            problem = "its priority is not 1 to 2^31-1 (RFC 8445 §5.1.2)"
        elif not _port(c.port) or not _port(c.relatedPort):
            problem = "a port is out of 0-65535"
        elif not _MDNS_NAME.fullmatch(c.ip):
            try:
                ipaddress.ip_address(c.ip)
            except ValueError:
                problem = "its address is neither an IP address nor an mDNS .local name"
        if problem:
            raise _bad(f"{label} has 'a=candidate:{aiortc_sdp.candidate_to_sdp(c)[:100]}': {problem} (RFC 8839 §5.1)")


def _take(label: str, media: aiortc_sdp.MediaDescription, kinds: set[str]) -> str | None:
    """Check an m= line Pono might take; None when it is taken, else why it is rejected. Raises ApiError 400."""
    if media.kind in kinds:
        return f"{label}: Pono takes one audio stream and one data channel"
    if media.kind == "audio":
        _check_transport(label, media)
        if not media.rtcp_mux:
            raise _bad(f"{label} has no a=rtcp-mux; WebRTC multiplexes RTP and RTCP (RFC 5761 §5.1.1)")
        if not find_common_codecs(CODECS["audio"], media.rtp.codecs):
            return f"{label}: no codec in common (Pono takes {_AUDIO_CODECS})"
        media.direction = media.direction or "sendrecv"  # no direction attribute means sendrecv (RFC 8866 §6.7)
        if media.rtcp_port is None:  # aiortc writes a=rtcp-mux only after an a=rtcp line; muxed, it is the port
            media.rtcp_port = media.port
        return None
    if media.kind == "application" and media.profile in _SCTP_PROFILES:
        _check_transport(label, media)
        if media.profile == "DTLS/SCTP" and not str(media.fmt[0]).isdigit():
            raise _bad(f"{label} has no SCTP port as its format (draft-ietf-mmusic-sctp-sdp-05)")
        if media.profile != "DTLS/SCTP" and media.sctp_port is None:
            raise _bad(f"{label} has no a=sctp-port (RFC 8841 §5)")
        return None
    return f"{label}: Pono takes audio and an SCTP data channel only"


def prepare_offer(text: str) -> Offer:
    """Check a caller's SDP offer and rewrite it into one aiortc handles, or raise ApiError 400 naming the problem.

    aiortc takes every m= line as offered and finds out late, or never, what is wrong. Here, in one pass:
    - junk gets the line it is on; a taken m= line without a=ice-ufrag/a=ice-pwd (RFC 8839 §5.4), a=setup
      (RFC 8842 §5.2), a usable a=fingerprint (RFC 8122 §5), audio's a=rtcp-mux or a data channel's
      a=sctp-port (RFC 8841 §5) is refused here instead of failing the connection later;
    - mids must be unique and BUNDLE may name only mids that exist (RFC 5888 §4, §5); m= lines without a mid
      get one for aiortc, which the answer drops again, and no BUNDLE group is invented (RFC 8843 §7.3);
    - m= lines with port 0 stay rejected (RFC 3264 §6) and aiortc never sees them, unless a=bundle-only marks
      them bundled (RFC 8843 §6): those borrow the BUNDLE tag's transport;
    - Pono takes the first audio with a codec in common and the first SCTP data channel; other m= lines
      (video, a second audio, ...) are rejected in the answer. Audio without a direction is sendrecv.
    The offer must leave audio that is not inactive, or a data channel. restore_answer() completes the answer.
    """
    if not text.lstrip().startswith("v=0"):
        raise _bad("it must start with 'v=0'")
    session = _parse(text)
    sections = aiortc_sdp.grouplines(text)[1]
    offer = Offer(sdp="", media=list(session.media))
    mids: set[str] = set()
    for media in offer.media:
        if media.rtp.muxId in mids:
            raise _bad(f"a=mid:{media.rtp.muxId} is on two m= lines; a mid names one (RFC 5888 §4)")
        if media.rtp.muxId:
            mids.add(media.rtp.muxId)
    bundles = [[str(item) for item in g.items] for g in session.group if g.semantic == "BUNDLE"]
    unknown = [mid for group in bundles for mid in group if mid not in mids]
    if unknown:
        raise _bad(f"a=group:BUNDLE names mid {unknown[0]}, which no m= line has (RFC 5888 §5)")
    offered_bundle = bundles[0] if bundles else []
    for i, media in enumerate(offer.media):
        if not media.rtp.muxId:
            mid = str(i)
            while mid in mids:
                mid = f"_{mid}"
            media.rtp.muxId = mid
            mids.add(mid)
            offer.invented.add(mid)
    tag = next((m for m in offer.media if offered_bundle and m.rtp.muxId == offered_bundle[0]), None)
    for i, media in enumerate(offer.media):
        if not _port(media.port):
            raise _bad(f"m= line {i + 1} ({media.kind}) has port {media.port}, out of 0-65535 (RFC 8866 §5.14)")
    rejected: list[str] = []
    for i, media in enumerate(offer.media):
        label = f"m= line {i + 1} ({media.kind})"
        if media.port == 0:
            if not ("a=bundle-only" in sections[i] and media.rtp.muxId in offered_bundle[1:] and tag and tag.port):
                continue  # the caller rejected it
            _check_transport(f"the BUNDLE tag {tag.kind} m= line", tag)
            media.port, media.ice, media.dtls = 9, copy.copy(tag.ice), copy.deepcopy(tag.dtls)
            media.ice_candidates = list(tag.ice_candidates)
        reason = _take(label, media, {offer.media[t].kind for t in offer.taken})
        if reason is None:
            offer.taken.append(i)
        else:
            rejected.append(reason)
    if not offer.taken:
        raise _bad("the offer has neither an audio nor a data channel (m=audio or m=application) that Pono can take"
                   + "".join(f"; {r}" for r in rejected))
    if offer.kinds == {"audio"} and offer.media[offer.taken[0]].direction == "inactive":
        raise _bad("its audio is inactive and it has no data channel: there is nothing to talk over")
    taken_mids = {offer.media[i].rtp.muxId for i in offer.taken}
    offer.bundle = [mid for mid in offered_bundle if mid in taken_mids]
    session.media = [offer.media[i] for i in offer.taken]
    session.group = [aiortc_sdp.GroupDescription(semantic="BUNDLE", items=list(offer.bundle))] if offer.bundle else []
    try:
        offer.sdp = str(session)
    except ValueError as exc:  # aiortc writes addresses back as IP literals only (a hostname in c= or a=rtcp)
        raise _bad(f"addresses in c= and a=rtcp must be IP addresses ({exc})") from None
    return offer


def restore_answer(offer: Offer, answer_sdp: str) -> str:
    """aiortc's answer to `offer.sdp`, made the answer to the caller's offer: one m= line per offered one, in
    order (RFC 3264 §6). Rejected ones come back with port 0, their format and mid, outside BUNDLE; mids the
    offer did not have are dropped; the BUNDLE group is the offer's, less what was rejected (RFC 8843 §7.3)."""
    answer = aiortc_sdp.SessionDescription.parse(answer_sdp)
    answered = iter(answer.media)
    media: list[aiortc_sdp.MediaDescription] = []
    for i, offered in enumerate(offer.media):
        if i in offer.taken:
            m = next(answered)
        else:
            m = aiortc_sdp.MediaDescription(kind=offered.kind, port=0, profile=offered.profile, fmt=offered.fmt)
            m.host, m.ice, m.rtp.muxId = "0.0.0.0", RTCIceParameters(), offered.rtp.muxId
        if m.rtp.muxId in offer.invented:
            m.rtp.muxId = ""
        media.append(m)
    answer.media = media
    answer.group = [aiortc_sdp.GroupDescription(semantic="BUNDLE", items=list(offer.bundle))] if offer.bundle else []
    return str(answer)


async def create_call(request: web.Request) -> web.Response:
    """POST /api/calls {"sdp", "type": "offer", "persona"?} with a call token: answer a WebRTC offer.

    201 {"sdp", "type": "answer", "call_id"}: the answer has one m= line per offered one (RFC 3264 §6).
    401 without a valid call token, 503 when not ready or full, 403/404 for the persona, 400 for an offer
    prepare_offer() refuses (before the token is spent), 409 when the token already opened a call.
    """
    services = request.app[SIGNALING]
    claims = verify_call_token(request, services)
    body = await read_json_model(request, CallOffer)
    if services.calls.draining:
        raise ApiError(503, "this server is draining; try again", retry_after_s=5)
    if not services.models.loaded.is_set():
        raise ApiError(503, "the server is not ready for calls yet", retry_after_s=2)
    # A place is held before the first await, so concurrent offers cannot all pass a check of "full".
    if not services.calls.reserve():
        raise ApiError(503, "too many calls in progress", retry_after_s=5)
    try:
        persona = await token_persona(services, claims, body.persona)  # a token opens its own persona only
        offer = prepare_offer(body.sdp)  # after the checks of who may call, before the token is spent
        call_id = services.calls.new_call_id()
        await spend_call_token(services, claims, call_id)  # once, across replicas and restarts
    except BaseException:
        services.calls.release()
        raise

    started = time.perf_counter()
    pc = RTCPeerConnection(rtc_configuration(services.settings.ice_servers))
    transport = WebRTCTransport(pc)
    try:
        try:
            await asyncio.wait_for(
                pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer")),
                _NEGOTIATION_TIMEOUT_S,
            )
            if "audio" in offer.kinds:
                pc.addTrack(transport.out_track)  # the answer's direction then says whether it is sent
            answer = await pc.createAnswer()
        except (ValueError, KeyError, IndexError, TypeError, AssertionError, AttributeError, OperationError) as exc:
            # prepare_offer() should have caught it: a 400 all the same, since it is the offer aiortc refused
            log.info("aiortc refused a checked offer", exc_info=True)
            raise _bad(str(exc) or type(exc).__name__) from None
        await asyncio.wait_for(pc.setLocalDescription(answer), _NEGOTIATION_TIMEOUT_S)
        use_for_received_audio(pc)  # before any media: the caller's words reach the VAD as they arrive
        answer_sdp = restore_answer(offer, pc.localDescription.sdp)
    except BaseException:
        services.calls.release()
        await transport.close()
        raise
    services.calls.start(call_id, transport, persona=persona, caller=request.remote, reserved=True)
    transport.expect_connection_within(_CONNECT_TIMEOUT_S)
    log.info("call %s answered in %.0f ms (%s; speaks: %s)", call_id, 1000 * (time.perf_counter() - started),
             ",".join(sorted(offer.kinds)), transport.has_audio)
    return web.json_response({"sdp": answer_sdp, "type": "answer", "call_id": call_id}, status=201)


def routes() -> list[web.RouteDef]:
    return [
        web.post("/api/call-tokens", create_call_token),
        web.get("/api/ice-servers", ice_servers),
        web.post("/api/calls", create_call),
        web.delete("/api/calls/{call_id}", delete_call),
    ]
