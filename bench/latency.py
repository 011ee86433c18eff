"""Voice-to-voice latency of Pono, measured at an aiortc caller.

Starts `pono serve` as a child process (its own CPU and event loop, like production) against a scripted
OpenAI-compatible LLM with a fixed time to first token, then places N sequential calls and N concurrent
calls. Each call plays an espeak-ng question in real time and waits for the agent's spoken answer.

    .venv/bin/python bench/latency.py --stt-model base --calls 5 --ttft 0.1
    .venv/bin/python bench/latency.py --stt-model tiny.en --calls 3 --ttft 0.2 --tokens-per-s 50 \
        --reply "The store opens at nine in the morning tomorrow."

Prints voice-to-voice latency (last caller speech sample sent → first agent audio received) as median
and p90, the server's per-stage breakdown, the time from the LLM's first token to the first audio sent
(what the first TTS chunk costs: waiting for enough text, then synthesising it), CPU seconds per call
minute and the worst event-loop lag. --reply and --tokens-per-s set what the scripted LLM streams, and how
fast (one word a token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from pono.agent.embedded import free_port
from pono.events import LATENCY_MARKS
from pono.signaling.ice import restrict_host_addresses
from pono.testing.caller import Caller
from pono.testing.ready import wait_until_ready
from pono.testing.scripted_llm import Script, ScriptedLLM

QUESTION = "Please book a table for two at seven tonight"
REPLY = "Of course. Your table for two is booked for seven tonight. Is there anything else?"


def espeak_question(workdir: Path) -> np.ndarray:
    raw, wav = workdir / "q.raw.wav", workdir / "q.wav"
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(raw), QUESTION], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav)], check=True)
    import wave

    with wave.open(str(wav)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    loud = np.flatnonzero(np.abs(pcm) > 300)
    return pcm[: loud[-1] + 1]  # end on the last speech sample, so "last sample sent" means what it says


async def tool_persona(http: aiohttp.ClientSession, url: str, data_dir: Path, env: dict[str, str]) -> str:
    """An admin key (through the CLI, as a user would) and a persona with the current_datetime tool."""
    created = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pono", "users", "create", "--role", "admin", "--name", "bench", "--print-token",
        env={**env, "PONO_DATA_DIR": str(data_dir)}, stdout=asyncio.subprocess.PIPE)
    out, _ = await created.communicate()
    token = out.decode().strip().splitlines()[-1]
    body = {"name": "bench-tools", "system_prompt": "Be brief.", "tools": ["current_datetime"]}
    async with http.post(f"{url}/api/personas", json=body, headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 201, await r.text()
    return "bench-tools"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_call(url: str, question: np.ndarray, persona: str | None = None) -> dict[str, object]:
    caller = Caller(url)
    try:
        await caller.connect(persona=persona)
        await caller.wait_open()
        await asyncio.sleep(0.5)  # let the jitter buffers settle, as a person says hello after pick-up
        started = time.monotonic()
        caller.speak(question)
        await caller.mic.speech_done.wait()
        sent_wall = time.time() - (time.monotonic() - caller.mic.last_speech_sent_at)  # type: ignore[operator]
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 60)
        latency = next(e for e in caller.events if e["type"] == "latency" and e["turn"] == final["turn"])
        await asyncio.sleep(0.3)
        assert caller.mic.last_speech_sent_at is not None
        heard_at = caller.first_sound_after(caller.mic.last_speech_sent_at)
        transcript = next((e["text"] for e in caller.events if e["type"] == "transcript.final"), "")
        v2v = None if heard_at is None else heard_at - caller.mic.last_speech_sent_at
        way_in = float(latency["t0"]) - sent_wall  # last speech sample sent → server saw silence begin
        server_part = float(latency["marks"]["first_audio_sent"])
        return {
            "v2v": v2v,
            "way_in": way_in,
            "way_out": None if v2v is None else v2v - way_in - server_part,
            "marks": latency["marks"],
            "transcript": transcript,
            "call_s": time.monotonic() - started + 0.5,
        }
    finally:
        await caller.hang_up()


async def metric(http: aiohttp.ClientSession, url: str, token: str, name: str) -> float:
    async with http.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}) as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


def summarize(label: str, results: list[dict[str, object]]) -> dict[str, object]:
    v2v = [float(r["v2v"]) for r in results if r["v2v"] is not None]  # type: ignore[arg-type]
    stages: dict[str, list[float]] = {m: [] for m in LATENCY_MARKS}
    for r in results:
        for mark, value in r["marks"].items():  # type: ignore[union-attr]
            if mark in stages:
                stages[mark].append(value)
    to_audio = []  # the LLM's first token → the first audio sent: the first TTS chunk's wait and synthesis
    for r in results:
        marks: dict[str, float] = r["marks"]  # type: ignore[assignment]
        if "first_audio_sent" in marks and "llm_first_token" in marks:
            to_audio.append(marks["first_audio_sent"] - marks["llm_first_token"])
    return {
        "label": label,
        "calls": len(results),
        "llm_first_token_to_audio_median_ms": round(1000 * statistics.median(to_audio)) if to_audio else None,
        "v2v_median_ms": round(1000 * statistics.median(v2v)) if v2v else None,
        "v2v_p90_ms": round(1000 * pct(v2v, 0.9)) if v2v else None,
        "stage_median_ms": {m: round(1000 * statistics.median(v)) for m, v in stages.items() if v},
        "way_in_median_ms": round(1000 * statistics.median(float(r["way_in"]) for r in results)),  # type: ignore[arg-type]
        "way_out_median_ms": round(1000 * statistics.median(
            float(r["way_out"]) for r in results if r["way_out"] is not None)),  # type: ignore[arg-type]
        "transcripts": sorted({str(r["transcript"]) for r in results}),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stt-model", default="base")
    ap.add_argument("--calls", type=int, default=5, help="N: sequential calls, then N concurrent calls")
    ap.add_argument("--ttft", type=float, default=0.1, help="scripted LLM time to first token (s)")
    ap.add_argument("--reply", default=REPLY, help="what the scripted LLM answers")
    ap.add_argument("--tokens-per-s", type=float, default=50.0, help="the scripted LLM's streaming rate")
    ap.add_argument("--hangover-ms", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    ap.add_argument("--tool", action="store_true", help="also N sequential calls whose turn makes one tool call")
    args = ap.parse_args()

    restrict_host_addresses(["127.0.0.1"])
    workdir = Path(tempfile.mkdtemp(prefix="pono-bench-"))
    question = espeak_question(workdir)
    llm = ScriptedLLM(Script(reply=args.reply, first_token_s=args.ttft, token_interval_s=1 / args.tokens_per_s))
    await llm.start()
    port = free_port()
    env = {**os.environ, "PONO_PORT": str(port), "PONO_DATA_DIR": str(workdir / "data"),
           "PONO_STT_MODEL": args.stt_model, "PONO_ICE_INTERFACES": '["127.0.0.1"]', "PONO_SPEAK_GREETING": "false",
           "OPENAI_BASE_URL": llm.base_url, "PONO_LLM_MODEL": "scripted", "PONO_LOG_LEVEL": "WARNING",
           "PONO_METRICS_TOKEN": "bench", "PONO_CALL_TOKENS_PER_MINUTE": "10000"}
    if args.hangover_ms is not None:
        env["PONO_HANGOVER_MS"] = str(args.hangover_ms)
    server = await asyncio.create_subprocess_exec(sys.executable, "-m", "pono", "serve", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_ready(url, 120, server)
        async with aiohttp.ClientSession() as http:
            cpu0 = cpu_seconds(server.pid)
            sequential = [await one_call(url, question) for _ in range(args.calls)]
            concurrent = await asyncio.gather(*(one_call(url, question) for _ in range(args.calls)))
            with_tool: list[dict[str, object]] = []
            if args.tool:
                persona = await tool_persona(http, url, workdir / "data", env)
                for _ in range(args.calls):
                    # Each turn: the LLM asks for current_datetime, then answers with its result.
                    llm.script.responses = [{"tool_calls": [{"name": "current_datetime", "arguments": {}}]},
                                            {"text": args.reply}]
                    with_tool.append(await one_call(url, question, persona))
            cpu = cpu_seconds(server.pid) - cpu0
            worst_lag = await metric(http, url, "bench", "pono_event_loop_lag_max_seconds")
        call_minutes = sum(float(r["call_s"]) for r in [*sequential, *concurrent]) / 60  # type: ignore[arg-type]
        report = {
            "stt_model": args.stt_model,
            "llm_ttft_ms": round(args.ttft * 1000),
            "sequential": summarize("sequential", sequential),
            "concurrent": summarize(f"{args.calls} concurrent", list(concurrent)),
            "with_tool": summarize("one tool round", with_tool) if with_tool else None,
            "cpu_s_per_call_minute": round(cpu / call_minutes, 2),
            "event_loop_worst_lag_ms": round(worst_lag * 1000, 1),
        }
    finally:
        server.terminate()
        await server.wait()
        await llm.stop()
    print(f"Pono voice-to-voice latency: STT {args.stt_model}, scripted LLM first token {report['llm_ttft_ms']} ms, "
          f"{args.tokens_per_s:g} tokens/s, reply {args.reply!r}")
    for key in ("sequential", "concurrent", "with_tool"):
        s = report[key]
        if s is None:
            continue
        print(f"  {s['label']:>14}: {s['calls']} calls, voice-to-voice median {s['v2v_median_ms']} ms, "
              f"p90 {s['v2v_p90_ms']} ms")
        print("      server stages (median ms after end of speech): "
              + ", ".join(f"{k} {v}" for k, v in s["stage_median_ms"].items()))
        print(f"      LLM first token → first audio sent: median {s['llm_first_token_to_audio_median_ms']} ms")
        print(f"      way in (last speech sample sent → server VAD sees silence): {s['way_in_median_ms']} ms; "
              f"way out (server sends first audio → caller hears it): {s['way_out_median_ms']} ms")
        print(f"      transcripts: {s['transcripts']}")
    if report["with_tool"]:
        added = report["with_tool"]["v2v_median_ms"] - report["sequential"]["v2v_median_ms"]
        print(f"  a tool round (current_datetime) adds {added} ms to voice-to-voice (median vs. sequential)")
    print(f"  CPU seconds per call minute (server process): {report['cpu_s_per_call_minute']}")
    print(f"  event loop worst lag: {report['event_loop_worst_lag_ms']} ms")
    if args.json:
        print("JSON " + json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
