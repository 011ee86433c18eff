"""The turn-taking evaluation set (tests/fixtures/turns/cases.json) and the caller audio made from it.

Cases are text; their audio is made at run time with espeak-ng, Pono's own TTS voice (hibari) and Piper when
`piper` is importable. A case may name a recorded WAV instead (tests/fixtures/turns/README.md): it is played
as recorded, whatever voices were asked for. bench/turns.py plays them into real calls.
"""

from __future__ import annotations

import importlib.util
import json
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pono.signaling.audio_out import Resampler

CASES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "turns" / "cases.json"
KINDS = ("complete", "thinking_pause", "trailing", "backchannel", "interruption")
OVER_AGENT = ("backchannel", "interruption")  # said while the agent speaks
RATE = 16_000
LOUD = 300  # |sample| above this is speech, for trimming espeak's and TTS's silence


@dataclass(frozen=True)
class Case:
    """One entry of cases.json: `parts` (one, or two around a pause of `pause_ms`), or a recorded `audio` file.
    `say` gives a voice other input for the same words (espeak-ng spells "mhm" out as letters)."""

    id: str
    kind: str
    parts: tuple[str, ...]
    pause_ms: int = 0
    audio: Path | None = None
    speech_end_s: float | None = None
    say: tuple[tuple[str, str], ...] = ()  # (voice, what it is given to say) where the text would be misread

    @property
    def text(self) -> str:
        return " ".join(self.parts)


def load_cases(path: Path = CASES, kinds: list[str] | None = None) -> list[Case]:
    """The cases of `path` whose kind is in `kinds` (all when None). Raises ValueError for a malformed case."""
    cases = []
    for raw in json.loads(path.read_text())["cases"]:
        if raw.get("kind") not in KINDS:
            raise ValueError(f"case {raw.get('id')!r}: kind must be one of {KINDS}")
        if kinds and raw["kind"] not in kinds:
            continue
        parts = tuple(raw["parts"]) if "parts" in raw else (raw.get("text", ""),)
        audio = (path.parent / raw["audio"]).resolve() if raw.get("audio") else None
        if audio is None and (not all(parts) or len(parts) > 2 or (len(parts) == 2) != ("pause_ms" in raw)):
            raise ValueError(f"case {raw['id']!r}: give 'text', or two 'parts' and 'pause_ms', or 'audio'")
        cases.append(Case(raw["id"], raw["kind"], parts, int(raw.get("pause_ms", 0)), audio,
                          raw.get("speech_end_s"), tuple(raw.get("say", {}).items())))
    return cases


def trim(pcm: np.ndarray) -> np.ndarray:
    """Speech without leading and trailing silence, so the only pauses are the ones a case makes."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > LOUD)
    return pcm[loud[0]:loud[-1] + 1] if loud.size else pcm[:0]


def read_wav(path: Path) -> np.ndarray:
    """A WAV file (16-bit PCM, any rate; the first channel of several) as 16 kHz mono int16."""
    with wave.open(str(path)) as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM")
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, w.getnchannels())[:, 0]
        return Resampler(RATE)(np.ascontiguousarray(pcm), w.getframerate())


class Voices:
    """Text → 16 kHz int16 speech for each voice: "espeak" (espeak-ng + sox), "hibari" (Pono's TTS),
    "piper" (only when the `piper` package is importable; `available` says which are)."""

    def __init__(self, names: list[str], workdir: Path) -> None:
        self.workdir = workdir
        self.engines: dict[str, object] = {}
        self.skipped: dict[str, str] = {}
        for name in names:
            if name == "piper" and importlib.util.find_spec("piper") is None:
                self.skipped[name] = "the piper extra is not installed"
            elif name in ("hibari", "piper"):
                from pono.voice.tts import load_tts

                self.engines[name] = load_tts(name, None, "cpu")
            elif name == "espeak":
                self.engines[name] = None
            else:
                raise ValueError(f"unknown voice {name!r}: espeak, hibari or piper")
        self._count = 0

    @property
    def available(self) -> list[str]:
        return list(self.engines)

    def say(self, voice: str, text: str) -> np.ndarray:
        """`text` spoken by `voice`, trimmed of silence."""
        if voice == "espeak":
            import sys

            sys.path.insert(0, str(CASES.parents[2]))  # tests/: the tests' own espeak-ng + sox helper
            from conftest import espeak

            self._count += 1
            return trim(espeak(text, self.workdir / f"espeak-{self._count}.wav"))
        engine = self.engines[voice]
        chunks = engine.synthesize(text)  # type: ignore[attr-defined]
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        return trim(Resampler(RATE)(pcm, engine.sample_rate))  # type: ignore[attr-defined]

    def clip(self, voice: str, case: Case) -> np.ndarray:
        """The caller's audio for `case`: its parts with `pause_ms` of silence between them."""
        if case.audio is not None:
            pcm = read_wav(case.audio)
            if case.speech_end_s is not None:
                start = np.flatnonzero(np.abs(pcm.astype(np.int32)) > LOUD)
                return pcm[(start[0] if start.size else 0):round(case.speech_end_s * RATE)]
            return trim(pcm)
        spelled = dict(case.say).get(voice)
        if spelled is not None:
            return self.say(voice, spelled)
        pieces: list[np.ndarray] = []
        for i, part in enumerate(case.parts):
            if i:
                pieces.append(np.zeros(case.pause_ms * RATE // 1000, np.int16))
            pieces.append(self.say(voice, part))
        return np.concatenate(pieces)
