"""Whisper on CTranslate2, run as batches: the features of several clips stacked, one `encode`, one `generate`.

faster-whisper's `transcribe()` serves one clip at a time. Several calls that need a transcript at the same
moment are faster as one batch on a GPU (and a little faster on a CPU's decoder), so this module drives the
CTranslate2 model that faster-whisper loaded directly, with faster-whisper's own feature extractor and
tokenizer. One batch is greedy (beam 1, temperature 0, as Pono always ran Whisper), so a clip's text does not
depend on what it was batched with.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pono.voice.cuda_libs import preload_cuda_libraries
from pono.voice.speech.languages import whisper_language
from pono.voice.stt import pick_device, resolve_model_dir

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
MAX_CLIP_S = 30.0  # Whisper's context: 3,000 feature frames of 10 ms
_FRAMES_PER_S = 100
_TIME_PRECISION = 0.02  # seconds per timestamp token
_MAX_LENGTH = 448  # Whisper's decoder context, prompt included
_NO_SPEECH = 0.8  # a clip whose no-speech probability is above this is silence (as Pono's filter always was)
# Tokens a clip may yield per second of audio, and a margin: fast speech is 3-4 words (4-6 tokens) a second, with a
# timestamp pair per segment. Whisper caught in a loop on a held sound ("Aaaah" → "I-I-I-..." to the 448-token
# limit) spent 3.4 s of CPU on 0.9 s of audio, holding the engine every call shares: it now stops near 40 tokens.
_TOKENS_PER_S = 20  # espeak Mandarin measured about 8 tokens a second, English about 5
_TOKEN_MARGIN = 16


@dataclass(frozen=True)
class Segment:
    """A stretch of a clip: `start_s`/`end_s` from the clip's start, from Whisper's timestamp tokens."""

    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class Hypothesis:
    """What Whisper heard in one clip. `segments` is empty unless timestamps were asked for."""

    text: str
    segments: tuple[Segment, ...] = field(default_factory=tuple)
    no_speech_prob: float = 0.0


@dataclass(frozen=True)
class Clip:
    """One transcription request: 16 kHz int16 `pcm` (at most 30 s), an optional `prompt` (the text said just
    before, which Whisper conditions on), and whether to decode segment timestamps. `window_s` is the encoder
    window: 30 (Whisper's own) or shorter, which is 2-4x faster on a CPU and fine for partials."""

    pcm: np.ndarray
    prompt: str = ""
    timestamps: bool = False
    window_s: float = MAX_CLIP_S
    language: str = "en"


class BatchedWhisper:
    """A Whisper model in CTranslate2 format, shared by every call of the process. Blocking: call
    `transcribe_batch` from one worker thread.

    `model` is "base", "tiny.en" or a folder (see `pono.voice.stt.resolve_model_dir`); `device` is
    "auto", "cpu" or "cuda" (float16 on CUDA, int8 on CPU)."""

    def __init__(self, model: str, cache_dir: Path, device: str = "auto", cpu_threads: int = 2) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        self.model_dir = resolve_model_dir(model, cache_dir)
        if device != "cpu":
            preload_cuda_libraries()  # CTranslate2 dlopens cuBLAS by name; pono[gpu] has it in site-packages
        self.device, self.compute_type = pick_device(device)
        log.info("loading whisper %s on %s (%s)", model, self.device, self.compute_type)
        self._whisper = WhisperModel(str(self.model_dir), device=self.device, compute_type=self.compute_type,
                                     cpu_threads=cpu_threads)
        self.multilingual = bool(self._whisper.model.is_multilingual)
        self._tokenizers: dict[str, Tokenizer] = {}
        self._make_tokenizer = lambda language: Tokenizer(
            self._whisper.hf_tokenizer, self.multilingual, task="transcribe",
            language=language if self.multilingual else "en")

    def _tokenizer(self, language: str):
        language = whisper_language(language) if self.multilingual else "en"
        if language not in self._tokenizers:
            self._tokenizers[language] = self._make_tokenizer(language)
        return self._tokenizers[language]

    def _features(self, clip: Clip) -> np.ndarray:
        """Log-mel features [80, frames], padded (or cut) to the clip's encoder window."""
        frames = int(min(MAX_CLIP_S, clip.window_s) * _FRAMES_PER_S)
        audio = clip.pcm[-int(MAX_CLIP_S * SAMPLE_RATE):].astype(np.float32) / 32768.0
        features = self._whisper.feature_extractor(audio)[:, :frames]
        if features.shape[1] < frames:
            features = np.pad(features, ((0, 0), (0, frames - features.shape[1])))
        return features

    def _prompt(self, clip: Clip) -> list[int]:
        tok = self._tokenizer(clip.language)
        prompt: list[int] = []
        if clip.prompt.strip():
            previous = tok.encode(" " + clip.prompt.strip())
            prompt = [tok.sot_prev, *previous[-(_MAX_LENGTH // 2 - 1):]]
        prompt.extend(tok.sot_sequence)
        if not clip.timestamps:
            prompt.append(tok.no_timestamps)
        return prompt

    def transcribe_batch(self, clips: list[Clip]) -> list[Hypothesis]:
        """Transcribe clips of one encoder window as one batch. Raises ValueError for mixed windows."""
        import ctranslate2

        if not clips:
            return []
        if len({c.window_s for c in clips}) != 1:
            raise ValueError("one batch, one encoder window")
        features = np.stack([self._features(c) for c in clips]).astype(np.float32)
        encoded = self._whisper.model.encode(ctranslate2.StorageView.from_array(features),
                                             to_cpu=self.device == "cpu" and len(clips) > 1)
        prompts = [self._prompt(c) for c in clips]
        results = self._whisper.model.generate(
            encoded, prompts, beam_size=1, max_length=generation_length(clips, prompts), return_no_speech_prob=True,
            suppress_blank=True, suppress_tokens=[-1], max_initial_timestamp_index=50)
        return [self._hypothesis(c, r.sequences_ids[0], r.no_speech_prob) for c, r in zip(clips, results, strict=True)]

    def _hypothesis(self, clip: Clip, tokens: list[int], no_speech_prob: float) -> Hypothesis:
        tok = self._tokenizer(clip.language)
        if no_speech_prob > _NO_SPEECH:
            return Hypothesis("", (), no_speech_prob)
        if not clip.timestamps:
            return Hypothesis(_clean(tok.decode(tokens)), (), no_speech_prob)
        segments = _segments(tok, tokens)
        return Hypothesis(" ".join(s.text for s in segments if s.text), tuple(segments), no_speech_prob)


def generation_length(clips: list[Clip], prompts: list[list[int]]) -> int:
    """CTranslate2's `max_length` for a batch (prompt included, as faster-whisper counts it): the longest prompt
    and `_TOKENS_PER_S` tokens for each second of the longest clip, plus `_TOKEN_MARGIN`, at most Whisper's 448."""
    seconds = max(min(MAX_CLIP_S, c.pcm.size / SAMPLE_RATE) for c in clips)
    budget = _TOKEN_MARGIN + int(np.ceil(_TOKENS_PER_S * seconds))
    return min(_MAX_LENGTH, max(len(p) for p in prompts) + budget)


def _segments(tok, tokens: list[int]) -> list[Segment]:
    """Split decoded tokens at timestamp tokens into segments. Text after the last timestamp (an unfinished
    segment) ends at the clip's last timestamp seen, or at 0 when there was none."""
    begin = tok.timestamp_begin
    segments: list[Segment] = []
    start: float | None = None
    text: list[int] = []
    last_time = 0.0
    for token in tokens:
        if token >= begin:
            at = (token - begin) * _TIME_PRECISION
            if text:  # an end timestamp closes the segment
                segments.append(Segment(start if start is not None else last_time, at, _clean(tok.decode(text))))
                text, start = [], None
            else:  # a start timestamp
                start = at
            last_time = at
        elif token < tok.eot:
            text.append(token)
    if text:
        segments.append(Segment(start if start is not None else last_time, last_time, _clean(tok.decode(text))))
    return segments


_SPACES = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()
