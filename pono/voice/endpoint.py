"""End of turn from the audio itself: Smart Turn v3.2, an ONNX model run by onnxruntime (no torch).

The model is Pipecat's smart-turn v3.2 (Daily, BSD-2-Clause; THIRD_PARTY_NOTICES.md), the int8 file
`pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx` inside the `pipecat-ai` 1.14.0 wheel, which
scripts/install.sh installs `--no-deps`. Pono imports nothing from Pipecat: it only reads that file.

Given the last 8 s of a caller's turn, it says how likely the caller has finished speaking (> 0.5: complete),
from prosody and the words' shape, so a thinking pause need not end a turn and a finished question need not
wait out a long silence. Features take a few ms, inference tens of ms on one CPU thread: run both off the
event loop.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    from faster_whisper.feature_extractor import FeatureExtractor

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 8 * SAMPLE_RATE  # the model sees the last 8 s of the turn: 128,000 samples
N_MELS = 80
N_FRAMES = 800  # 10 ms frames (hop 160) over the 8 s window
COMPLETE_THRESHOLD = 0.5  # the model's own decision boundary: above it, the turn is complete
_NORM_EPS = 1e-7  # the variance floor of transformers' WhisperFeatureExtractor, which the model was trained with
_INSTALL = "pip install --no-deps pipecat-ai==1.14.0 (scripts/install.sh does)"


def smart_turn_model_path() -> Path:
    """The Smart Turn v3.2 ONNX file inside the installed `pipecat-ai` wheel.

    Raises RuntimeError, naming the install command, when the wheel or the file is missing.
    """
    # find_spec locates the package without running its __init__, which imports Pipecat's dependencies
    # (loguru, numba...), none of them installed.
    spec = importlib.util.find_spec("pipecat")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the end-of-turn model needs pipecat-ai: {_INSTALL}")
    path = Path(spec.origin).parent / "audio" / "turn" / "smart_turn" / "data" / "smart-turn-v3.2-cpu.onnx"
    if not path.exists():
        raise RuntimeError(f"pipecat-ai has no Smart Turn v3.2 model at {path}: {_INSTALL}")
    return path


@functools.cache
def _whisper_extractor() -> FeatureExtractor:
    # Imported here, not at module load: faster_whisper's __init__ loads CTranslate2 and PyAV (about 0.2 s).
    from faster_whisper.feature_extractor import FeatureExtractor

    return FeatureExtractor(feature_size=N_MELS, sampling_rate=SAMPLE_RATE, hop_length=160, n_fft=400)


def smart_turn_window(pcm16: np.ndarray) -> np.ndarray:
    """The model's input waveform: the last 8 s of `pcm16`, left-padded with zeros to 128,000 samples.

    `pcm16`: 1-D int16 mono audio at 16 kHz, any length (empty included). Returns float32 [128000] in
    [-1, 1), normalised to zero mean and unit variance (variance floored at 1e-7, so silence stays zeros).
    Raises TypeError for another dtype and ValueError for another shape.
    """
    if not isinstance(pcm16, np.ndarray) or pcm16.dtype != np.int16:
        raise TypeError(f"expected an int16 numpy array, got {getattr(pcm16, 'dtype', type(pcm16))}")
    if pcm16.ndim != 1:
        raise ValueError(f"expected 1-D mono audio, got shape {pcm16.shape}")
    x = np.zeros(WINDOW_SAMPLES, np.float32)
    tail = pcm16[-WINDOW_SAMPLES:]
    if tail.size:
        x[WINDOW_SAMPLES - tail.size:] = tail.astype(np.float32) / 32768.0
    return (x - x.mean()) / np.sqrt(x.var() + _NORM_EPS)


def smart_turn_features(pcm16: np.ndarray) -> np.ndarray:
    """Smart Turn v3.2's input features for a turn: float32 [80, 800] (mel band, 10 ms frame), in about [-1.5, 2].

    `pcm16`: 1-D int16 mono audio at 16 kHz, any length; only the last 8 s count (see smart_turn_window).

    The recipe is Whisper's log-mel over the 8 s window: 400-point periodic Hann window, hop 160 (10 ms),
    centred frames (reflect-padded), power spectrum, 80 Slaney-normalised Slaney-scale mel bands over
    0-8 kHz, log10 with a 1e-10 floor, the last frame dropped, clamped to max - 8, then (x + 4) / 4.
    faster-whisper's FeatureExtractor (already Pono's STT dependency) computes exactly that in float32; it is
    reused here rather than hand-rolled (this module only normalises the window and asks it for no extra
    padding). Its output equals Pipecat's float64 reference (pipecat/audio/turn/smart_turn/_whisper_features.py)
    to float32 rounding (largest difference about 1e-5), and so does the model's probability to 1e-4;
    tests/test_end_of_turn.py checks both.

    Blocking (a few ms): call it from a worker thread. Thread-safe. Raises TypeError / ValueError as
    smart_turn_window does.
    """
    features = _whisper_extractor()(smart_turn_window(pcm16), padding=0)
    return np.ascontiguousarray(features, dtype=np.float32)


class SmartTurn:
    """Smart Turn v3.2 loaded once per process; share one instance between calls.

    `path` defaults to smart_turn_model_path() (RuntimeError when pipecat-ai is not installed). The session
    runs on the CPU provider with one intra-op thread: the model is small and batching doesn't help on CPU.
    onnxruntime's run() and the feature extraction keep no per-call state, so probability() is thread-safe.
    """

    def __init__(self, path: Path | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.path = path or smart_turn_model_path()
        self.session = ort.InferenceSession(
            str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input = self.session.get_inputs()[0].name  # "input_features": float32 [batch, 80, 800]

    def infer(self, features: np.ndarray) -> float:
        """The model's probability for features from smart_turn_features (float32 [80, 800])."""
        if features.shape != (N_MELS, N_FRAMES):
            raise ValueError(f"expected features of shape {(N_MELS, N_FRAMES)}, got {features.shape}")
        batch = np.ascontiguousarray(features, dtype=np.float32)[None]
        # Output "logits" is float32 [batch, 1], already a sigmoid probability despite its name.
        (out,) = self.session.run(None, {self._input: batch})
        return float(np.clip(out.reshape(-1)[0], 0.0, 1.0))

    def probability(self, pcm16: np.ndarray) -> float:
        """How likely the turn in `pcm16` is complete, in [0, 1]; > COMPLETE_THRESHOLD (0.5) means complete.

        `pcm16`: the turn so far, 1-D int16 mono at 16 kHz, any length; the model sees its last 8 s, so pass
        the whole turn (or at least its last 8 s), ending where the caller fell silent.

        Blocking (features a few ms, inference tens of ms on one thread): call from a worker thread, never
        on the event loop. Thread-safe. Raises TypeError / ValueError for audio that is not 1-D int16.
        """
        return self.infer(smart_turn_features(pcm16))
