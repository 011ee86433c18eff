"""Call recordings after a crash in S3 mode: a `pono serve` process killed mid-call leaves its recording spooled
on disk (nothing in the bucket, the row still 'recording'); the next start on that data dir cuts it to a clean
prefix, uploads it, aborts the multipart upload a crash during an upload would leave, and completes the row.

Real processes on the session's Postgres and Valkey, an aiortc caller, and moto in server mode as the stand-in for
a cloud object store outside the machine (TESTING.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from helpers import poll_call
from servers import PonoProcess
from test_recordings import call_killed_mid_answer, decode, recorded_persona

from pono.context import SERVICES


async def test_a_restart_uploads_what_a_killed_server_recorded(
        tmp_path: Path, server, admin_token: str, postgres_url: str, redis_url: str, scripted_llm,
        script, question: np.ndarray) -> None:
    from aiobotocore.session import get_session
    from moto.server import ThreadedMotoServer

    from pono.agent.embedded import free_port

    # A short answer: a reply is held until it has played and been checked, and the recording trails it.
    script.reply = "Certainly."
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"DATABASE_URL": postgres_url, "REDIS_URL": redis_url, "OPENAI_BASE_URL": scripted_llm.base_url,
           "PONO_LLM_MODEL": "scripted", "PONO_RECORDINGS_URL": "s3://calls/pono",
           "PONO_RECORDINGS_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing"}
    data_dir = tmp_path / "replica"
    pool = server.app[SERVICES].storage.db.pool
    s3_client = get_session().create_client("s3", region_name="us-east-1", endpoint_url=endpoint,
                                            aws_access_key_id="testing", aws_secret_access_key="testing")
    restarted: PonoProcess | None = None
    try:
        async with s3_client as s3:
            await s3.create_bucket(Bucket="calls")
            persona = await recorded_persona(server.url, admin_token)
            call_id = await call_killed_mid_answer(PonoProcess(data_dir, **env), persona, question)

            # What the crash left: a spooled prefix, no object, the row still 'recording'.
            row = await pool.fetchrow("SELECT status, storage_key FROM recordings WHERE call_id = $1", call_id)
            assert row is not None and row["status"] == "recording"
            key = row["storage_key"]
            spooled = list((data_dir / "recordings-spool").glob(f"*{call_id}.ogg"))
            assert len(spooled) == 1 and spooled[0].stat().st_size > 0
            listed = await s3.list_objects_v2(Bucket="calls", Prefix="pono/")
            assert key not in [o["Key"] for o in listed.get("Contents", [])]
            # A crash during an upload leaves a multipart upload that never becomes an object.
            stale = await s3.create_multipart_upload(Bucket="calls", Key=key)
            await s3.upload_part(Bucket="calls", Key=key, UploadId=stale["UploadId"], PartNumber=1, Body=b"junk")

            restarted = PonoProcess(data_dir, **env)
            await restarted.start()
            call = await poll_call(server, admin_token, call_id,
                                   lambda c: (c.get("recording") or {}).get("status") == "complete", tries=300)
            recording = call["recording"]
            assert recording is not None and recording["status"] == "complete", call.get("recording")
            stored = await (await s3.get_object(Bucket="calls", Key=key))["Body"].read()
            assert len(stored) == recording["size"] and hashlib.sha256(stored).hexdigest() == recording["sha256"]
            stereo = decode(stored)
            # The call ran about 12 s; the recording trails it by its redaction lag (1.5 s) and one Ogg page.
            assert len(stereo) / 16_000 > 8.0 and abs(len(stereo) / 16_000 - recording["duration_s"]) < 0.1
            assert np.abs(stereo[:, 0]).max() > 2000  # the caller's question is in it
            assert not list((data_dir / "recordings-spool").glob("*.ogg"))  # uploaded, spool gone
            uploads = await s3.list_multipart_uploads(Bucket="calls", Prefix=key)
            assert not uploads.get("Uploads"), uploads  # the stale upload was aborted
    finally:
        if restarted is not None:
            await restarted.stop()
        moto.stop()
