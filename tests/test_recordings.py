"""Call recordings, through real calls: an aiortc caller speaking espeak-ng audio to a server on real Postgres.

What a person reviewing calls would check: the recording plays; a card number read aloud is not in it (the
project's own STT hears the other words and none of the card's digits, and the span where it was said is a
tone); the span is in dlp_findings; seeking works (HTTP ranges); only people with a login or key get it, and
each access is in the audit log; a server killed mid-call leaves a recording that plays up to near the kill
(here the caller's turn was checked well before it; audio of a turn still open at the kill is lost);
retention removes file and row.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
from conftest import espeak
from helpers import poll_call
from servers import PonoProcess

from pono.context import SERVICES
from pono.storage.retention import purge
from pono.storage.users import create_api_key, create_user
from pono.testing.caller import Caller

CARD_SENTENCE = "Hello, my card is 4 1 1 1, 1 1 1 1, 1 1 1 1, 1 1 1 1, and I want to pay the bill"
CARD_DIGITS = "4 1 1 1, 1 1 1 1, 1 1 1 1, 1 1 1 1"


def decode(data: bytes) -> np.ndarray:
    """A recording's bytes (Ogg Opus) → 16 kHz stereo int16 [n, 2], decoded by PyAV to its end."""
    with av.open(io.BytesIO(data)) as container:
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=16_000)
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
    return np.concatenate([f.to_ndarray().reshape(-1, 2) for f in frames])


async def recorded_persona(url: str, token: str, **fields: object) -> str:
    name = f"rec-{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http, \
            http.post(f"{url}/api/personas", json={"name": name, "system_prompt": "x", "recording": "on",
                                                   **fields}) as r:
        assert r.status == 201, await r.text()
    return name


async def call_with_recording(server, admin_token: str, persona: str, speak: np.ndarray | None = None,
                              wait_s: float = 2.0) -> tuple[Caller, dict]:
    """One call to `server` on `persona`: 1 s after it opens the caller says `speak` (if given) and waits for the
    agent's answer, and it hangs up `wait_s` later. (The caller, the stored call once its recording is complete.)"""
    caller = Caller(server.url)
    try:
        await caller.connect(persona=persona)
        await caller.wait_open()
        await asyncio.sleep(1.0)
        if speak is not None:
            caller.speak(speak)
            await caller.wait_for(lambda e: e["type"] == "agent.final", 60)
        await asyncio.sleep(wait_s)
    finally:
        await caller.hang_up()
    call = await poll_call(server, admin_token, caller.call_id,
                           lambda c: (c.get("recording") or {}).get("status") == "complete", tries=300)
    return caller, call


async def recording_of(url: str, admin_token: str, call_id: str) -> bytes:
    """`GET /api/calls/{id}/recording`: it must answer 200; the file."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http, \
            http.get(f"{url}/api/calls/{call_id}/recording") as r:
        assert r.status == 200
        return await r.read()


async def call_killed_mid_answer(replica: PonoProcess, persona: str, question: np.ndarray) -> str:
    """Starts `replica`, calls it on `persona`, says `question`, kills the server (SIGKILL) 12 s later and
    stops it: the call's id."""
    await replica.start()
    caller = Caller(replica.url)
    try:
        await caller.connect(persona=persona)
        await caller.wait_open()
        caller.speak(question)
        await asyncio.sleep(12.0)
        await replica.kill()
    finally:
        await caller.close()
        await replica.stop()
    return caller.call_id


@pytest.fixture(scope="module")
async def card_call(server, admin_token: str, audio_dir: Path, script) -> dict:
    """One recorded call where the caller reads a card number mid-sentence; its stored record and recording."""
    script.reply = "Thank you."
    persona = await recorded_persona(server.url, admin_token)
    sentence = espeak(CARD_SENTENCE, audio_dir / "card.wav")
    caller, call = await call_with_recording(server, admin_token, persona, sentence)
    data = await recording_of(server.url, admin_token, caller.call_id)
    return {"call": call, "data": data, "sentence": sentence, "call_id": caller.call_id}


@pytest.fixture(scope="module")
def script(scripted_llm):
    from pono.testing.scripted_llm import Script

    scripted_llm.script = Script()
    return scripted_llm.script


