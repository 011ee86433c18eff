"""Persona voices, loaded off the speech path.

A persona may name a TTS voice other than the process's default one. hibari downloads every voice but its
bundled one, and a download can take minutes (or hang until its timeout on an offline host). Loading it in
the TTS thread would stall every call's speech behind it, so each voice is loaded once, in a thread of its
own; until it is ready (or when it can't be had) the default voice speaks, and later sentences switch to it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pono.voice.tts import TTSEngine

log = logging.getLogger(__name__)

VoiceState = Literal["absent", "loading", "ready", "failed"]


@dataclass
class _Voice:
    done: threading.Event = field(default_factory=threading.Event)
    engine: TTSEngine | None = None
    failed_at: float | None = None


class VoiceLibrary:
    """The persona voices of one process, each loaded once in the background by `loader(voice)`.

    `engine(voice, default)` never blocks: it answers the loaded voice, or `default` while the voice loads or
    after its load failed (logged once per try). A failed voice is tried again after `retry_after_s`; at most
    `max_voices` distinct voices are kept (each holds a model), further ones speak with the default voice. A
    voice that failed holds no model and gives its place up to a new voice once the library is full.
    """

    def __init__(self, loader: Callable[[str], TTSEngine], *, max_voices: int = 32, retry_after_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._loader = loader
        self.max_voices = max_voices
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._voices: dict[str, _Voice] = {}
        self._full_logged = False

    def engine(self, voice: str, default: TTSEngine) -> TTSEngine:
        """`voice`'s engine when it is loaded; else `default`, with the voice's load started (once)."""
        with self._lock:
            slot = self._voices.get(voice)
            if slot is None and len(self._voices) >= self.max_voices:
                for failed in [name for name, s in self._voices.items() if s.failed_at is not None]:
                    del self._voices[failed]
            if slot is None and len(self._voices) >= self.max_voices:
                if not self._full_logged:
                    log.warning("%d TTS voices already loaded; voice %r speaks with the default voice",
                                self.max_voices, voice)
                    self._full_logged = True
                return default
            retry = slot is not None and slot.failed_at is not None and (
                self._clock() - slot.failed_at >= self.retry_after_s)
            if slot is None or retry:
                slot = self._voices[voice] = _Voice()
                thread = threading.Thread(target=self._load, args=(voice, slot, default.sample_rate),
                                          name=f"tts-voice-{voice[:24]}", daemon=True)
                thread.start()
                log.info("loading TTS voice %r in the background; the default voice speaks until it is ready", voice)
            return slot.engine if slot.engine is not None else default

    def state(self, voice: str) -> VoiceState:
        """Where `voice`'s load stands."""
        with self._lock:
            slot = self._voices.get(voice)
            if slot is None:
                return "absent"
            if slot.engine is not None:
                return "ready"
            return "failed" if slot.failed_at is not None else "loading"

    def wait(self, voice: str, timeout: float | None = None) -> bool:
        """Block until `voice`'s current load has ended, loaded or failed (warm-up, tests); False on timeout or
        when no load was started."""
        with self._lock:
            slot = self._voices.get(voice)
        return slot is not None and slot.done.wait(timeout)

    def _load(self, voice: str, slot: _Voice, sample_rate: int) -> None:
        try:
            engine = self._loader(voice)
            if engine.sample_rate != sample_rate:
                raise ValueError(f"a persona voice must have the default voice's sample rate ({sample_rate} Hz)")
        except Exception as exc:
            log.error("TTS voice %r unavailable (%s: %s); the default voice speaks instead", voice,
                      type(exc).__name__, exc)
            with self._lock:
                slot.failed_at = self._clock()
        else:
            with self._lock:
                slot.engine = engine
            log.info("TTS voice %r ready", voice)
        finally:
            slot.done.set()
