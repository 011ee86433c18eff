"""The speech worker's wire format, shared by `pono speech-worker` (server.py) and the app (client.py).

Every route but `/health` and `/ready` wants `Authorization: Bearer <PONO_SPEECH_WORKER_TOKEN>`; a wrong or
missing token gets 401 (before a WebSocket upgrade).

`GET /v1/stt` (WebSocket): one stream of streaming recognition, usually one per call.
  client → worker, text messages (JSON objects; numbers, booleans and ids each of their own JSON type):
    {"type": "start", "language": "en", "partial_interval_s": 1.0}   first, once; 0 s: no partials
    {"type": "final", "id": N}          transcribe the utterance so far (the audio sent before this message);
                                        at most MAX_FINALS_IN_FLIGHT unanswered per stream, more get an error
    {"type": "reset"}                   a new utterance begins: the audio and words of the last are dropped
    {"type": "partials", "enabled": b}  partial transcripts wanted now or not (default: wanted)
  client → worker, binary messages: 16 kHz mono int16 little-endian PCM of the current utterance, any length
    up to MAX_MESSAGE_BYTES (an even number of bytes); the app sends pieces of at most AUDIO_PIECE_BYTES.
  worker → client (JSON):
    {"type": "partial", "text": "...", "utterance": k}  the utterance so far (k counts the resets seen)
    {"type": "final", "id": N, "text": "..."}            the answer to final N
    {"type": "error", "message": "...", "id": N?}        a bad message (the stream goes on), or final N failed
    {"type": "draining"}                                 the worker is stopping: move at the next utterance
  Before the upgrade: 401 (token), 426 (a plain GET without the upgrade), 503 (models still loading, or
  draining).
`POST /v1/tts` {"text": "...", "voice": "..." | null} → 200, chunked `application/octet-stream` of 16-bit mono
  little-endian PCM at `X-Sample-Rate` Hz, one HTTP chunk per sentence, each sent as soon as it is
  synthesized; 422 bad body (text over MAX_TTS_CHARS, a voice name not matching VOICE_PATTERN or not one
  this worker's TTS has), 503 not ready.
`GET /health` → 200 {"status": "alive"}. `GET /ready` → 200 {"status": "ready", "streams": n,
  "queue_depth": m, "tts_sample_rate": hz} once the models are loaded, else 503 {"status": "loading"|"draining"}.
`GET /metrics` → Prometheus text (pono_worker_*).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

STT_PATH = "/v1/stt"
TTS_PATH = "/v1/tts"
SAMPLE_RATE = 16_000
MAX_MESSAGE_BYTES = 1 << 20  # the largest WebSocket message the worker takes (this size included): about 32 s
AUDIO_PIECE_BYTES = 256 * 1024  # what the app sends at most per message, well under MAX_MESSAGE_BYTES
MAX_UTTERANCE_S = 300.0  # audio of one utterance the worker keeps; the app cuts turns well before this
MAX_FINALS_IN_FLIGHT = 4  # unanswered finals per stream (a call's pauses, its end and a barge-in may overlap)
MAX_TTS_CHARS = 2000  # one TTS request (the app asks sentence by sentence)
VOICE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"  # a voice's name: no path, no leading dot
MAX_TTS_BODY = 64 * 1024
SAMPLE_RATE_HEADER = "X-Sample-Rate"


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)  # "1" is no number, 1 no boolean


class Start(_Message):
    type: Literal["start"]
    language: str = Field(default="en", min_length=2, max_length=16)
    partial_interval_s: float = Field(default=1.0, ge=0.0, le=30.0)


class Final(_Message):
    type: Literal["final"]
    id: int = Field(ge=0, lt=2**53)


class Reset(_Message):
    type: Literal["reset"]


class Partials(_Message):
    type: Literal["partials"]
    enabled: bool


ClientMessage = Start | Final | Reset | Partials
_CLIENT = TypeAdapter[ClientMessage](Annotated[ClientMessage, Field(discriminator="type")])


class ProtocolError(ValueError):
    """A client message that is not JSON, not an object, of an unknown type, or with bad fields."""


def parse_client(text: str) -> ClientMessage:
    """One text message from the client. Raises ProtocolError with a message fit to send back."""
    try:
        raw: Any = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("messages must be JSON objects") from None
    if not isinstance(raw, dict):
        raise ProtocolError("messages must be JSON objects")
    if raw.get("type") not in ("start", "final", "reset", "partials"):
        raise ProtocolError(f"unknown message type {str(raw.get('type'))[:40]!r}")
    try:
        return _CLIENT.validate_python(raw)
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"][1:])) or "message" for e in exc.errors())
        raise ProtocolError(f"bad {raw['type']} message: {fields}") from None


class TtsRequest(BaseModel):
    """The body of POST /v1/tts."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=MAX_TTS_CHARS)
    voice: str | None = Field(default=None, pattern=VOICE_PATTERN)


def message(kind: str, **fields: Any) -> dict[str, Any]:
    """A worker → client message: {"type": kind, **fields}."""
    return {"type": kind, **fields}