async def test_a_card_number_read_aloud_is_not_in_the_recording(server, card_call, audio_dir: Path) -> None:
    call, stereo = card_call["call"], decode(card_call["data"])
    assert call["recording"]["codec"] == "opus" and call["recording"]["size"] == len(card_call["data"])
    assert abs(call["recording"]["duration_s"] - len(stereo) / 16_000) < 1.0
    caller_side = np.ascontiguousarray(stereo[:, 0])
    heard = await server.app[SERVICES].models.run_stt(caller_side)
    words = re.sub(r"[^a-z0-9 ]", " ", heard.lower()).split()
    # The rest of the sentence is kept (the word just before the number may lose its last sound to the padding).
    assert {"hello", "my", "want", "pay"} <= set(words), heard
    digits = re.sub(r"\D", "", heard)
    assert "1111" not in digits and "4111" not in digits, heard  # no digit run of the card
    spans = [f for f in call["dlp_findings"] if f.get("channel") == "caller"]
    assert spans, call["dlp_findings"]
    span = spans[0]
    start, end = span["audio_start_ms"] * 16, span["audio_end_ms"] * 16
    # It covers the time the number took to say, and what is there now is the tone.
    said = espeak(CARD_DIGITS, audio_dir / "digits.wav")
    voiced = np.flatnonzero(np.abs(said) > 500)
    assert end - start >= 0.8 * (voiced[-1] - voiced[0])
    replaced = caller_side[start + 1600:end - 1600].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(replaced))
    assert abs(np.argmax(spectrum) * 16_000 / len(replaced) - 1000) < 20  # a 1 kHz tone
    assert span["action"] == "tone" and "4111" not in str(span)


async def check_range_edge_cases(http: aiohttp.ClientSession, url: str, data: bytes) -> None:
    """RFC 9110 range handling, the same for a file on disk and an object in S3: 206 for one satisfiable range
    (cut at the end), 416 with a JSON error and `Content-Range: bytes */size` for an unsatisfiable one (a
    first byte past the end, a zero-length suffix), and 200 with the whole file for a header to ignore (several
    ranges, another unit, one that does not parse, an If-Range that does not match)."""
    size = len(data)

    async def get(range_header: str, **headers: str) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
        async with http.get(url, headers={"Range": range_header, **headers}) as r:
            return r.status, r.headers, await r.read()

    for header, start, stop in [("bytes=100-299", 100, 300), ("bytes=-50", size - 50, size),
                                (f"bytes={size - 50}-", size - 50, size), (f"bytes=0-{size + 100}", 0, size),
                                (f"bytes=-{size + 100}", 0, size), ("BYTES = 5-9 ,", 5, 10), ("bytes=0-0", 0, 1)]:
        status, headers, body = await get(header)
        assert (status, body) == (206, data[start:stop]), (header, status, len(body))
        assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/{size}", header
        assert headers["Content-Type"] == "audio/ogg" and int(headers["Content-Length"]) == stop - start
    for header in ["bytes=-0", f"bytes={size}-", f"bytes={size + 10}-{size + 20}"]:
        status, headers, body = await get(header)
        assert status == 416, (header, status)
        assert headers["Content-Type"].startswith("application/json"), (header, headers["Content-Type"])
        assert headers["Content-Range"] == f"bytes */{size}", header
        assert "not satisfiable" in json.loads(body)["error"], body
    for header in ["bytes=0-1,5-9", "items=0-5", "bytes=abc", "bytes=9-5", "bytes=-", "bytes", "bytes=1-2-3", ""]:
        status, headers, body = await get(header)
        assert (status, body) == (200, data), (header, status, len(body))
        assert "Content-Range" not in headers and headers["Accept-Ranges"] == "bytes", header
    status, headers, body = await get("bytes=0-9", **{"If-Range": '"not-this-one"'})
    assert (status, body) == (200, data)
    status, _, body = await get("bytes=0-9", **{"If-Range": headers["ETag"]})
    assert (status, body) == (206, data[:10])


