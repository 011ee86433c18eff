"""Twilio Media Streams (and compatible providers) over a websocket: `GET /api/phone/twilio`.

In: connected, start (persona and caller in customParameters, the audio format in mediaFormat), media
(base64, μ-law 8 kHz unless mediaFormat says otherwise: see stream_format.py), dtmf, mark, stop.
Out: media in the same format (paced in real time), mark after each stretch of speech, and clear on barge-in
so the provider drops what it has buffered.

Authentication: real Twilio strips the query string from `<Stream url>` and sends no Authorization header;
it signs the upgrade request with X-Twilio-Signature (base64 HMAC-SHA1, keyed with the account's auth token,
over the URL it connected to; a GET has no parameters to append), checked when PONO_TWILIO_AUTH_TOKEN is set.
Other providers present PONO_TWILIO_TOKEN (?token=, or a Bearer header). Either one, when valid, is enough.

The provider's streamSid and callSid are checked (short, plain identifiers) and kept for logs and the
protocol: the call itself always gets Pono's own call id.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import re
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from pono.agent.personas import Persona, UnknownPersona
from pono.auth import bearer
from pono.http import ApiError
from pono.signaling.audio_out import PacedAudioTrack
from pono.signaling.phone.stream_format import StreamFormat, StreamFormatError
from pono.signaling.phone.transport import PhoneTransport
from pono.signaling.services import SIGNALING, SignalingServices

log = logging.getLogger(__name__)

_MAX_MESSAGE_BYTES = 64 * 1024
_CLOSE_BAD = 1003
_PROVIDER_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # Twilio: MZ/CA + 32 hex; other providers: similar


class MediaStream:
    def __init__(self, ws: web.WebSocketResponse, services: SignalingServices) -> None:
        self.ws = ws
        self.services = services
        self.stream_sid = ""  # the provider's ids, checked against _PROVIDER_ID
        self.call_sid = ""
        self.call_id = ""  # ours
        self.format = StreamFormat()  # until the start says otherwise
        self.out = PacedAudioTrack(rate=self.format.rate)
        self.transport: PhoneTransport | None = None
        self.marks_sent = 0
        self.marks_echoed = 0
        self._sender: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Future[None]] = set()

    async def send(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_str(json.dumps(message, separators=(",", ":")))

    async def _send_audio(self) -> None:
        """Real-time pacing here keeps the provider's buffer short, so a clear loses little and the
        played-out position we report to the call loop stays true."""
        speaking = False
        while True:
            played = self.out.played_frames
            frame = await self.out.recv()
            if self.out.played_frames == played:  # silence: nothing queued
                if speaking:
                    speaking = False
                    self.marks_sent += 1
                    await self.send({"event": "mark", "streamSid": self.stream_sid,
                                     "mark": {"name": f"utterance-{self.marks_sent}"}})
                continue
            speaking = True
            payload = base64.b64encode(self.format.encode(frame.to_ndarray())).decode()
            await self.send({"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}})

    def _clear(self) -> None:
        task = asyncio.ensure_future(self.send({"event": "clear", "streamSid": self.stream_sid}))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _close(self) -> None:
        await self.ws.close(code=1000, message=b"call ended")

    async def _start(self, message: dict[str, Any]) -> str | None:
        start = message.get("start")
        if not isinstance(start, dict) or not isinstance(start.get("streamSid") or message.get("streamSid"), str):
            return "'start' needs a streamSid"
        stream_sid, call_sid = start.get("streamSid") or message["streamSid"], start.get("callSid") or ""
        if not _PROVIDER_ID.fullmatch(stream_sid) or not (call_sid == "" or (isinstance(call_sid, str)
                                                                            and _PROVIDER_ID.fullmatch(call_sid))):
            return "streamSid and callSid must be short identifiers (letters, digits, _ . : -)"
        self.stream_sid, self.call_sid = stream_sid, call_sid
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            return "customParameters must be an object"
        try:
            self.format = StreamFormat.from_start(start.get("mediaFormat"),
                                                  self.services.settings.twilio_l16_byte_order)
        except StreamFormatError as exc:
            return str(exc)
        self.out = PacedAudioTrack(rate=self.format.rate)
        calls = self.services.calls
        try:
            persona: Persona
            if isinstance(params.get("persona"), str):
                persona = await calls.persona(params["persona"][:200])
            else:
                persona = await calls.persona_for_number(str(params.get("to") or params.get("To") or "")[:64])
        except UnknownPersona:
            return f"unknown persona {str(params.get('persona'))[:60]!r}"
        if not calls.models.loaded.is_set() or calls.full or calls.draining:
            return "the server cannot take a call now"
        caller = params.get("caller") or params.get("From") or params.get("from")
        self.transport = PhoneTransport("twilio", self.out, on_close=self._close, on_clear=self._clear)
        self.call_id = calls.new_call_id()
        log.info("media stream %s (callSid %s) is call %s", self.stream_sid, self.call_sid or "-", self.call_id)
        calls.start(self.call_id, self.transport, persona=persona, caller=str(caller)[:64] if caller else None)
        self._sender = asyncio.create_task(self._send_audio(), name=f"twilio-out-{self.stream_sid}")
        return None

    async def handle(self, raw: str) -> str | None:
        """One provider message; a reason to close the stream, or None."""
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):
            return "messages must be JSON"
        if not isinstance(message, dict):
            return "messages must be JSON objects"
        event = message.get("event")
        if event == "connected":
            return None
        if event == "start":
            return "'start' came twice" if self.transport is not None else await self._start(message)
        if self.transport is None:
            return f"{str(event)[:40]!r} before 'start'"
        if event == "media":
            try:
                payload = base64.b64decode(message["media"]["payload"], validate=True)
            except (KeyError, TypeError, binascii.Error):
                return "'media' needs a base64 payload"
            if message["media"].get("track", "inbound") == "inbound":
                try:
                    self.transport.receive_audio(self.format.decode(payload))
                except StreamFormatError as exc:
                    return str(exc)
        elif event == "dtmf":
            digit = (message.get("dtmf") or {}).get("digit")
            if isinstance(digit, str) and len(digit) == 1:
                self.transport.receive_dtmf(digit)
        elif event == "mark":
            self.marks_echoed += 1
        elif event == "stop":
            self._caller_left()
        else:
            return f"unknown event {str(event)[:40]!r}"
        return None

    def _caller_left(self) -> None:
        if self.transport is not None:
            self.transport.ended()

    async def finish(self) -> None:
        self._caller_left()
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        self.out.stop()


def signed_urls(request: web.Request, public_url: str | None) -> list[str]:
    """The URLs the provider may have signed for this request: its public URL (PONO_PUBLIC_URL as the base,
    else the scheme and host X-Forwarded-Proto / X-Forwarded-Host or the request itself give) in the ws(s)
    and http(s) spellings, each with and without the scheme's default port, as Twilio's own validator tries."""
    if public_url:
        base = urlsplit(public_url)
        scheme, host, prefix = base.scheme, base.netloc, base.path.rstrip("/")
    else:
        forwarded_proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip()
        forwarded_host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
        scheme, host, prefix = forwarded_proto or request.scheme, forwarded_host or request.host, ""
    secure = scheme in ("https", "wss")
    default_port = "443" if secure else "80"
    name, port = (host.rpartition(":")[0], host.rpartition(":")[2]) if re.search(r":\d+$", host) else (host, "")
    hosts = {host, f"{host}:{default_port}" if not port else name if port == default_port else host}
    schemes = ("wss", "https") if secure else ("ws", "http")
    return [f"{s}://{h}{prefix}{request.rel_url}" for s in schemes for h in sorted(hosts)]


def twilio_signature(auth_token: str, url: str) -> str:
    """X-Twilio-Signature for a request without POST parameters: base64(HMAC-SHA1(auth token, url))."""
    return base64.b64encode(hmac.new(auth_token.encode(), url.encode(), "sha1").digest()).decode()


def _authorised(request: web.Request, services: SignalingServices) -> None:
    settings = services.settings
    token, auth_token = settings.twilio_token, settings.twilio_auth_token
    if token is None and auth_token is None:
        raise ApiError(503, "provider media streams are not configured (PONO_TWILIO_AUTH_TOKEN or PONO_TWILIO_TOKEN)")
    signature = request.headers.get("X-Twilio-Signature", "")
    if auth_token is not None and signature:
        key = auth_token.get_secret_value()
        if any(hmac.compare_digest(signature.encode(), twilio_signature(key, url).encode())
               for url in signed_urls(request, settings.public_url)):
            return
        log.warning("media stream refused: X-Twilio-Signature does not match %s (set PONO_PUBLIC_URL?)",
                    signed_urls(request, settings.public_url)[0])
    if token is not None:
        given = request.query.get("token") or bearer(request) or ""
        if hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            return
    raise ApiError(401, "a valid X-Twilio-Signature or provider token is required")


async def twilio_stream(request: web.Request) -> web.WebSocketResponse:
    services = request.app[SIGNALING]
    _authorised(request, services)
    ws = web.WebSocketResponse(max_msg_size=_MAX_MESSAGE_BYTES, heartbeat=30.0)
    await ws.prepare(request)
    stream = MediaStream(ws, services)
    try:
        async for msg in ws:
            reason = await stream.handle(msg.data) if msg.type is WSMsgType.TEXT else (
                "binary frames are not part of the protocol" if msg.type is WSMsgType.BINARY else None)
            if reason is not None:
                log.info("media stream %s closed: %s", stream.stream_sid or "(no start)", reason)
                await ws.close(code=_CLOSE_BAD, message=reason.encode()[:120])
                break
    finally:
        await stream.finish()
    return ws


def routes() -> list[web.RouteDef]:
    return [web.get("/api/phone/twilio", twilio_stream)]
