"""Recording files and rows: where a recording's file lives (the data dir, or S3-compatible object storage),
reading it back by byte range, and its row in `recordings`.

A recording is written to a local file as the call goes (`spool_path`); `finish` makes it final, also after a
crash, at the next start (pono.recordings.Recordings.recover). On disk it stays where it is
(`<data dir>/recordings/YYYY/MM/DD/<call id>.ogg`, key relative to that folder); with
PONO_RECORDINGS_URL=s3://bucket/prefix it is uploaded in parts (aiobotocore) and the local copy removed.
Credentials for object storage come from the usual AWS variables (AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncpg

from pono.settings import Settings

log = logging.getLogger(__name__)

PART_BYTES = 8 << 20  # multipart upload part size (S3's least is 5 MiB, but for the last part)


class RecordingMissing(LookupError):
    """The recording's file or object is gone (purged, or never finished uploading)."""


@dataclass(frozen=True)
class Blob:
    """A byte range of a stored recording: `body` yields `length` bytes from `start` of `size` in all."""

    size: int
    start: int
    length: int
    body: AsyncIterator[bytes]


class RecordingStore:
    """Local files under `<data dir>/recordings`, or an S3 bucket when `url` ("s3://bucket/prefix") is given.

    `endpoint` is the S3 endpoint URL (None: AWS), `region` its region. Raises ValueError for a URL that is not
    s3://bucket[/prefix]."""

    def __init__(self, data_dir: Path, url: str | None = None, *, endpoint: str | None = None,
                 region: str = "us-east-1") -> None:
        self.root = data_dir / "recordings"
        self.spool = data_dir / "recordings-spool"
        self.bucket: str | None = None
        self.prefix = ""
        self.endpoint = endpoint
        self.region = region
        if url:
            parsed = urlparse(url)
            if parsed.scheme != "s3" or not parsed.netloc:
                raise ValueError(f"PONO_RECORDINGS_URL must be s3://bucket[/prefix], not {url!r}")
            self.bucket = parsed.netloc
            self.prefix = parsed.path.strip("/") + "/" if parsed.path.strip("/") else ""
        self._session: Any = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RecordingStore:
        """The store PONO_DATA_DIR, PONO_RECORDINGS_URL and PONO_RECORDINGS_S3_* describe."""
        return cls(settings.data_dir, settings.recordings_url, endpoint=settings.recordings_s3_endpoint,
                   region=settings.recordings_s3_region)

    @property
    def remote(self) -> bool:
        return self.bucket is not None

    def key_for(self, call_id: str, started_at: float) -> str:
        """The storage key of a call's recording: "YYYY/MM/DD/<call id>.ogg" (UTC), after the bucket prefix."""
        return f"{self.prefix}{time.strftime('%Y/%m/%d', time.gmtime(started_at))}/{call_id}.ogg"

    def spool_path(self, key: str) -> Path:
        """Where the recording is written while the call goes: its final place on disk, or a spool file."""
        if self.remote:
            return self.spool / key.replace("/", "_")
        return self.root / key

    def _local(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise RecordingMissing(key)
        return path

    def _client(self) -> Any:
        from aiobotocore.session import get_session

        if self._session is None:
            self._session = get_session()
        return self._session.create_client("s3", region_name=self.region, endpoint_url=self.endpoint)

    async def finish(self, key: str) -> None:
        """Make the spooled recording final (upload it, for S3). Raises OSError or botocore errors; the spool
        file is kept when the upload fails."""
        if not self.remote:
            return
        path = self.spool_path(key)
        async with self._client() as s3:
            await self._abort_stale_uploads(s3, key)
            upload = await s3.create_multipart_upload(Bucket=self.bucket, Key=key, ContentType="audio/ogg")
            parts = []
            try:
                with path.open("rb") as f:
                    number = 1
                    while True:
                        data = await asyncio.to_thread(f.read, PART_BYTES)
                        if not data and number > 1:
                            break
                        part = await s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload["UploadId"],
                                                    PartNumber=number, Body=data)
                        parts.append({"ETag": part["ETag"], "PartNumber": number})
                        number += 1
                        if len(data) < PART_BYTES:
                            break
                await s3.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload["UploadId"],
                                                   MultipartUpload={"Parts": parts})
            except BaseException:
                with contextlib.suppress(Exception):
                    await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload["UploadId"])
                raise
        await asyncio.to_thread(path.unlink, missing_ok=True)

    async def _abort_stale_uploads(self, s3: Any, key: str) -> None:
        """Abort multipart uploads of `key` left by a process killed while uploading (their parts cost storage
        and are never an object). Only one process finishes a key at a time: the one that recorded it, or, after
        it died, the next start on its data dir."""
        listed = await s3.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        for upload in listed.get("Uploads", []):
            if upload["Key"] == key:
                await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload["UploadId"])

    def local_file(self, key: str) -> Path | None:
        """The file of a recording kept on disk (None in S3 mode). Raises RecordingMissing when it is gone."""
        if self.remote:
            return None
        path = self._local(key)
        if not path.is_file():
            raise RecordingMissing(key)
        return path

    async def read(self, key: str, start: int | None, stop: int | None) -> Blob:
        """Bytes `start`..`stop` (exclusive; None: from the start, to the end) of an object in S3.
        Raises RecordingMissing, ValueError for a range past the end."""
        ranged = start is not None or stop is not None
        header = f"bytes={start or 0}-{'' if stop is None else stop - 1}"
        client = self._client()
        s3 = await client.__aenter__()
        try:
            answer = await s3.get_object(Bucket=self.bucket, Key=key, **({"Range": header} if ranged else {}))
        except Exception as exc:
            await client.__aexit__(None, None, None)
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise RecordingMissing(key) from None
            if code == "InvalidRange":
                raise ValueError("range not satisfiable") from None
            raise
        length = int(answer["ContentLength"])
        content_range = answer.get("ContentRange")  # "bytes 0-99/1234"
        size = int(content_range.rsplit("/", 1)[1]) if content_range else length
        first = int(content_range.split()[1].split("-")[0]) if content_range else 0

        async def body() -> AsyncIterator[bytes]:
            try:
                async with answer["Body"] as stream:
                    async for chunk in stream.iter_chunks(64 << 10):
                        yield chunk
            finally:
                await client.__aexit__(None, None, None)

        return Blob(size, first, length, body())

    async def delete(self, key: str) -> None:
        """Remove a recording's file or object (and any spool file); gone already is fine."""
        await asyncio.to_thread(self.spool_path(key).unlink, missing_ok=True)
        if self.remote:
            async with self._client() as s3:
                await s3.delete_object(Bucket=self.bucket, Key=key)
        else:
            await asyncio.to_thread(self._local(key).unlink, missing_ok=True)


