"""GET /api/calls/{call_id}/recording/peaks: a recording's two-channel waveform for the console, computed here
(pono.web.waveform, in a small thread pool of its own, never on the event loop) so a browser draws an hour-long
call without downloading or decoding it. Audited like the recording itself."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import av
from aiohttp import web

from pono.context import SERVICES
from pono.http import ApiError
from pono.storage.audit import write_audit
from pono.storage.recordings import RecordingMissing, RecordingStore, find_recording
from pono.web.access import require
from pono.web.params import database, iso, query_int
from pono.web.waveform import CHANNELS, Peaks, file_peaks

MAX_BUCKETS = 5000
DEFAULT_BUCKETS = 1200
MAX_WAITING = 8  # decodes queued beyond the pool's two before new ones get 503

_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pono-peaks")  # bounded: decoding is CPU work
_CACHE: OrderedDict[tuple[str, str, int], Peaks] = OrderedDict()  # finished recordings only (their files never change)
_CACHE_SIZE = 32
_waiting = 0


def time_zero(recording_started: datetime) -> datetime:
    """When (wall clock) the recording's first sample was heard: a turn's `started_at` less this is where the
    turn is in the recording.

    The recording runs on the caller's audio clock from the first caller frame after it was set up
    (`recordings.started_at`, pono.recordings). Measured on a WebRTC call, that frame came 1 ms after the set-up
    (tests/test_console_review.py checks that the caller's words land within 0.25 s of when they were said). The
    call's end less the recording's duration was worse (150 ms off): the frames around a hang-up are not all
    recorded."""
    return recording_started


async def _spool(store: RecordingStore, key: str) -> Path:
    """Copy an object-storage recording to a temporary file (the caller removes it). Raises RecordingMissing."""
    blob = await store.read(key, None, None)
    fd, name = tempfile.mkstemp(prefix="pono-peaks-", suffix=".ogg")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in blob.body:
                await asyncio.to_thread(f.write, chunk)
    except BaseException:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise
    return path


async def _compute(store: RecordingStore, key: str, buckets: int) -> Peaks:
    """The peaks of the stored recording `key`, decoded in the peaks pool. Raises RecordingMissing,
    av.error.FFmpegError."""
    loop = asyncio.get_running_loop()
    path = await asyncio.to_thread(store.local_file, key)  # a stat: off the loop
    if path is not None:
        return await loop.run_in_executor(_POOL, file_peaks, path, buckets)
    spooled = await _spool(store, key)
    try:
        return await loop.run_in_executor(_POOL, file_peaks, spooled, buckets)
    finally:
        await asyncio.to_thread(spooled.unlink, missing_ok=True)


async def recording_peaks(store: RecordingStore, row: dict[str, Any], buckets: int) -> Peaks:
    """The peaks of the recording `row` (pono.storage.recordings.find_recording), cached once it is complete.
    Raises ApiError 503 when too many decodes wait, RecordingMissing, av.error.FFmpegError."""
    global _waiting
    cache_key = (row["call_id"], row["sha256"] or "", buckets)
    done = row["status"] == "complete"
    if done and cache_key in _CACHE:
        _CACHE.move_to_end(cache_key)
        return _CACHE[cache_key]
    if _waiting >= MAX_WAITING + 2:
        raise ApiError(503, "too many waveforms are being computed; try again shortly", headers={"Retry-After": "2"})
    _waiting += 1
    try:
        peaks = await _compute(store, row["storage_key"], buckets)
    finally:
        _waiting -= 1
    if done:
        _CACHE[cache_key] = peaks
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return peaks


async def get_peaks(request: web.Request) -> web.Response:
    """GET /api/calls/{call_id}/recording/peaks?buckets=N (viewer, calls): the waveform in N (1 to 5000, default
    1200) equal slices; fewer for a recording under N × 10 ms.

    Answers {"call_id", "status": "recording" | "complete", "duration_s" (decoded, float s), "sample_rate" (Hz),
    "buckets": int, "bucket_s": float s, "time_zero" (ISO 8601: the wall-clock time of the recording's first
    sample; a turn starts `turn.started_at - time_zero` seconds into it), "channels": {"caller": {"min": [...],
    "max": [...]}, "agent": {...}} (samples -1..1, rounded to 1e-4)}. 404 when the call has no recording, 422 for a
    bad N, 500 when the stored file is not audio, 503 while too many others are decoded. Every access is in the
    audit log (`recording.peaks`)."""
    who = await require(request, "viewer", "calls")
    buckets = query_int(request, "buckets", DEFAULT_BUCKETS, MAX_BUCKETS)
    call_id = request.match_info["call_id"]
    pool = database(request)
    row = await find_recording(pool, call_id)
    if row is None:
        raise ApiError(404, f"call {call_id} has no recording")
    await write_audit(pool, who.name, "recording.peaks", call_id, request.remote, buckets=buckets,
                      status=row["status"])
    store = request.app[SERVICES].storage.recordings
    try:
        peaks = await recording_peaks(store, row, buckets)
    except RecordingMissing:
        raise ApiError(404, f"the recording of call {call_id} is no longer stored") from None
    except (av.error.FFmpegError, ValueError) as exc:
        raise ApiError(500, f"the recording of call {call_id} cannot be decoded: {type(exc).__name__}") from None
    zero = time_zero(row["started_at"])
    channels = {name: {"min": [round(float(v), 4) for v in peaks.low[i]],
                       "max": [round(float(v), 4) for v in peaks.high[i]]} for i, name in enumerate(CHANNELS)}
    return web.json_response({
        "call_id": call_id, "status": row["status"], "duration_s": round(peaks.duration_s, 3),
        "sample_rate": peaks.sample_rate, "buckets": peaks.buckets,
        "bucket_s": round(peaks.duration_s / peaks.buckets, 6) if peaks.buckets else 0.0,
        "time_zero": iso(zero), "channels": channels}, headers={"Cache-Control": "no-store"})
