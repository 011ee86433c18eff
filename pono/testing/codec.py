"""The Opus round trip a WebRTC call puts the caller's audio through, done offline on a whole clip.

What the live pipeline hears of a clip is never the clean WAV: the caller resamples it to 48 kHz
(`pono.testing.caller.Caller.speak`), aiortc's `OpusEncoder` encodes 20 ms frames (stereo, 96 kbit/s,
"voip"), aiortc's `OpusDecoder` decodes them on the server, and the transport keeps the voice channel and
resamples to 16 kHz (`pono.signaling.webrtc.read_frames`). `opus_round_trip` does the same, with the same
classes, so the live transcript of a turn can be compared with an offline transcript of the same audio
(../shared/MODELS.md, "Speech through the codec").
"""

from __future__ import annotations

import fractions

import numpy as np
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame

from pono.signaling.audio_out import Resampler, int16_frame
from pono.signaling.opus_packets import lost_packet
from pono.signaling.webrtc import VoiceChannel

RATE_IN = 16_000
WIRE_RATE = 48_000
WIRE_FRAME = WIRE_RATE // 50  # 20 ms, the caller's frame and Opus's packet


_SPEECH_PAYLOAD_BYTES = 50  # aiortc's encoder packs 20 ms of digital silence in a few bytes, of speech in over 100


class SpeechPacketLoss:
    """Loses every `every`-th Opus packet, the first at `phase` packets after the first that carries speech; none
    before it. Counting from the speech, not from the call's first packet, puts the losses at the same places in
    the words wherever the caller starts talking: where a 20 ms loss falls decides what Whisper hears (base heard
    "Please book a table for 2 at 7 to 8" as "... too much time to hide" at 8 of 20 phases of 1-in-20 loss).
    Feed it every packet's payload in order, live or offline (`opus_round_trip(loss=...)`)."""

    def __init__(self, every: int, phase: int = 0) -> None:
        if every < 2 or not 0 <= phase < every:
            raise ValueError("every >= 2 and 0 <= phase < every")
        self.every, self.phase = every, phase
        self._since_speech: int | None = None
        self.lost = 0

    def loses(self, payload: bytes) -> bool:
        """Whether the packet with this payload is lost (counted in `lost`)."""
        if self._since_speech is None:
            if len(payload) <= _SPEECH_PAYLOAD_BYTES:
                return False
            self._since_speech = 0
        else:
            self._since_speech += 1
        if self._since_speech % self.every != self.phase:
            return False
        self.lost += 1
        return True


def opus_round_trip(pcm16k: np.ndarray, *, lead_s: float = 0.3, tail_s: float = 0.5,
                    loss: SpeechPacketLoss | None = None) -> np.ndarray:
    """`pcm16k` (1-D int16 at 16 kHz) after the caller → server Opus path, as 16 kHz int16.

    `lead_s` of silence goes through the codec first and is kept, as the microphone sends silence before
    the caller speaks and the call keeps about 300 ms of pre-roll before speech; `tail_s` of silence
    follows, which flushes the encoder's look-ahead (a call's hangover sends at least that much). The result
    is about `lead_s + len + tail_s` long; the codec delays it by a few milliseconds. With `loss`, the packets it
    loses are concealed as Pono's receive buffer conceals them (`opus_packets.lost_packet`, libopus' PLC).
    """
    if pcm16k.dtype != np.int16 or pcm16k.ndim != 1:
        raise ValueError("expected 1-D int16 audio at 16 kHz")
    lead = np.zeros(round(lead_s * WIRE_RATE), np.int16)
    tail = np.zeros(round(tail_s * WIRE_RATE), np.int16)
    wire = np.concatenate([lead, Resampler(WIRE_RATE)(pcm16k, RATE_IN), tail])
    wire = np.concatenate([wire, np.zeros((-wire.size) % WIRE_FRAME, np.int16)])
    encoder, decoder = OpusEncoder(), OpusDecoder()
    voice, to_16k = VoiceChannel(), Resampler(RATE_IN)
    out: list[np.ndarray] = []
    previous: bytes | None = None
    for i, samples in enumerate(wire.reshape(-1, WIRE_FRAME)):
        frame = int16_frame(samples, WIRE_RATE)
        frame.pts = i * WIRE_FRAME
        frame.time_base = fractions.Fraction(1, WIRE_RATE)
        payloads, timestamp = encoder.encode(frame)
        for payload in payloads:
            if loss is not None and loss.loses(payload) and previous is not None:
                payload = lost_packet(previous)
            else:
                previous = payload
            for decoded in decoder.decode(JitterFrame(payload, timestamp)):
                out.append(to_16k(voice(decoded).astype(np.int16, copy=False), decoded.sample_rate))
    return np.concatenate(out) if out else np.zeros(0, np.int16)