async def test_ranges_access_and_audit(server, admin_token: str, card_call) -> None:
    call_id, data = card_call["call_id"], card_call["data"]
    url = f"{server.url}/api/calls/{call_id}/recording"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            assert r.status == 401  # anonymous
        pool = server.app[SERVICES].storage.db.pool
        viewer = (await create_api_key(pool, await create_user(pool, f"viewer-{uuid.uuid4().hex[:6]}", "viewer"),
                                       "viewer", "t"))[1]
        auth = {"Authorization": f"Bearer {viewer}"}
        async with http.get(url, headers={**auth, "Range": "bytes=100-299"}) as r:
            assert r.status == 206
            assert r.headers["Content-Range"] == f"bytes 100-299/{len(data)}"
            assert await r.read() == data[100:300]
        async with http.get(url, headers={**auth, "Range": f"bytes={len(data) - 50}-"}) as r:
            assert r.status == 206 and await r.read() == data[-50:]
        async with http.get(url, headers={**auth, "Range": f"bytes={len(data) + 10}-"}) as r:
            assert r.status == 416
        async with aiohttp.ClientSession(headers=auth) as viewer_http:
            await check_range_edge_cases(viewer_http, url, data)
        async with http.get(f"{server.url}/api/calls/{uuid.uuid4().hex}/recording", headers=auth) as r:
            assert r.status == 404
    # HEAD: the headers alone. The whole file followed them once, which on a kept-open connection is read as the
    # start of the next response.
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"HEAD /api/calls/{call_id}/recording HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {viewer}"
                 "\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head, _, after = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {len(data)}".encode() in head
    assert after == b"", f"{len(after)} bytes after the headers of a HEAD"
    rows = await pool.fetch("SELECT actor, details FROM audit_log WHERE action = 'recording.access' AND target = $1",
                            call_id)
    assert any("bytes=100-299" in r["details"] for r in rows) and len(rows) >= 4


async def test_retention_removes_the_file_and_the_row(server, admin_token: str, script) -> None:
    persona = await recorded_persona(server.url, admin_token, recording_retention_days=1)
    caller = Caller(server.url)
    try:
        await caller.connect(persona=persona)
        await caller.wait_open()
        await asyncio.sleep(3.0)
    finally:
        await caller.hang_up()
    call = await poll_call(server, admin_token, caller.call_id,
                           lambda c: (c.get("recording") or {}).get("status") == "complete", tries=300)
    assert call["recording"]["duration_s"] > 1.0
    services = server.app[SERVICES]
    pool = services.storage.db.pool
    key = await pool.fetchval("SELECT storage_key FROM recordings WHERE call_id = $1", caller.call_id)
    path = services.storage.recordings.local_file(key)
    assert path is not None and path.is_file()
    await pool.execute("UPDATE calls SET started_at = now() - interval '2 days' WHERE id = $1", caller.call_id)
    result = await purge(pool, services.settings.retention_days, services.storage.recordings)
    assert result.removed["recordings"] >= 1 and not path.exists()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http, \
            http.get(f"{server.url}/api/calls/{caller.call_id}/recording") as r:
        assert r.status == 404
    assert (await poll_call(server, admin_token, caller.call_id, lambda c: True))["recording"] is None


async def test_a_killed_server_leaves_a_recording_that_plays_to_near_the_kill(
        tmp_path: Path, server, admin_token: str, postgres_url: str, redis_url: str, scripted_llm,
        question: np.ndarray) -> None:
    persona = await recorded_persona(server.url, admin_token)
    replica = PonoProcess(tmp_path / "replica", DATABASE_URL=postgres_url, REDIS_URL=redis_url,
                          OPENAI_BASE_URL=scripted_llm.base_url, PONO_LLM_MODEL="scripted")
    call_id = await call_killed_mid_answer(replica, persona, question)
    files = list((tmp_path / "replica" / "recordings").rglob(f"{call_id}.ogg"))
    assert len(files) == 1
    stereo = decode(files[0].read_bytes())
    # The call ran about 12 s; the recording trails it by its redaction lag (1.5 s) and one Ogg page.
    assert len(stereo) / 16_000 > 8.0


