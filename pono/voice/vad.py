"""Silero VAD: the ONNX file from the silero-vad wheel, run by onnxruntime (no torch).

One InferenceSession per process (run() is thread-safe); each call keeps its own recurrent state.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort

CHUNK = 512  # samples at 16 kHz (32 ms): the window Silero v5+ is trained on
_CONTEXT = 64


def silero_model_path() -> Path:
    # find_spec locates the file without running the package __init__, which imports torch.
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise RuntimeError("silero-vad is not installed: pip install --no-deps silero-vad==6.2.3")
    path = Path(spec.origin).parent / "data" / "silero_vad.onnx"
    if not path.exists():
        raise RuntimeError(f"silero-vad wheel has no ONNX model at {path}")
    return path


class SileroVAD:
    def __init__(self, path: Path | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(path or silero_model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._sr = np.array(16000, dtype=np.int64)

    def stream(self) -> VADStream:
        return VADStream(self)

    def run(self, window: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        prob, new_state = self.session.run(None, {"input": window, "state": state, "sr": self._sr})
        return float(prob.reshape(-1)[0]), new_state


class VADStream:
    """Per-call VAD state: feed 16 kHz int16 audio of any length, get one probability per 32 ms chunk."""

    def __init__(self, vad: SileroVAD) -> None:
        self.vad = vad
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros(_CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)

    def process(self, pcm16: np.ndarray) -> list[float]:
        """Blocking (about 0.1 ms per chunk): call it from a worker thread."""
        samples = np.concatenate([self._pending, pcm16.astype(np.float32) / 32768.0])
        probs: list[float] = []
        n = samples.size // CHUNK
        for i in range(n):
            chunk = samples[i * CHUNK:(i + 1) * CHUNK]
            window = np.concatenate([self._context, chunk]).reshape(1, -1)
            prob, self._state = self.vad.run(window, self._state)
            self._context = chunk[-_CONTEXT:]
            probs.append(prob)
        self._pending = samples[n * CHUNK:]
        return probs
