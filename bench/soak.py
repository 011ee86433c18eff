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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from latency import espeak_question, metric

from pono.agent.embedded import free_port
from pono.signaling.ice import restrict_host_addresses
from pono.testing.caller import RATE, Caller
from pono.testing.ready import wait_until_ready
from pono.testing.scripted_llm import Script, ScriptedLLM

REPLY = "Sure, it is booked."  # short: the answer ends well before the next question
LAG_BUCKETS = "pono_event_loop_lag_seconds_bucket"


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
                    llm: ScriptedLLM) -> None:
    caller = Caller(url)
    try:
        await caller.connect()
        await caller.wait_open()
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
    finally:
        await caller.hang_up()


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
    print(f"Pono soak: one call of {args.minutes} min, a question every {args.every_s:g} s, STT {args.stt_model}, "
          f"scripted LLM first token {round(args.ttft * 1000)} ms", flush=True)
    try:
        await wait_until_ready(url, 180, server)
        async with aiohttp.ClientSession() as http:
            started = time.monotonic()
            sampler = asyncio.create_task(sample_minutes(soak, http, url, server.pid, started, args.minutes))
            await soak_call(soak, url, question, started, args, llm)
            await sampler
    finally:
        server.terminate()
        await server.wait()
        await llm.stop()
    report = summary(soak)
    print(f"  RSS minute 1: {report['rss_first_mb']} MB, minute {args.minutes}: {report['rss_last_mb']} MB "
          f"({report['rss_change_pct']:+.1f} %)")
    print(f"  voice-to-voice trend: {report['v2v_slope_ms_per_minute']} ms per minute (least squares over "
          f"{report['turns']} turns); {report['late_turns']} turns started late, {report['lost_turns']} unanswered")
    if args.json:
        print("JSON " + json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
