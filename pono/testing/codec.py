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
from pono.signaling.webrtc import VoiceChannel

RATE_IN = 16_000
WIRE_RATE = 48_000
WIRE_FRAME = WIRE_RATE // 50  # 20 ms, the caller's frame and Opus's packet


def opus_round_trip(pcm16k: np.ndarray, *, lead_s: float = 0.3, tail_s: float = 0.5) -> np.ndarray:
    """`pcm16k` (1-D int16 at 16 kHz) after the caller → server Opus path, as 16 kHz int16.

    `lead_s` of silence goes through the codec first and is kept, as the microphone sends silence before
    the caller speaks and the call keeps about 300 ms of pre-roll before speech; `tail_s` of silence
    follows, which flushes the encoder's look-ahead (a call's hangover sends at least that much). The result
    is about `lead_s + len + tail_s` long; the codec delays it by a few milliseconds.
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
    for i, samples in enumerate(wire.reshape(-1, WIRE_FRAME)):
        frame = int16_frame(samples, WIRE_RATE)
        frame.pts = i * WIRE_FRAME
        frame.time_base = fractions.Fraction(1, WIRE_RATE)
        payloads, timestamp = encoder.encode(frame)
        for payload in payloads:
            for decoded in decoder.decode(JitterFrame(payload, timestamp)):
                out.append(to_16k(voice(decoded).astype(np.int16, copy=False), decoded.sample_rate))
    return np.concatenate(out) if out else np.zeros(0, np.int16)
