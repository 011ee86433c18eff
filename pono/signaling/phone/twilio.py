"""Twilio Media Streams (and compatible providers) over a websocket: `GET /api/phone/twilio`.

In: connected, start (persona and caller in customParameters), media (base64 μ-law 8 kHz), dtmf, mark, stop.
Out: media (paced in real time), mark after each stretch of speech, and clear on barge-in so the provider
drops what it has buffered. The provider authenticates with PONO_TWILIO_TOKEN (?token=, or a Bearer header).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
from typing import Any

from aiohttp import WSMsgType, web

from pono.agent.personas import Persona, UnknownPersona
from pono.auth import bearer
from pono.context import SERVICES, Services
from pono.http import ApiError
from pono.signaling.audio_out import PacedAudioTrack
from pono.signaling.phone import g711
from pono.signaling.phone.transport import PhoneTransport

log = logging.getLogger(__name__)

_MAX_MESSAGE_BYTES = 64 * 1024
_CLOSE_BAD = 1003


class MediaStream:
    def __init__(self, ws: web.WebSocketResponse, services: Services) -> None:
        self.ws = ws
        self.services = services
        self.stream_sid = ""
        self.out = PacedAudioTrack(rate=8000)
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
            payload = base64.b64encode(g711.encode(frame.to_ndarray().reshape(-1), "PCMU")).decode()
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
        self.stream_sid = start.get("streamSid") or message["streamSid"]
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            return "customParameters must be an object"
        calls = self.services.calls
        try:
            persona: Persona
            if isinstance(params.get("persona"), str):
                persona = await calls.persona(params["persona"][:200])
            else:
                persona = await calls.persona_for_number(str(params.get("to") or params.get("To") or ""))
        except UnknownPersona:
            return f"unknown persona {str(params.get('persona'))[:60]!r}"
        if not calls.models.loaded.is_set() or calls.full or calls.draining:
            return "the server cannot take a call now"
        caller = params.get("caller") or params.get("From") or params.get("from")
        self.transport = PhoneTransport("twilio", self.out, on_close=self._close, on_clear=self._clear)
        calls.start(calls.new_call_id(), self.transport, persona=persona,
                    caller=str(caller)[:64] if caller else None)
        self._sender = asyncio.create_task(self._send_audio(), name=f"twilio-out-{self.stream_sid}")
        return None

    async def handle(self, raw: str) -> str | None:
        """One provider message; a reason to close the stream, or None."""
        try:
            message = json.loads(raw)
        except ValueError:
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
                self.transport.receive_audio(g711.decode(payload, "PCMU"))
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


def _authorised(request: web.Request, services: Services) -> None:
    expected = services.settings.twilio_token
    if expected is None:
        raise ApiError(503, "provider media streams are not configured (PONO_TWILIO_TOKEN)")
    given = request.query.get("token") or bearer(request) or ""
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise ApiError(401, "a valid provider token is required (?token= or Authorization: Bearer)")


async def twilio_stream(request: web.Request) -> web.WebSocketResponse:
    services = request.app[SERVICES]
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