async def test_recordings_in_s3_compatible_storage(tmp_path: Path, monkeypatch, server, admin_token: str,
                                                   postgres_url: str, redis_url: str, scripted_llm) -> None:
    """PONO_RECORDINGS_URL against moto in server mode (the stand-in for a cloud object store): the file is
    uploaded when the call ends, served by range from the bucket, and purged from it."""
    from aiobotocore.session import get_session
    from conftest import make_settings, start_server
    from moto.server import ThreadedMotoServer

    from pono.agent.embedded import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3_client = get_session().create_client("s3", region_name="us-east-1", endpoint_url=endpoint)
    async with s3_client as s3:
        await s3.create_bucket(Bucket="calls")
        running = await start_server(make_settings(
            tmp_path / "s3-replica", stt_model="tiny.en", openai_base_url=scripted_llm.base_url, llm_model="scripted",
            database_url=postgres_url, redis_url=redis_url, recordings_url="s3://calls/pono",
            recordings_s3_endpoint=endpoint))
        try:
            persona = await recorded_persona(running.url, admin_token)
            caller = Caller(running.url)
            try:
                await caller.connect(persona=persona)
                await caller.wait_open()
                await asyncio.sleep(4.0)
            finally:
                await caller.hang_up()
            call = await poll_call(running, admin_token, caller.call_id,
                                   lambda c: (c.get("recording") or {}).get("status") == "complete", tries=300)
            pool = running.app[SERVICES].storage.db.pool
            key = await pool.fetchval("SELECT storage_key FROM recordings WHERE call_id = $1", caller.call_id)
            assert key.startswith("pono/") and key.endswith(f"{caller.call_id}.ogg")
            stored = await (await s3.get_object(Bucket="calls", Key=key))["Body"].read()
            assert len(stored) == call["recording"]["size"] and len(decode(stored)) / 16_000 > 2.0
            assert not list((tmp_path / "s3-replica" / "recordings-spool").glob("*.ogg"))  # uploaded, spool gone
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
                url = f"{running.url}/api/calls/{caller.call_id}/recording"
                async with http.get(url, headers={"Range": "bytes=10-109"}) as r:
                    assert r.status == 206 and r.headers["Content-Range"] == f"bytes 10-109/{len(stored)}"
                    assert await r.read() == stored[10:110]
                async with http.get(url) as r:
                    assert r.status == 200 and await r.read() == stored
                await check_range_edge_cases(http, url, stored)
            await pool.execute("UPDATE calls SET started_at = now() - interval '400 days' WHERE id = $1",
                               caller.call_id)
            store = running.app[SERVICES].storage.recordings
            assert (await purge(pool, 90, store)).removed["recordings"] >= 1
            listed = await s3.list_objects_v2(Bucket="calls", Prefix="pono/")
            assert key not in [o["Key"] for o in listed.get("Contents", [])]
        finally:
            await running.runner.cleanup()
            moto.stop()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_a_long_recorded_call_keeps_memory_flat_and_plays_in_full(
        tmp_path: Path, server, admin_token: str, postgres_url: str, redis_url: str, scripted_llm,
        question: np.ndarray) -> None:
    """2.5 minutes here to keep CI short (the issue's 10-minute figure is for a bench run): a recording kept in
    memory would grow by 64 kB a second; the server's RSS stays flat and the file decodes to the call's length."""
    persona = await recorded_persona(server.url, admin_token)
    replica = PonoProcess(tmp_path / "long", DATABASE_URL=postgres_url, REDIS_URL=redis_url,
                          OPENAI_BASE_URL=scripted_llm.base_url, PONO_LLM_MODEL="scripted")
    await replica.start()
    assert replica.process is not None
    caller = Caller(replica.url)
    try:
        await caller.connect(persona=persona)
        await caller.wait_open()
        rss = []
        for _ in range(15):  # a question every 10 s for 150 s
            caller.speak(question)
            await asyncio.sleep(10.0)
            rss.append(_rss_mb(replica.process.pid))
        await caller.hang_up()
        call = await poll_call(replica, admin_token, caller.call_id,
                               lambda c: (c.get("recording") or {}).get("status") == "complete", tries=300)
    finally:
        await caller.close()
        await replica.stop()
    # After the first minute (models warm, buffers sized) memory stays within a few MB.
    assert max(rss[6:]) - rss[5] < 12, rss
    files = list((tmp_path / "long" / "recordings").rglob(f"{caller.call_id}.ogg"))
    stereo = decode(files[0].read_bytes())
    from datetime import datetime

    lasted = (datetime.fromisoformat(call["ended_at"]) - datetime.fromisoformat(call["started_at"])).total_seconds()
    assert abs(len(stereo) / 16_000 - lasted) < 1.0, (len(stereo) / 16_000, lasted)
    assert abs(len(stereo) / 16_000 - call["recording"]["duration_s"]) < 1.0


