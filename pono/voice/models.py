"""The speech models of one process: loaded once, warmed at start-up, run in worker threads.

With PONO_SPEECH_WORKER_URL set, STT and TTS go to the speech workers (pono.voice.worker) and the models here
are the fallback (PONO_SPEECH_FALLBACK=local, loaded too) or absent ("none"); the VAD always runs here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from pono.settings import Settings
from pono.voice.endpoint import SmartTurn
from pono.voice.speech.engine import BatchStats, TranscriptionEngine, default_max_batch
from pono.voice.speech.languages import whisper_language
from pono.voice.speech.recognizer import Recognizer, StreamingRecognizer
from pono.voice.speech.whisper import MAX_CLIP_S, BatchedWhisper, Clip, Hypothesis
from pono.voice.tts import TTSEngine, load_tts
from pono.voice.vad import SileroVAD
from pono.voice.voices import VoiceLibrary
from pono.voice.worker.client import WorkerRecognizer
from pono.voice.worker.pool import WorkerPool, WorkerUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


class SpeechModels:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.vad: SileroVAD | None = None
        self.stt: TranscriptionEngine | None = None
        self.on_batch: Callable[[BatchStats], None] | None = None  # metrics of every Whisper batch
        self.tts: TTSEngine | None = None
        # One thread per model kind: STT never queues behind TTS, and VAD (0.1 ms) never behind either.
        # On a small CPU one Whisper at a time is faster overall than two fighting for cores (the STT engine
        # has its own thread, and batches what several calls need at once).
        self._vad_pool = ThreadPoolExecutor(1, thread_name_prefix="vad")
        self._tts_pool = ThreadPoolExecutor(1, thread_name_prefix="tts")
        self._turn_pool = ThreadPoolExecutor(1, thread_name_prefix="turn")  # the end-of-turn model (~50 ms)
        self.end_of_turn: SmartTurn | None = None
        # Persona voices load in threads of their own: one call's voice download never stalls the TTS thread.
        self.voices = VoiceLibrary(lambda voice: load_tts(settings.tts, voice, settings.tts_device))
        self.loaded = asyncio.Event()
        self.load_error: str | None = None
        self.on_fallback: Callable[[str], None] | None = None  # "stt" or "tts" fell back from a worker
        self.worker: WorkerPool | None = None
        if settings.speech_worker_url:
            token = settings.speech_worker_token.get_secret_value() if settings.speech_worker_token else ""
            self.worker = WorkerPool(settings.speech_worker_url, token, stall_s=settings.speech_worker_stall_s)

    async def load(self) -> None:
        """Load and warm every model off the event loop."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            s = self.settings
            self.vad = await loop.run_in_executor(self._vad_pool, SileroVAD)
            if s.end_of_turn_model:  # a missing model fails the start loudly, as any model does
                self.end_of_turn = await loop.run_in_executor(self._turn_pool, SmartTurn)
            if self.worker is not None:
                await self.worker.start()
                if s.speech_fallback == "none":  # nothing to load here: wait for a worker to speak through
                    await self.worker.wait_ready()
                    await self._warm()
                    log.info("speech on the worker(s), ready in %.1f s", time.perf_counter() - started)
                    self.loaded.set()
                    return
            self.tts = await loop.run_in_executor(self._tts_pool, load_tts, s.tts, s.tts_voice, s.tts_device)
            whisper = await asyncio.to_thread(
                BatchedWhisper, s.stt_model, s.models_dir, s.stt_device, s.stt_cpu_threads)
            max_batch = s.stt_max_batch or default_max_batch(whisper.device)
            self.stt = TranscriptionEngine(whisper, max_batch=max_batch, on_batch=self._batched,
                                           batch_window_s=s.stt_batch_window_ms / 1000 if max_batch > 1 else 0.0)
            await self._warm()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("speech models failed to load: %s", self.load_error)
            raise
        log.info("speech models ready in %.1f s", time.perf_counter() - started)
        self.loaded.set()

    async def _warm(self) -> None:
        # First inference allocates buffers and JITs kernels; pay that now, not on the first caller.
        warm_audio = (np.sin(np.linspace(0, 2000, 16000)) * 3000).astype(np.int16)
        await self.run_vad(self.vad.stream().process, warm_audio)  # type: ignore[union-attr]
        if self.end_of_turn is not None:
            await self.run_end_of_turn(warm_audio)
        if self.tts is not None:  # the local models (a worker warms its own)
            await asyncio.get_running_loop().run_in_executor(self._tts_pool, self._synthesize, "Hello.", None)
        if self.stt is not None:
            await self.transcribe(Clip(warm_audio))

    async def run_vad(self, fn: Callable[[np.ndarray], T], pcm: np.ndarray) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._vad_pool, fn, pcm)

    async def run_end_of_turn(self, pcm: np.ndarray | list[np.ndarray]) -> float:
        """How likely the caller has finished their turn (0-1, Smart Turn v3.2) from the turn's 16 kHz int16
        audio (one array, or its frames: joined in the worker thread, not on the loop), trailing silence included
        (the model reads the pause too). Raises RuntimeError when the model is off."""
        model = self.end_of_turn
        if model is None:
            raise RuntimeError("the end-of-turn model is off (PONO_END_OF_TURN_MODEL)")

        def probability() -> float:
            return model.probability(np.concatenate(pcm) if isinstance(pcm, list) else pcm)

        return await asyncio.get_running_loop().run_in_executor(self._turn_pool, probability)

    def _batched(self, stats: BatchStats) -> None:
        if self.on_batch is not None:
            self.on_batch(stats)

    async def transcribe(self, clip: Clip, *, final: bool = True) -> Hypothesis | None:
        """One clip through the process's STT engine (finals first; partials dropped when it is busy)."""
        assert self.stt is not None
        return await self.stt.transcribe(clip, final=final)

    def recognizer(self, language: str = "en", *, partial_interval_s: float = 1.0,
                   on_partial: Callable[[str], None] | None = None,
                   spawn: Callable[[Any, str], asyncio.Task[Any]] | None = None,
                   on_error: Callable[[str], None] | None = None, narrowband: bool = False) -> Recognizer:
        """A streaming recognizer for one call (see `pono.voice.speech.recognizer`): on a speech worker when
        one is configured (`on_error(message)` hears of a turn left without a transcript), else local."""
        s = self.settings
        try:
            language = whisper_language(language)
        except ValueError as exc:  # a persona saved before languages were checked: English, and say so
            log.warning("%s; transcribing in English", exc)
            language = "en"

        def local(partial_interval_s: float = partial_interval_s,
                  on_partial: Callable[[str], None] | None = on_partial) -> Recognizer:
            return StreamingRecognizer(self.transcribe, language=language, partial_interval_s=partial_interval_s,
                                       on_partial=on_partial, spawn=spawn, partial_window_s=s.stt_partial_window_s,
                                       final_window_s=MAX_CLIP_S if narrowband else s.stt_final_window_s)
        if self.worker is None:
            return local()
        return WorkerRecognizer(self.worker, language=language, partial_interval_s=partial_interval_s,
                                on_partial=on_partial, local=local if self.stt is not None else None,
                                on_fallback=self._fell_back, on_error=on_error, max_utterance_s=s.max_utterance_s)

    def _fell_back(self, kind: str) -> None:
        if self.on_fallback is not None:
            self.on_fallback(kind)

    async def run_stt(self, pcm: np.ndarray, language: str | None = "en") -> str:
        """The whole transcript of 16 kHz int16 audio of any length, at final priority."""
        recognizer = self.recognizer(language or "en", partial_interval_s=0)
        try:
            recognizer.push(pcm)
            return await recognizer.final()
        finally:
            recognizer.close()

    async def run_tts(self, text: str, voice: str | None = None) -> list[np.ndarray]:
        """Speech for `text`: int16 pieces at `tts_rate`, from a worker when one is up, else from the local
        model; [] when neither can speak (PONO_SPEECH_FALLBACK=none and no worker)."""
        if self.worker is not None and (worker := self.worker.pick()) is not None:
            try:
                return await self.worker.synthesize(worker, text, voice, self.tts_rate)
            except WorkerUnavailable as exc:
                self.worker.failed(worker, str(exc))
                self._fell_back("tts")
        if self.tts is None:
            return []
        return await asyncio.get_running_loop().run_in_executor(self._tts_pool, self._synthesize, text, voice)

    def _synthesize(self, text: str, voice: str | None) -> list[np.ndarray]:
        return self._engine(voice).synthesize(text)

    def _engine(self, voice: str | None) -> TTSEngine:
        """The engine for a persona's voice; never waits for one. A voice not loaded yet starts loading in a
        thread of its own and the default voice speaks meanwhile; one that cannot be had (hibari downloads
        voices other than its bundled one, and this host may be offline) keeps the default voice, once logged."""
        assert self.tts is not None
        if not voice or voice == self.settings.tts_voice:
            return self.tts
        return self.voices.engine(voice, self.tts)

    @property
    def tts_rate(self) -> int:
        rate = self.tts.sample_rate if self.tts is not None else self.worker.tts_rate if self.worker else None
        assert rate is not None
        return rate

    def close(self) -> None:
        for pool in (self._vad_pool, self._tts_pool, self._turn_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        if self.stt is not None:
            self.stt.close()
        if self.worker is not None:
            self.worker.close_soon()

    async def aclose(self) -> None:
        """`close()`, and wait until the connections to the speech workers are closed."""
        self.close()
        if self.worker is not None:
            await self.worker.close()
