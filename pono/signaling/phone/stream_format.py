"""The audio format of a Twilio-style media stream, from its `start` message's `mediaFormat`.

Twilio itself documents one format: `{"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}` (and
streamdouble, the simulator, sends only that). Compatible providers (Plivo, Vobiz, Exotel…) also stream linear
PCM as `audio/x-l16` at 8 or 16 kHz. What comes in is decoded as the `start` says, and what goes out is encoded
the same way, so a stream is never misheard as μ-law. A format we cannot handle closes the stream with the
reason (StreamFormatError).

L16 is 16-bit signed linear PCM in network byte order, big-endian (RFC 3551 §4.5.11, the audio/L16 media type
of RFC 2586); several providers send it little-endian instead, hence PONO_TWILIO_L16_BYTE_ORDER. Stereo
(`channels` 2) is interleaved: it is mixed down coming in and duplicated going out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pono.signaling.phone import g711

# Encoding names (lower case, parameters stripped) → our codec names.
_ENCODINGS = {"audio/x-mulaw": "PCMU", "audio/mulaw": "PCMU", "audio/pcmu": "PCMU", "audio/basic": "PCMU",
              "audio/x-alaw": "PCMA", "audio/alaw": "PCMA", "audio/pcma": "PCMA",
              "audio/x-l16": "L16", "audio/l16": "L16"}
L16_RATES = (8000, 16000, 24000, 32000, 44100, 48000)
_SUPPORTED = "mulaw/alaw 8 kHz or L16 8-48 kHz, mono or stereo"


class StreamFormatError(ValueError):
    """A mediaFormat or a payload we cannot handle; the message is the websocket close reason (keep it short)."""


@dataclass(frozen=True)
class StreamFormat:
    """`codec`: PCMU, PCMA or L16; `rate`: samples per second; `channels`: 1 or 2; `byte_order`: of L16."""

    codec: str = "PCMU"
    rate: int = 8000
    channels: int = 1
    byte_order: str = "big"

    @classmethod
    def from_start(cls, media_format: object, l16_byte_order: str = "big") -> StreamFormat:
        """From `start.mediaFormat` ({"encoding", "sampleRate", "channels"}; parameters such as
        "audio/x-l16;rate=16000" are read too). Absent: μ-law 8 kHz mono, Twilio's only format.
        Raises StreamFormatError naming what is not supported."""
        if media_format is None:
            return cls()
        if not isinstance(media_format, dict):
            raise StreamFormatError("mediaFormat must be an object")
        encoding = str(media_format.get("encoding") or "audio/x-mulaw")[:40]
        name, *params = [p.strip() for p in encoding.lower().split(";")]
        named = dict(p.partition("=")[::2] for p in params)
        codec = _ENCODINGS.get(name)
        rate, channels = media_format.get("sampleRate", named.get("rate", 8000)), media_format.get("channels", 1)
        try:
            rate, channels = int(rate), int(channels)
        except (TypeError, ValueError, OverflowError):  # JSON lets through Infinity and NaN
            raise StreamFormatError("mediaFormat sampleRate and channels must be numbers") from None
        if codec is None or channels not in (1, 2) or rate not in (L16_RATES if codec == "L16" else (8000,)):
            raise StreamFormatError(f"mediaFormat {name} {rate} Hz x{channels} is not supported ({_SUPPORTED})")
        return cls(codec, rate, channels, l16_byte_order if codec == "L16" else "big")

    @property
    def _dtype(self) -> str:
        return (">" if self.byte_order == "big" else "<") + "i2"

    def decode(self, payload: bytes) -> np.ndarray:
        """A media payload → int16 mono PCM at `rate`, shape (samples,). Raises StreamFormatError when it is not
        whole samples (of every channel)."""
        width = (2 if self.codec == "L16" else 1) * self.channels
        if len(payload) % width:
            raise StreamFormatError(f"{self.codec} media of {len(payload)} bytes is not whole {width}-byte frames")
        pcm = np.frombuffer(payload, self._dtype).astype(np.int16) if self.codec == "L16" \
            else g711.decode(payload, self.codec)
        if self.channels == 2:
            pcm = pcm.reshape(-1, 2).mean(axis=1).astype(np.int16)
        return pcm

    def encode(self, pcm: np.ndarray) -> bytes:
        """int16 mono PCM at `rate` (any shape, flattened) → a media payload in this format."""
        pcm = pcm.reshape(-1)
        if self.channels == 2:
            pcm = np.repeat(pcm, 2)
        return pcm.astype(self._dtype).tobytes() if self.codec == "L16" else g711.encode(pcm, self.codec)
