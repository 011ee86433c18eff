"""A call's recording: GET /api/calls/{call_id}/recording streams the Ogg Opus file, with HTTP range requests
so a player can seek. Every access is audited (who, which call, which range).

Files on disk and objects in S3 are answered by the same code: the Range header is parsed once (`byte_range`),
resolved against the recording's size (`resolve_range`), and the bytes streamed from the file or the bucket."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from pono.context import SERVICES
from pono.http import ApiError
from pono.storage.audit import write_audit
from pono.storage.recordings import Blob, RecordingMissing, find_recording
from pono.web.access import require
from pono.web.params import database

CONTENT_TYPE = "audio/ogg"
CHUNK = 64 << 10
_RANGE_SPEC = re.compile(r"(\d*)-(\d*)")


@dataclass(frozen=True)
class ByteRange:
    """One range of a `bytes` Range header: `first`..`last` (inclusive; `last` None: to the end), or, with
    `first` None, the last `last` bytes (a suffix range)."""

    first: int | None
    last: int | None


class Unsatisfiable(ValueError):
    """The range lies past the end of the recording (416)."""


def byte_range(header: str | None) -> ByteRange | None:
    """The single byte range a Range header asks for; None where the header is to be ignored and the whole
    recording served (200). RFC 9110:

    - §14.2: Range = ranges-specifier; a server MAY ignore it, and MUST ignore one with a range unit it does not
      understand (`items=0-5`). A header that does not parse (`bytes=abc`, `bytes=5-2`) is ignored too.
    - §14.1.1: range units are case-insensitive; range-set = 1#range-spec, and §5.6.1.2 has recipients accept
      empty list elements (`bytes=0-9,`). More than one range is ignored (one answer, no multipart/byteranges).
    - §14.1.2: int-range = first-pos "-" [ last-pos ], with last-pos not below first-pos; suffix-range =
      "-" suffix-length.

    aiohttp's `request.http_range` (which this endpoint used before) raises ValueError for all of these rather
    than ignoring them, and ignores neither the unit's case nor empty list elements; werkzeug's
    parse_range_header would do, but it is not a dependency of Pono."""
    if header is None:
        return None
    unit, eq, ranges = header.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip() for s in ranges.split(",") if s.strip()]
    if len(specs) != 1 or (m := _RANGE_SPEC.fullmatch(specs[0])) is None or m.group(0) == "-":
        return None
    first, last = (int(g) if g else None for g in m.groups())
    if first is not None and last is not None and last < first:
        return None
    return ByteRange(first, last)


def resolve_range(wanted: ByteRange, size: int) -> tuple[int, int]:
    """`wanted` as `start`, `stop` (exclusive) within `size` bytes. Raises Unsatisfiable (RFC 9110 §14.1.3: a
    first-pos at or past the end, or a suffix of length 0, is not satisfiable); a last-pos or suffix past the end
    is cut to it."""
    if wanted.first is None:
        assert wanted.last is not None
        if wanted.last == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - wanted.last), size
    if wanted.first >= size:
        raise Unsatisfiable
    return wanted.first, size if wanted.last is None else min(wanted.last + 1, size)


def _file_blob(path: Path, size: int, start: int | None, stop: int | None) -> Blob:
    """Bytes `start`..`stop` of a file on disk of `size` bytes (as the range was resolved against: a recording
    still being written grows), read in worker threads a chunk at a time."""
    first, end = start or 0, size if stop is None else stop

    async def body() -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(path.open, "rb")
        try:
            await asyncio.to_thread(handle.seek, first)
            left = end - first
            while left > 0 and (chunk := await asyncio.to_thread(handle.read, min(CHUNK, left))):
                left -= len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(handle.close)

    return Blob(size, first, max(0, end - first), body())


async def get_recording(request: web.Request) -> web.StreamResponse:
    """GET /api/calls/{call_id}/recording (viewer, calls): 200 with the file, 206 for a single
    `Range: bytes=a-b` (or `a-`, `-n`), 416 (JSON, with `Content-Range: bytes */size`) for a range past the end;
    any other Range header (another unit, several ranges, a malformed one, an If-Range that does not match the
    ETag) is ignored: 200 with the whole file. 404 when the call has no recording (or it was purged)."""
    who = await require(request, "viewer", "calls")
    call_id = request.match_info["call_id"]
    pool = database(request)
    row = await find_recording(pool, call_id)
    if row is None:
        raise ApiError(404, f"call {call_id} has no recording")
    range_header = request.headers.get("Range")
    await write_audit(pool, who.name, "recording.access", call_id, request.remote,
                      range=range_header[:100] if range_header else None, status=row["status"])
    store = request.app[SERVICES].storage.recordings
    missing = ApiError(404, f"the recording of call {call_id} is no longer stored")
    try:
        path = await asyncio.to_thread(store.local_file, row["storage_key"])  # a stat: off the loop
    except RecordingMissing:
        raise missing from None
    etag = f'"{row["sha256"]}"' if row.get("sha256") and row["status"] == "complete" else None
    wanted = byte_range(range_header) if request.method == "GET" else None
    if_range = request.headers.get("If-Range")
    if wanted is not None and if_range is not None and (etag is None or if_range.strip() != etag):
        wanted = None  # RFC 9110 §13.1.5: a validator that does not match, the whole representation
    size = (await asyncio.to_thread(path.stat)).st_size if path is not None else row.get("size_bytes")
    if wanted is not None and size is None:
        wanted = None  # an S3 object whose size is not known yet: served whole (§14.2 allows ignoring Range)
    start = stop = None
    if wanted is not None:
        assert size is not None
        try:
            start, stop = resolve_range(wanted, size)
        except Unsatisfiable:
            raise ApiError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{size}"},
                           size=size) from None
    try:
        blob = (_file_blob(path, size, start, stop) if path is not None and size is not None
                else await store.read(row["storage_key"], start, stop))
    except RecordingMissing:
        raise missing from None
    except ValueError:  # the object is shorter than its row says
        raise ApiError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{size}"},
                       size=size) from None
    ranged = wanted is not None
    headers = {"Cache-Control": "no-store", "Content-Type": CONTENT_TYPE, "Accept-Ranges": "bytes",
               "Content-Length": str(blob.length), **({"ETag": etag} if etag else {})}
    if ranged:
        headers["Content-Range"] = f"bytes {blob.start}-{blob.start + blob.length - 1}/{blob.size}"
    response = web.StreamResponse(status=206 if ranged else 200, headers=headers)
    try:
        await response.prepare(request)
        if request.method != "HEAD":  # HEAD: the headers alone (RFC 9110 §9.3.2), not the file after them
            async for chunk in blob.body:
                await response.write(chunk)
        await response.write_eof()
    finally:
        await blob.body.aclose()  # type: ignore[attr-defined]
    return response