def recording_record(call_id: str, key: str, started_at: float, *, retention_days: int | None,
                     info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The write record of a recording (pono.storage.writer "recording"): started, or complete with `info`
    {"duration_s", "size", "sha256", "codec"}."""
    done = info is not None
    return {"key": f"{call_id}:recording:{'complete' if done else 'started'}", "kind": "recording",
            "call_id": call_id, "turn": None, "storage_key": key, "codec": (info or {}).get("codec", "opus"),
            "duration_s": (info or {}).get("duration_s"), "size": (info or {}).get("size"),
            "sha256": (info or {}).get("sha256"), "status": "complete" if done else "recording",
            "retention_days": retention_days, "started_at": started_at,
            "completed_at": time.time() if done else None}


async def find_recording(pool: asyncpg.Pool, call_id: str) -> dict[str, Any] | None:
    """The recording row of a call: {"call_id", "storage_key", "codec", "duration_s", "size_bytes", "sha256",
    "status", "started_at", "completed_at"}; None when the call has none (or is deleted)."""
    row = await pool.fetchrow(
        "SELECT r.call_id, r.storage_key, r.codec, r.duration_s, r.size_bytes, r.sha256, r.status, r.started_at,"
        " r.completed_at FROM recordings r JOIN calls c ON c.id = r.call_id"
        " WHERE r.call_id = $1 AND c.deleted_at IS NULL", call_id)
    return dict(row) if row is not None else None


async def unfinished_recordings(pool: asyncpg.Pool, limit: int = 10_000) -> list[dict[str, Any]]:
    """Recordings whose file was never made final (status 'recording'): live calls on any replica, and calls
    whose process was killed. [{"call_id", "storage_key", "started_at" (datetime), "retention_days"}], oldest
    first."""
    rows = await pool.fetch(
        "SELECT call_id, storage_key, started_at, retention_days FROM recordings WHERE status = 'recording'"
        " ORDER BY started_at LIMIT $1", limit)
    return [dict(r) for r in rows]


async def purge_recordings(pool: asyncpg.Pool, store: RecordingStore, retention_days: int) -> int:
    """Delete recordings past their retention (the persona's `recording_retention_days` when it set one, else
    `retention_days`) or whose call is purged: the object first, then the row. Returns how many went; a file
    that cannot be removed keeps its row (tried again next time)."""
    rows = await pool.fetch(
        "SELECT r.call_id, r.storage_key FROM recordings r JOIN calls c ON c.id = r.call_id"
        " WHERE c.deleted_at < now() - make_interval(days => $1)"
        " OR c.started_at < now() - make_interval(days => LEAST(COALESCE(r.retention_days, $1), $1))", retention_days)
    removed = 0
    for row in rows:
        try:
            await store.delete(row["storage_key"])
        except Exception as exc:
            log.warning("could not remove recording %s: %s", row["call_id"], type(exc).__name__)
            continue
        await pool.execute("DELETE FROM recordings WHERE call_id = $1", row["call_id"])
        removed += 1
    return removed
