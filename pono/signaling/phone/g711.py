"""G.711 μ-law and A-law with numpy lookup tables (the stdlib audioop is gone in Python 3.13)."""

from __future__ import annotations

import numpy as np


def _ulaw_decode_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(sign != 0, magnitude, -magnitude).astype(np.int16)


ULAW_DECODE = _ulaw_decode_table()
ALAW_DECODE = _alaw_decode_table()


def _encode_table(decode: np.ndarray) -> np.ndarray:
    """For every 16-bit sample, the code whose decoded value is nearest: exact inverse of the decode table."""
    order = np.argsort(decode, kind="stable")
    values = decode[order].astype(np.int32)
    samples = np.arange(-32768, 32768, dtype=np.int32)
    right = np.clip(np.searchsorted(values, samples), 0, 255)
    left = np.clip(right - 1, 0, 255)
    nearer_left = np.abs(samples - values[left]) <= np.abs(values[right] - samples)
    return order[np.where(nearer_left, left, right)].astype(np.uint8)


ULAW_ENCODE = _encode_table(ULAW_DECODE)
ALAW_ENCODE = _encode_table(ALAW_DECODE)


def decode(payload: bytes, codec: str) -> np.ndarray:
    table = ULAW_DECODE if codec == "PCMU" else ALAW_DECODE
    return table[np.frombuffer(payload, np.uint8)]


def encode(pcm: np.ndarray, codec: str) -> bytes:
    table = ULAW_ENCODE if codec == "PCMU" else ALAW_ENCODE
    return table[pcm.astype(np.int32) + 32768].tobytes()


SILENCE = {"PCMU": 0xFF, "PCMA": 0xD5}  # the codes for a zero sample
