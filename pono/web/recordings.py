"""A call's recording: GET /api/calls/{call_id}/recording streams the Ogg Opus file, with HTTP range requests
so a player can seek. Every access is audited (who, which call, which range)."""

from __future__ import annotations

from aiohttp import web

from pono.context import SERVICES
from pono.http import ApiError
from pono.storage.audit import write_audit
from pono.storage.recordings import RecordingMissing, find_recording
from pono.web.access import require
from pono.web.params import database

CONTENT_TYPE = "audio/ogg"


async def get_recording(request: web.Request) -> web.StreamResponse:
    """GET /api/calls/{call_id}/recording (viewer, calls): 200 with the file, 206 for a `Range: bytes=a-b`,
    416 for a range past the end; 404 when the call has no recording (or it was purged)."""
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
    try:
        path = store.local_file(row["storage_key"])
    except RecordingMissing:
        raise ApiError(404, f"the recording of call {call_id} is no longer stored") from None
    headers = {"Cache-Control": "no-store", "Content-Type": CONTENT_TYPE}
    if path is not None:  # aiohttp answers Range, If-Range and 416 itself
        return web.FileResponse(path, headers=headers)
    try:
        window = request.http_range
    except ValueError:
        raise ApiError(416, "invalid Range header") from None
    if window.step not in (None, 1) or (window.start is not None and window.start < 0):
        raise ApiError(416, "only a single range of bytes=a-b is served")
    try:
        blob = await store.read(row["storage_key"], window.start, window.stop)
    except RecordingMissing:
        raise ApiError(404, f"the recording of call {call_id} is no longer stored") from None
    except ValueError:
        raise ApiError(416, "range not satisfiable", headers={"Content-Range": "bytes */*"}) from None
    ranged = window.start is not None or window.stop is not None
    response = web.StreamResponse(status=206 if ranged else 200, headers={
        **headers, "Accept-Ranges": "bytes", "Content-Length": str(blob.length),
        **({"Content-Range": f"bytes {blob.start}-{blob.start + blob.length - 1}/{blob.size}"} if ranged else {})})
    await response.prepare(request)
    async for chunk in blob.body:
        await response.write(chunk)
    await response.write_eof()
    return response
