"""Word timestamps for a transcript already known: Whisper's cross-attention alignment (CTranslate2 `align`).

The live STT path never asks for word timestamps (they cost a second decoder pass). A call that is recorded
needs them only for a turn whose transcript holds personal data, to find where in the audio it was said. This
module runs that alignment on the final text's tokens, as faster-whisper's `add_word_timestamps` does, through
faster-whisper's own `find_alignment` on the model the process already loaded. Blocking: run it in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pono.voice.speech.whisper import MAX_CLIP_S, SAMPLE_RATE, BatchedWhisper


@dataclass(frozen=True)
class Word:
    """One word of the text: `start`/`end` are character offsets in the text given, `start_s`/`end_s` seconds
    from the clip's start."""

    text: str
    start: int
    end: int
    start_s: float
    end_s: float


def align_words(whisper: BatchedWhisper, pcm: np.ndarray, text: str, language: str = "en") -> list[Word]:
    """Where each word of `text` was said in `pcm` (16 kHz mono int16, at most 30 s: longer raises
    ValueError). Words the tokenizer splits differently from the text are located by their letters; a word
    not found in the text is left out. [] for empty text."""
    import ctranslate2

    if not text.strip():
        return []
    if len(pcm) > MAX_CLIP_S * SAMPLE_RATE:
        raise ValueError(f"a clip to align is at most {MAX_CLIP_S:.0f} s, not {len(pcm) / SAMPLE_RATE:.1f} s")
    model = whisper._whisper
    tokenizer = whisper._tokenizer(language)
    audio = pcm.astype(np.float32) / 32768.0
    features = model.feature_extractor(audio)
    num_frames = min(features.shape[1], int(MAX_CLIP_S * 100))
    frames = int(MAX_CLIP_S * 100)  # Whisper's encoder wants its full 30 s window for alignment
    features = features[:, :frames]
    if features.shape[1] < frames:
        features = np.pad(features, ((0, 0), (0, frames - features.shape[1])))
    encoded = model.model.encode(ctranslate2.StorageView.from_array(features[np.newaxis].astype(np.float32)))
    tokens = [t for t in tokenizer.encode(" " + text.strip()) if t < tokenizer.eot]
    aligned = model.find_alignment(tokenizer, [tokens], encoded, num_frames)[0]
    return _locate(text, aligned)


def _locate(text: str, aligned: list[dict]) -> list[Word]:
    """Character offsets of Whisper's words (" my", " card", ...) in `text`, walking it left to right."""
    words: list[Word] = []
    cursor = 0
    for item in aligned:
        letters = str(item["word"]).strip()
        if not letters:
            continue
        at = text.find(letters, cursor)
        if at < 0:
            continue
        cursor = at + len(letters)
        words.append(Word(letters, at, cursor, float(item["start"]), float(item["end"])))
    return words
