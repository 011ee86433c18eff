"""Speech models on a GPU, checked on the CPU twin: the CUDA library preload, TTS providers, model folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pono.settings import Settings
from pono.voice import cuda_libs
from pono.voice.tts import CPU, CUDA, HibariTTS, open_session, tts_providers

SENTENCE = "Your table for two is booked for seven tonight."


def test_cuda_preload_is_a_no_op_without_the_nvidia_packages() -> None:
    assert cuda_libs.nvidia_roots() == []
    assert cuda_libs.preload_cuda_libraries() == []
    assert cuda_libs.preload_cuda_libraries() == []  # and again: loaded once, answered from then on


def test_cuda_preload_picks_each_soname_once_dependencies_first(tmp_path: Path) -> None:
    for package, name in [("cudnn", "libcudnn.so.9"), ("cudnn", "libcudnn_ops.so.9"), ("cublas", "libcublas.so.12"),
                          ("cublas", "libcublasLt.so.12"), ("cuda_runtime", "libcudart.so.12")]:
        (tmp_path / package / "lib").mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "lib" / name).touch()
    found = [p.name for p in cuda_libs._candidates([tmp_path])]
    assert found == ["libcudart.so.12", "libcublasLt.so.12", "libcublas.so.12", "libcudnn.so.9"]


def test_tts_providers_follow_the_device() -> None:
    assert tts_providers("cpu") == [CPU]
    assert tts_providers("auto") == [CPU]  # this onnxruntime has no CUDA provider
    with pytest.raises(RuntimeError, match=r"PONO_TTS_DEVICE=cuda.*no CUDAExecutionProvider.*pono\[gpu\]"):
        tts_providers("cuda")
    with pytest.raises(ValueError, match="expected 'auto', 'cpu' or 'cuda'"):
        tts_providers("gpu")


def test_tts_providers_put_cuda_first_when_onnxruntime_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    assert tts_providers("auto") == tts_providers("cuda") == [CUDA, CPU]
    assert tts_providers("cpu") == [CPU]


def test_requesting_cuda_tts_without_a_cuda_provider_fails_loudly() -> None:
    with pytest.raises(RuntimeError, match="PONO_TTS_DEVICE=cuda"):
        HibariTTS(device="cuda")


def test_hibari_on_a_session_opened_here_speaks_as_before() -> None:
    """The GPU path swaps hibari's session for one opened here: on the CPU provider, the audio is identical."""
    from hibari import Hibari

    before = Hibari()(SENTENCE, seed=7)
    tts = HibariTTS(device="cpu")
    assert tts.device == "cpu" and tts.engine.sess.get_providers() == [CPU]
    assert np.array_equal(tts.engine(SENTENCE, seed=7), before)
    tts.engine.sess = open_session(tts.engine.model_path, tts_providers("auto"))
    after = tts.engine(SENTENCE, seed=7)
    assert after.size > 0.5 * 24000 and np.array_equal(after, before)
    assert sum(c.size for c in tts.synthesize(SENTENCE)) > 0.5 * tts.sample_rate


def test_models_dir_follows_the_data_dir_unless_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PONO_MODELS_DIR", raising=False)
    assert Settings(data_dir=tmp_path).models_dir == tmp_path / "models"
    monkeypatch.setenv("PONO_MODELS_DIR", str(tmp_path / "big"))
    monkeypatch.setenv("PONO_TTS_DEVICE", "cpu")
    settings = Settings(data_dir=tmp_path / "data")
    assert settings.models_dir == tmp_path / "big" and settings.tts_device == "cpu"
