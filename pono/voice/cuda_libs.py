"""Make the pip-installed NVIDIA libraries (`pip install 'pono[gpu]'`) findable before a model goes on CUDA.

The `nvidia-*-cu12` wheels put their shared libraries in `site-packages/nvidia/<name>/lib/`, which is on no
loader path: CTranslate2 (faster-whisper) dlopens `libcublas.so.12` by its bare name and fails, and
onnxruntime's CUDA provider does the same for cuDNN. Loading them once with RTLD_GLOBAL, in dependency order,
puts them in the process, so a later dlopen of the same soname finds the loaded copy. Without the `nvidia`
packages (a CPU install, or CUDA from the system's own libraries) this does nothing.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# (package folder under nvidia/, soname pattern), dependencies first: cuBLAS needs cuBLASLt, which needs
# the CUDA runtime; cuDNN's front library loads its sub-libraries from its own folder.
_LIBRARIES = (
    ("cuda_runtime", "libcudart.so.*[0-9]"),
    ("cuda_nvrtc", "libnvrtc.so.*[0-9]"),
    ("cublas", "libcublasLt.so.*[0-9]"),
    ("cublas", "libcublas.so.*[0-9]"),
    ("cufft", "libcufft.so.*[0-9]"),
    ("curand", "libcurand.so.*[0-9]"),
    ("cudnn", "libcudnn.so.*[0-9]"),
)

_lock = threading.Lock()
_loaded: list[str] | None = None


def nvidia_roots() -> list[Path]:
    """The folders of the `nvidia` namespace package (one per site-packages that has it); [] when absent."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def _candidates(roots: list[Path]) -> list[Path]:
    found: list[Path] = []
    for package, pattern in _LIBRARIES:
        for root in roots:
            # The shortest name is the soname itself (libcublas.so.12), not a fully versioned file.
            matches = sorted((root / package / "lib").glob(pattern), key=lambda p: (len(p.name), p.name))
            if matches:
                found.append(matches[0])
                break
    return found


def preload_cuda_libraries() -> list[str]:
    """Load the pip-installed CUDA runtime, cuBLAS and cuDNN (RTLD_GLOBAL) once; the paths loaded.

    Returns [] when no `nvidia` package is installed. A library that fails to load is logged and skipped:
    the model's own load then reports what is missing. Safe to call from several threads and many times.
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return list(_loaded)
        loaded: list[str] = []
        for path in _candidates(nvidia_roots()):
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:
                log.warning("could not preload %s: %s", path.name, exc)
                continue
            loaded.append(str(path))
        if loaded:
            log.info("preloaded CUDA libraries: %s", ", ".join(Path(p).name for p in loaded))
        _loaded = loaded
        return list(loaded)
