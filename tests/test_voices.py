"""Persona voices load in threads of their own: a slow voice never holds up anyone's speech."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from pono.settings import Settings
from pono.voice.models import SpeechModels
from pono.voice.voices import VoiceLibrary


class ToneEngine:
    """A TTS engine whose every sentence is one chunk of a constant sample: which engine spoke is visible."""

    def __init__(self, level: int, sample_rate: int = 24000) -> None:
        self.level = level
        self.sample_rate = sample_rate

    def synthesize(self, text: str) -> list[np.ndarray]:
        return [np.full(240, self.level, np.int16)]


def spoken_by(chunks: list[np.ndarray]) -> int:
    return int(chunks[0][0])


async def test_a_voice_that_is_loading_does_not_delay_another_calls_speech(tmp_path: Path) -> None:
    release, started = threading.Event(), threading.Event()

    def slow_loader(voice: str) -> ToneEngine:
        started.set()
        release.wait(120)  # a download that takes as long as the test wants
        return ToneEngine(2)

    models = SpeechModels(Settings(data_dir=tmp_path))
    models.tts = ToneEngine(1)
    models.voices = VoiceLibrary(slow_loader)
    try:
        # Call A's persona speaks with a voice that is not here: its first sentence comes in the default voice.
        assert spoken_by(await models.run_tts("Hello there.", "emma")) == 1
        # Call B (default voice) is served by the same TTS thread while A's voice is still loading.
        assert spoken_by(await models.run_tts("How can I help?", None)) == 1
        assert started.is_set() and models.voices.state("emma") == "loading"
        assert spoken_by(await models.run_tts("Still loading.", "emma")) == 1  # no second load, no wait
        release.set()
        assert await asyncio.to_thread(models.voices.wait, "emma", 60)
        # Later sentences of A switch to its voice; B keeps the default.
        assert spoken_by(await models.run_tts("Now in my own voice.", "emma")) == 2
        assert spoken_by(await models.run_tts("And you in yours.", None)) == 1
    finally:
        release.set()
        models.close()


def test_concurrent_requests_share_one_load() -> None:
    release = threading.Event()
    loads: list[str] = []

    def loader(voice: str) -> ToneEngine:
        loads.append(voice)
        release.wait(120)
        return ToneEngine(3)

    library, default = VoiceLibrary(loader), ToneEngine(1)
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(library.engine("emma", default).level))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers == [1] * 8 and loads == ["emma"]
    release.set()
    assert library.wait("emma", 60)
    assert library.engine("emma", default).level == 3 and loads == ["emma"]


def test_a_voice_that_fails_keeps_the_default_voice_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    loads: list[str] = []

    def offline(voice: str) -> ToneEngine:
        loads.append(voice)
        raise RuntimeError("hibari: could not download emma.onnx")

    library, default = VoiceLibrary(offline, retry_after_s=600, clock=lambda: now[0]), ToneEngine(1)
    with caplog.at_level(logging.ERROR, logger="pono.voice.voices"):
        assert library.engine("emma", default) is default
        assert library.wait("emma", 60) and library.state("emma") == "failed"
        for _ in range(5):
            assert library.engine("emma", default) is default
        assert loads == ["emma"]
        assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
        now[0] = 601.0  # after retry_after_s, one new try
        assert library.engine("emma", default) is default
        assert library.wait("emma", 60) and loads == ["emma", "emma"]


def test_a_voice_with_another_sample_rate_is_refused() -> None:
    library, default = VoiceLibrary(lambda voice: ToneEngine(2, sample_rate=22050)), ToneEngine(1)
    assert library.engine("joe", default) is default
    assert library.wait("joe", 60) and library.state("joe") == "failed"
    assert library.engine("joe", default) is default


def test_voices_beyond_the_limit_speak_with_the_default_voice() -> None:
    library, default = VoiceLibrary(lambda voice: ToneEngine(2), max_voices=2), ToneEngine(1)
    for voice in ("a", "b"):
        library.engine(voice, default)
        assert library.wait(voice, 60)
    assert library.engine("c", default) is default and library.state("c") == "absent"
    assert library.engine("a", default).level == 2


def test_voices_that_failed_do_not_keep_their_places() -> None:
    """Names that cannot be loaded (a typo, a voice that does not exist) must not use up the library for good."""
    def loader(voice: str) -> ToneEngine:
        if voice.startswith("missing"):
            raise ValueError("hibari: unknown voice")
        return ToneEngine(2)

    library, default = VoiceLibrary(loader, max_voices=2), ToneEngine(1)
    for voice in ("missing-1", "missing-2"):
        library.engine(voice, default)
        assert library.wait(voice, 60) and library.state(voice) == "failed"
    library.engine("emma", default)
    assert library.wait("emma", 60) and library.engine("emma", default).level == 2
