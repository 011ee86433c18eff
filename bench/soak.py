"""Long calls stay flat: one call of many minutes, watched for memory growth and latency creep.

Starts `pono serve` as a child process (as bench/latency.py does) against a scripted OpenAI-compatible LLM
with a fixed time to first token, and places ONE WebRTC call from an aiortc caller that lasts `--minutes`.
Every `--every-s` seconds the caller speaks an espeak-ng question and waits for the spoken answer to end
(a turn that runs over starts the next one as soon as it ends: no barge-in).

    unshare --net sh -c 'ip link set lo up && exec "$@"' sh .venv/bin/python bench/soak.py --minutes 30

At each minute it prints the server's RSS (VmRSS of the `pono serve` process), the median voice-to-voice
latency of that minute's turns (last caller speech sample sent → first agent audio received), and the
event loop's worst lag from /metrics (the highest histogram bucket that minute reached, and the maximum since
start). At the end: RSS at minute 1 against the last minute, its change in %, and the latency trend, the
slope in ms per minute of a least-squares line through every turn.

With --record the server records the call, and the call is held until the last minute's sample is taken, so
every RSS sample is taken while recording. The bench's call names no persona, so it gets the default persona:
with Postgres up (the embedded one here) that is the stored `default` row, seeded with recording off, and
PONO_RECORDING_DEFAULT only reaches the persona of last resort (Persona.from_settings, for when Postgres cannot
be asked). So --record makes an admin key with `pono users create` and stores a persona with "recording": "on"
as the new default (tests/test_recordings.py also records through a persona). After the hang-up the bench waits
for the recording's row to be complete (GET /api/calls/{id}), decodes
`<data dir>/recordings/YYYY/MM/DD/<call id>.ogg` to its end with PyAV in a worker thread (16 kHz stereo, samples
counted per channel) and prints its duration against the call's: the caller's wall clock from the offer's
answer (the call exists) to the hang-up's answer (the call has ended), or, past the call token's 5 minutes (the
DELETE gets 401), to the peer connection's close, which ends the call; also the server's own started_at →
ended_at. The exit status is 1 when the file does not decode, is not stereo, or the two differ by 1 s or more.

    unshare --net sh -c 'ip link set lo up && exec "$@"' sh .venv/bin/python bench/soak.py --minutes 10 --record
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
from latency import espeak_question, metric

from pono.agent.embedded import free_port
from pono.signaling.ice import restrict_host_addresses
from pono.testing.caller import RATE, Caller
from pono.testing.ready import wait_until_ready
from pono.testing.scripted_llm import Script, ScriptedLLM

REPLY = "Sure, it is booked."  # short: the answer ends well before the next question
LAG_BUCKETS = "pono_event_loop_lag_seconds_bucket"
RECORDING_RATE = 16_000  # what the recording is decoded to, as tests/test_recordings.py decodes it
DURATION_TOLERANCE_S = 1.0  # issue 16: the file's duration matches the call's within 1 s


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


async def lag_buckets(http: aiohttp.ClientSession, url: str, token: str) -> dict[float, float]:
    """The event-loop lag histogram's cumulative counts by upper bound (seconds)."""
    buckets: dict[float, float] = {}
    async with http.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}) as r:
        for line in (await r.text()).splitlines():
            if line.startswith(LAG_BUCKETS + "{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def worst_bucket(before: dict[float, float], after: dict[float, float]) -> float:
    """The upper bound of the highest bucket that got observations between two readings (inf: over 1 s)."""
    new_total = after.get(float("inf"), 0) - before.get(float("inf"), 0)
    for le in sorted(after):
        if after[le] - before.get(le, 0) >= new_total:
            return le
    return float("inf")


@dataclass
class Soak:
    """One call's turns and the per-minute samples taken while it lasts."""

    turns: list[tuple[float, float]] = field(default_factory=list)  # (minutes since start, v2v seconds)
    late_turns: int = 0  # turns that started late because the one before ran past --every-s
    lost_turns: int = 0  # questions with no answer heard
    minutes: list[dict[str, Any]] = field(default_factory=list)
    call_id: str = ""
    answered_at: float | None = None  # wall clock (time.time()) when the offer was answered: the call exists
    started_ts: float | None = None  # the call.started event's ts (the server's clock, the same machine's)
    hang_up_sent_at: float | None = None  # wall clock when the hang-up (DELETE) was sent
    hang_up_status: int | None = None  # the DELETE's HTTP status
    hung_up_at: float | None = None  # wall clock when the hang-up was answered (else the peer connection closed)


async def next_event(caller: Caller, since: int, predicate: Any, timeout: float) -> int:
    """The index of the first event at or after `since` that matches."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i in range(since, len(caller.events)):
            if predicate(caller.events[i]):
                return i
        since = len(caller.events)
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no matching event within {timeout:.0f} s")


def drop_heard_audio(caller: Caller) -> None:
    """Forget the audio received so far, keeping the sample clock first_sound_after counts from: a 30-minute
    recording in RAM would grow the caller, and searching it each turn would slow the caller down."""
    if caller.first_arrival is None:
        return
    dropped = sum(chunk.size for chunk in caller.received)
    caller.received.clear()
    caller.first_arrival += dropped / RATE


async def one_turn(caller: Caller, question: np.ndarray) -> float | None:
    """Speak the question and wait until the answer has been played; voice-to-voice seconds (None: not heard)."""
    caller.events.clear()
    drop_heard_audio(caller)
    caller.speak(question)
    await caller.mic.speech_done.wait()
    assert caller.mic.last_speech_sent_at is not None
    spoken_at = caller.mic.last_speech_sent_at
    final = await next_event(caller, 0, lambda e: e["type"] == "agent.final", 60)
    turn = caller.events[final]["turn"]
    # The answer has been played when the call goes back to listening after it.
    await next_event(caller, final, lambda e: e["type"] == "call.state" and e.get("state") == "listening", 60)
    await asyncio.sleep(0.2)  # the last packets of the answer
    heard_at = caller.first_sound_after(spoken_at)
    if heard_at is None or not any(e["type"] == "latency" and e["turn"] == turn for e in caller.events):
        return None
    return heard_at - spoken_at


async def sample_minutes(soak: Soak, http: aiohttp.ClientSession, url: str, pid: int, started: float,
                         minutes: int) -> None:
    """At the end of each minute, record and print RSS, that minute's turns and the event-loop lag."""
    previous = await lag_buckets(http, url, "soak")
    for minute in range(1, minutes + 1):
        await asyncio.sleep(max(0.0, started + 60 * minute - time.monotonic()))
        buckets = await lag_buckets(http, url, "soak")
        v2v = [s for t, s in soak.turns if minute - 1 <= t < minute]
        sample = {
            "minute": minute,
            "rss_mb": round(rss_mb(pid), 1),
            "turns": len(v2v),
            "v2v_median_ms": round(1000 * statistics.median(v2v)) if v2v else None,
            "lag_worst_bucket_ms": round(1000 * worst_bucket(previous, buckets), 1),
            "lag_max_since_start_ms": round(1000 * await metric(http, url, "soak", "pono_event_loop_lag_max_seconds"),
                                            1),
        }
        previous = buckets
        soak.minutes.append(sample)
        print(f"  minute {minute:3d}: RSS {sample['rss_mb']:7.1f} MB, {sample['turns']:2d} turns, voice-to-voice "
              f"median {sample['v2v_median_ms']} ms, event-loop lag this minute ≤ {sample['lag_worst_bucket_ms']} ms "
              f"(max since start {sample['lag_max_since_start_ms']} ms)", flush=True)


async def soak_call(soak: Soak, url: str, question: np.ndarray, started: float, args: argparse.Namespace,
                    llm: ScriptedLLM, hold: asyncio.Task[None] | None = None) -> None:
    """The call; with `hold` (the minute sampler, under --record) it stays open until that task is done."""
    caller = Caller(url)
    try:
        await caller.connect()
        soak.answered_at, soak.call_id = time.time(), caller.call_id
        await caller.wait_open()
        if args.record:
            with contextlib.suppress(TimeoutError):
                soak.started_ts = float((await caller.wait_for(lambda e: e["type"] == "call.started", 5))["ts"])
        await asyncio.sleep(0.5)  # let the jitter buffers settle, as a person says hello after pick-up
        end = started + 60 * args.minutes
        next_at = time.monotonic()
        while next_at < end - 2 * args.every_s:  # leave room for the last answer within the time
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            turn_started = time.monotonic()
            v2v = await one_turn(caller, question)
            llm.script.requests.clear()  # the scripted LLM's record of requests would grow for the whole call
            if v2v is None:
                soak.lost_turns += 1
            else:
                soak.turns.append(((turn_started - started) / 60, v2v))
            next_at += args.every_s
            if time.monotonic() > next_at:
                soak.late_turns += 1
                next_at = time.monotonic()
        if hold is not None:
            await asyncio.shield(hold)  # the last minute's RSS is read while the call is still recorded
    finally:
        await hang_up(caller, soak)


async def hang_up(caller: Caller, soak: Soak) -> None:
    """Caller.hang_up, timed: the DELETE's answer (the call has ended), else the peer connection's close. The
    DELETE takes the call token, which expires 5 minutes after it was fetched (CALL_TOKEN_TTL_S): a longer call
    gets 401 and ends when the peer connection closes, as Caller.hang_up's would."""
    if caller.call_id:
        soak.hang_up_sent_at = time.time()
        async with caller.http.delete(f"{caller.base_url}/api/calls/{caller.call_id}", headers=caller.auth) as r:
            soak.hang_up_status = r.status
            if r.status == 200:
                soak.hung_up_at = time.time()
    await caller.close()
    if soak.hang_up_sent_at is not None and soak.hung_up_at is None:
        soak.hung_up_at = time.time()


def decoded_samples(path: Path) -> tuple[int, int]:
    """Decode an Ogg Opus recording to its end with PyAV (16 kHz s16 stereo, as tests/test_recordings.py does);
    (samples per channel, channels in the file). Blocking: run it in a worker thread. Raises av.error.FFmpegError
    when the file does not decode."""
    with av.open(str(path)) as container:
        channels = container.streams.audio[0].codec_context.channels
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=RECORDING_RATE)
        samples = 0
        for frame in container.decode(audio=0):
            samples += sum(f.samples for f in resampler.resample(frame))
        samples += sum(f.samples for f in resampler.resample(None))  # what the resampler still held
    return samples, channels


