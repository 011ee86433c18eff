"""G.711 μ-law and A-law (ITU-T G.711) with numpy lookup tables (the stdlib audioop is gone in Python 3.13).

The tables are computed from the reference algorithm, ITU-T G.191 / Sun Microsystems' g711.c, as CPython's
audioop implements it (`st_14linear2ulaw`, `st_linear2alaw` and their inverses), so every one of the 65,536
16-bit samples encodes to the same code as audioop (or audioop-lts) gives, and every code decodes alike.
"""

from __future__ import annotations

import numpy as np

_QUANT_MASK, _SEG_SHIFT, _SEG_MASK, _SIGN_BIT = 0x0F, 4, 0x70, 0x80
_ULAW_BIAS, _ULAW_CLIP = 0x84, 8159
_SEG_UEND = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], np.int32)
_SEG_AEND = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], np.int32)
_ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int32)


def _segment(magnitude: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """g711.c's search(): the first segment whose end is >= the magnitude; 8 when beyond the last."""
    return np.searchsorted(ends, magnitude, side="left").astype(np.int32)


def _ulaw_encode_table() -> np.ndarray:
    """st_14linear2ulaw(sample >> 2) for every int16 sample, indexed by sample + 32768."""
    pcm = _ALL_SAMPLES >> 2  # 14-bit, arithmetic shift as in C
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = _segment(magnitude, _SEG_UEND)
    code = (np.minimum(seg, 7) << 4) | ((magnitude >> (np.minimum(seg, 7) + 1)) & _QUANT_MASK)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _alaw_encode_table() -> np.ndarray:
    """st_linear2alaw(sample >> 3) for every int16 sample, indexed by sample + 32768."""
    pcm = _ALL_SAMPLES >> 3  # 13-bit
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    magnitude = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = _segment(magnitude, _SEG_AEND)
    shift = np.where(seg < 2, 1, np.minimum(seg, 7))
    code = (np.minimum(seg, 7) << _SEG_SHIFT) | ((magnitude >> shift) & _QUANT_MASK)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _ulaw_decode_table() -> np.ndarray:
    """st_ulaw2linear16 for every code 0..255."""
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((codes & _QUANT_MASK) << 3) + _ULAW_BIAS) << ((codes & _SEG_MASK) >> _SEG_SHIFT)
    return np.where(codes & _SIGN_BIT, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    """st_alaw2linear16 for every code 0..255."""
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    t = (codes & _QUANT_MASK) << 4
    seg = (codes & _SEG_MASK) >> _SEG_SHIFT
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(codes & _SIGN_BIT, t, -t).astype(np.int16)


ULAW_DECODE = _ulaw_decode_table()
ALAW_DECODE = _alaw_decode_table()
ULAW_ENCODE = _ulaw_encode_table()
ALAW_ENCODE = _alaw_encode_table()


def decode(payload: bytes, codec: str) -> np.ndarray:
    """G.711 codes (one byte per sample) → int16 PCM, shape (len(payload),). codec: "PCMU" or "PCMA"."""
    table = ULAW_DECODE if codec == "PCMU" else ALAW_DECODE
    return table[np.frombuffer(payload, np.uint8)]


def encode(pcm: np.ndarray, codec: str) -> bytes:
    """int16 PCM of any shape (flattened) → one G.711 code per sample. codec: "PCMU" or "PCMA"."""
    table = ULAW_ENCODE if codec == "PCMU" else ALAW_ENCODE
    return table[pcm.astype(np.int32).reshape(-1) + 32768].tobytes()


SILENCE = {"PCMU": 0xFF, "PCMA": 0xD5}  # the codes for a zero sample