@pytest.mark.parametrize(("env", "named"), [
    ({"PONO_RECORDING_LAG_S": "-1"}, "PONO_RECORDING_LAG_S"),
    ({"PONO_RECORDING_LAG_S": "0.5"}, "PONO_RECORDING_LAG_S"),  # shorter than the hold reaches back
    ({"PONO_RECORDING_LAG_S": "nan"}, "PONO_RECORDING_LAG_S"),
    ({"PONO_RECORDING_LAG_S": "3600"}, "PONO_RECORDING_LAG_S"),
    ({"PONO_RECORDING_MAX_HOLD_S": "-5"}, "PONO_RECORDING_MAX_HOLD_S"),
    ({"PONO_RECORDING_LAG_S": "20", "PONO_RECORDING_MAX_HOLD_S": "10"}, "PONO_RECORDING_MAX_HOLD_S"),
    ({"PONO_RECORDING_MAX_HOLD_S": "inf"}, "PONO_RECORDING_MAX_HOLD_S"),
    ({"PONO_RECORDINGS_URL": "https://bucket/prefix"}, "PONO_RECORDINGS_URL"),
    ({"PONO_RECORDINGS_S3_ENDPOINT": "minio:9000"}, "PONO_RECORDINGS_S3_ENDPOINT"),
    # An utterance's lead-in (min speech + 300 ms pre-roll) reaching past the 1 s hold: its first words unchecked
    ({"PONO_MIN_SPEECH_MS": "701"}, "min_speech_ms"),
])
def test_settings_refuse_recording_values_that_would_leak_or_break(tmp_path: Path, monkeypatch, env: dict,
                                                                   named: str) -> None:
    """A negative lag wrote the caller's audio before its check: a card number reached the disk unredacted."""
    from pydantic import ValidationError

    from pono.settings import Settings
    from pono.voice.recording.recorder import PRE_SPEECH_S
    from pono.voice.recording.timeline import Timeline

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=named):
        Settings(data_dir=tmp_path)
    for name in env:
        monkeypatch.delenv(name)
    settings = Settings(data_dir=tmp_path, recording_lag_s=PRE_SPEECH_S, recording_max_hold_s=PRE_SPEECH_S + 0.5,
                        recordings_url="s3://calls/pono", recordings_s3_endpoint="http://127.0.0.1:9000")
    assert settings.recording_lag_s == PRE_SPEECH_S
    with pytest.raises(ValueError, match="lag"):
        Timeline(lag_s=-1.0)


TINY_CARD_SENTENCE = "My card number is 4111 1111 1111 1111 and please book the table"
NUMBER_WORDS = {"four", "one", "eleven", "thousand", "hundred", "for"}


async def test_with_tiny_en_the_first_digit_of_a_card_is_not_heard(tmp_path: Path, server, admin_token: str,
                                                                   audio_dir: Path, postgres_url: str,
                                                                   redis_url: str, scripted_llm, script) -> None:
    """With PONO_STT_MODEL=tiny.en, word alignment put "is" over the card's first word: the span began 0.3 s
    into "four" and Whisper base heard "My card number is 4" in the recording. Heard again by Whisper base (the
    shared server's model), nothing of the card is left, and what comes just before the span is speech."""
    from conftest import make_settings, start_server

    script.reply = "Thank you."
    running = await start_server(make_settings(
        tmp_path / "tiny", stt_model="tiny.en", openai_base_url=scripted_llm.base_url, llm_model="scripted",
        database_url=postgres_url, redis_url=redis_url))
    try:
        persona = await recorded_persona(running.url, admin_token)
        sentence = espeak(TINY_CARD_SENTENCE, audio_dir / "tiny-card.wav")
        caller, call = await call_with_recording(running, admin_token, persona, sentence)
        key = await running.app[SERVICES].storage.db.pool.fetchval(
            "SELECT storage_key FROM recordings WHERE call_id = $1", caller.call_id)
        path = running.app[SERVICES].storage.recordings.local_file(key)
        assert path is not None
        stereo = decode(path.read_bytes())
    finally:
        await running.runner.cleanup()
    caller_side = np.ascontiguousarray(stereo[:, 0])
    heard = await server.app[SERVICES].models.run_stt(caller_side)
    words = re.sub(r"[^a-z0-9 ]", " ", heard.lower()).split()
    assert {"my", "card"} <= set(words) and {"book", "table"} & set(words), heard
    assert not re.search(r"\d", heard) and not NUMBER_WORDS & set(words), heard  # "My card number is 4" before
    spans = [f for f in call["dlp_findings"] if f.get("channel") == "caller"]
    assert spans, call["dlp_findings"]
    start, end = spans[0]["audio_start_ms"] * 16, spans[0]["audio_end_ms"] * 16
    before = caller_side[start - 4800:start].astype(np.float64)  # 0.3 s before the span: the caller's words
    assert np.sqrt(np.mean(before ** 2)) > 300, "silence before the span"
    spectrum = np.abs(np.fft.rfft(before))
    tone = spectrum[int(990 * len(before) / 16_000):int(1010 * len(before) / 16_000) + 1].sum()
    assert tone < 0.2 * spectrum.sum(), "the tone before the span"
    inside = caller_side[start + 1600:end - 1600].astype(np.float64)
    assert abs(np.argmax(np.abs(np.fft.rfft(inside))) * 16_000 / len(inside) - 1000) < 20  # the tone