async def recorded_default_persona(url: str, data_dir: Path, env: dict[str, str]) -> str:
    """An admin key (through the CLI, as bench/latency.py makes one), and a persona that records stored as the
    default: the call the bench places without naming one gets it. Returns the key."""
    created = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pono", "users", "create", "--role", "admin", "--name", "soak", "--print-token",
        env={**env, "PONO_DATA_DIR": str(data_dir)}, stdout=asyncio.subprocess.PIPE)
    out, _ = await created.communicate()
    if created.returncode != 0:
        raise RuntimeError(f"pono users create failed ({created.returncode})")
    token = out.decode().strip().splitlines()[-1]
    body = {"name": "soak-recorded", "system_prompt": "Be brief.", "recording": "on", "is_default": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http, \
            http.post(f"{url}/api/personas", json=body) as r:
        if r.status != 201:
            raise RuntimeError(f"the recorded persona was refused: {r.status} {await r.text()}")
    return token


async def check_recording(soak: Soak, http: aiohttp.ClientSession, url: str, token: str, data_dir: Path,
                          pid: int) -> dict[str, Any]:
    """Wait for the recording's row to be complete, decode its file to the end and compare with the call."""
    waited = time.monotonic()
    call: dict[str, Any] = {}
    while time.monotonic() - waited < 180:
        async with http.get(f"{url}/api/calls/{soak.call_id}", headers={"Authorization": f"Bearer {token}"}) as r:
            call = await r.json() if r.status == 200 else {}
        if (call.get("recording") or {}).get("status") == "complete" and call.get("ended_at"):
            break
        await asyncio.sleep(0.2)
    row = call.get("recording") or {}
    result: dict[str, Any] = {"call_id": soak.call_id, "recording_status": row.get("status"),
                              "recording_wait_s": round(time.monotonic() - waited, 1),
                              "row_duration_s": row.get("duration_s"), "row_size_bytes": row.get("size"),
                              "rss_after_recording_mb": round(rss_mb(pid), 1)}
    files = sorted((data_dir / "recordings").glob(f"*/*/*/{soak.call_id}.ogg"))
    if not files:
        return {**result, "file": None, "error": "no recording file"}
    path = files[0]
    result.update(file=str(path.relative_to(data_dir)), file_size_bytes=path.stat().st_size)
    decode_started = time.monotonic()
    try:
        samples, channels = await asyncio.to_thread(decoded_samples, path)
    except av.error.FFmpegError as exc:
        return {**result, "error": f"decoding failed: {exc}"}
    decoded = samples / RECORDING_RATE
    result.update(decoded_s=round(decoded, 3), decoded_samples_per_channel=samples, channels=channels,
                  decode_s=round(time.monotonic() - decode_started, 2))
    if soak.answered_at is not None and soak.hung_up_at is not None:
        lasted = soak.hung_up_at - soak.answered_at
        end = ("hang-up answered" if soak.hang_up_status == 200 else
               f"peer connection closed (the hang-up DELETE got {soak.hang_up_status})")
        result.update(call_s=round(lasted, 3), call_s_source=f"caller wall clock, offer answered → {end}",
                      difference_s=round(decoded - lasted, 3))
    if soak.hang_up_sent_at is not None and soak.hung_up_at is not None:
        result.update(hang_up_status=soak.hang_up_status,
                      hang_up_took_s=round(soak.hung_up_at - soak.hang_up_sent_at, 3))
    if soak.started_ts is not None and soak.hung_up_at is not None:
        result["call_started_event_to_hang_up_s"] = round(soak.hung_up_at - soak.started_ts, 3)
    if call.get("started_at") and call.get("ended_at"):
        stored = (datetime.fromisoformat(call["ended_at"]) - datetime.fromisoformat(call["started_at"]))
        result.update(server_call_s=round(stored.total_seconds(), 3),
                      server_difference_s=round(decoded - stored.total_seconds(), 3))
    result["duration_ok"] = (result.get("difference_s") is not None and channels == 2
                             and abs(result["difference_s"]) < DURATION_TOLERANCE_S)
    return result


def print_recording(rec: dict[str, Any], report: dict[str, Any], minutes: int) -> None:
    print(f"  recording: {rec.get('file')}, row {rec['recording_status']} after {rec['recording_wait_s']} s "
          f"(row duration {rec['row_duration_s']} s, size {rec['row_size_bytes']} bytes)")
    if "error" in rec:
        print(f"  recording: {rec['error']}")
        return
    print(f"  decoded by PyAV to its end: {rec['decoded_s']:.3f} s ({rec['decoded_samples_per_channel']} samples "
          f"per channel at 16 kHz, {rec['channels']} channels, decoded in {rec['decode_s']} s); file size "
          f"{rec['file_size_bytes']} bytes ({rec['file_size_bytes'] / 1e6:.2f} MB)")
    if "call_s" in rec:
        print(f"  call: {rec['call_s']:.3f} s ({rec['call_s_source']}); decoded − call = "
              f"{rec['difference_s']:+.3f} s: {'within' if rec['duration_ok'] else 'NOT within'} "
              f"{DURATION_TOLERANCE_S:g} s")
    if "call_started_event_to_hang_up_s" in rec:
        print(f"  call.started event's ts → the same end: {rec['call_started_event_to_hang_up_s']:.3f} s; the "
              f"hang-up (DELETE {rec['hang_up_status']}) took {rec['hang_up_took_s']} s")
    if "server_call_s" in rec:
        print(f"  the server's started_at → ended_at: {rec['server_call_s']:.3f} s (decoded − that = "
              f"{rec['server_difference_s']:+.3f} s)")
    print(f"  RSS while recording: minute 1 {report['rss_first_mb']} MB, minute {minutes} {report['rss_last_mb']} MB "
          f"({report['rss_change_pct']:+.1f} %); after the recording completed {rec['rss_after_recording_mb']} MB")


def summary(soak: Soak) -> dict[str, Any]:
    first, last = soak.minutes[0], soak.minutes[-1]
    slope = None
    if len(soak.turns) >= 2:
        t, v2v = np.array(soak.turns).T
        slope = round(float(np.polyfit(t, 1000 * v2v, 1)[0]), 1)
    return {
        "rss_first_mb": first["rss_mb"], "rss_last_mb": last["rss_mb"],
        "rss_change_pct": round(100 * (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"], 1),
        "v2v_slope_ms_per_minute": slope, "turns": len(soak.turns), "late_turns": soak.late_turns,
        "lost_turns": soak.lost_turns, "minutes": soak.minutes,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=30, help="length of the one call")
    ap.add_argument("--stt-model", default="tiny.en")
    ap.add_argument("--ttft", type=float, default=0.2, help="scripted LLM time to first token (s)")
    ap.add_argument("--every-s", type=float, default=6.0, help="the caller asks a question this often")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    ap.add_argument("--record", action="store_true",
                    help="record the call (a default persona with recording on), then decode the file and match "
                         "its duration")
    args = ap.parse_args()
    if args.minutes < 1:
        ap.error("--minutes must be at least 1")

    restrict_host_addresses(["127.0.0.1"])
    workdir = Path(tempfile.mkdtemp(prefix="pono-soak-"))
    question = espeak_question(workdir)
    llm = ScriptedLLM(Script(reply=REPLY, first_token_s=args.ttft, token_interval_s=0.02))
    await llm.start()
    port = free_port()
    env = {**os.environ, "PONO_PORT": str(port), "PONO_DATA_DIR": str(workdir / "data"),
           "PONO_STT_MODEL": args.stt_model, "PONO_ICE_INTERFACES": '["127.0.0.1"]', "PONO_SPEAK_GREETING": "false",
           "OPENAI_BASE_URL": llm.base_url, "PONO_LLM_MODEL": "scripted", "PONO_LOG_LEVEL": "WARNING",
           "PONO_METRICS_TOKEN": "soak", "PONO_CALL_MAX_S": str(60 * args.minutes + 600)}
    server = await asyncio.create_subprocess_exec(sys.executable, "-m", "pono", "serve", env=env)
    url = f"http://127.0.0.1:{port}"
    soak = Soak()
    recording: dict[str, Any] | None = None
    print(f"Pono soak: one call of {args.minutes} min, a question every {args.every_s:g} s, STT {args.stt_model}, "
          f"scripted LLM first token {round(args.ttft * 1000)} ms{', recorded' if args.record else ''}", flush=True)
    try:
        await wait_until_ready(url, 180, server)
        token = await recorded_default_persona(url, workdir / "data", env) if args.record else ""
        async with aiohttp.ClientSession() as http:
            started = time.monotonic()
            sampler = asyncio.create_task(sample_minutes(soak, http, url, server.pid, started, args.minutes))
            await soak_call(soak, url, question, started, args, llm, sampler if args.record else None)
            await sampler
            if args.record:
                recording = await check_recording(soak, http, url, token, workdir / "data", server.pid)
    finally:
        server.terminate()
        await server.wait()
        await llm.stop()
    report = summary(soak)
    print(f"  RSS minute 1: {report['rss_first_mb']} MB, minute {args.minutes}: {report['rss_last_mb']} MB "
          f"({report['rss_change_pct']:+.1f} %)")
    print(f"  voice-to-voice trend: {report['v2v_slope_ms_per_minute']} ms per minute (least squares over "
          f"{report['turns']} turns); {report['late_turns']} turns started late, {report['lost_turns']} unanswered")
    if recording is not None:
        print_recording(recording, report, args.minutes)
        report["recording"] = recording
    if args.json:
        print("JSON " + json.dumps(report))
    if recording is not None and not recording.get("duration_ok"):
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
