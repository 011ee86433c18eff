"""Pono against Pipecat 1.14, side by side: voice-to-voice latency on the same machine, models and caller.

    .venv/bin/python bench/pipecat_side_by_side.py --calls 5 --concurrent 3
    unshare --net sh -c 'ip link set lo up && exec "$@"' sh \
        .venv/bin/python bench/pipecat_side_by_side.py --calls 5 --concurrent 3 --json

Pipecat lives in a virtual environment of its own, so that its dependencies never touch Pono's .venv
(the path is --pipecat-python; the bench stops, printing this, when it is missing):

    python3 -m venv /tmp/pipecat-venv
    /tmp/pipecat-venv/bin/pip install "pipecat-ai[webrtc,silero,whisper,runner]==1.14.*" "hibari-tts==0.2.1"

(`webrtc`: aiortc for SmallWebRTCTransport; `silero`: the VAD, onnxruntime only since 1.x; `whisper`:
faster-whisper; `runner`: fastapi, which Pipecat's SmallWebRTCRequestHandler imports; hibari-tts: Pono's
TTS engine, which Pipecat has no service for.)

Method
- Two servers run for the whole bench, each a child process with its own CPU and event loop: `pono serve`
  (configured as bench/latency.py configures it: the STT model given, no greeting, logs at WARNING) and
  bench/pipecat_bot.py under the Pipecat venv's python (its docstring says what it is built from and
  which Pipecat settings it uses: Pipecat's defaults). Both use the same models: Silero VAD, Smart Turn
  v3.2 at pauses (Pono's default end-of-turn model and Pipecat's default stop strategy), faster-whisper
  from the same model folder (tiny.en by default; int8 on the CPU), hibari TTS with the default voice,
  and each its own ScriptedLLM (pono.testing.scripted_llm, started here) streaming the same reply with
  the same time to first token (--ttft, 200 ms by default) and rate (50 tokens/s).
- The caller is pono.testing.caller for both: an aiortc peer connection that plays the same espeak-ng
  question (bench/latency.py's) in real-time 20 ms frames and records what comes back. For Pono it POSTs
  its offer to /api/calls; for Pipecat, PipecatCaller POSTs it to the bot's /api/offer (Pipecat's
  SmallWebRTCRequestHandler). Everything is on 127.0.0.1, with no STUN (iceServers=[]).
- Voice-to-voice, identical for both: the wall time of the question's last sample handed to aiortc → the
  arrival of the packet carrying the first received sample above 500 after it (plus the sample's place in
  the packet). bench/latency.py times it by sample count instead, which is free of arrival jitter but
  puts the answer too early when a server's sender falls behind: Pono's re-anchors its clock (skipping
  samples), Pipecat's sends the backlog in a burst that the caller's jitter buffer (16 packets) partly
  drops. That figure is printed beside it (TimedCaller says more): a gap between the two is a stalled
  sender, not latency saved. Each server's worst event-loop lag over the bench is printed too.
- Each call waits until the server says it is ready (Pono: the data channel is open; Pipecat: its
  pipeline started and `on_client_connected` fired), then 0.5 s, then speaks once; it ends when the
  first answer sample is heard (or after --turn-timeout). One call to each server is placed first and
  not counted (--warmup), as Pono and Pipecat both pay one-time costs on their first call. Calls are
  --gap (1 s) apart, so one server's hang-up work (Pono writes the call to Postgres; Pipecat tears its
  pipeline down) does not land in the other's turn.
- N sequential calls interleave the servers (Pono, Pipecat, Pono, Pipecat…); then C concurrent calls
  to Pono, then C to Pipecat, --rounds times. A concurrent round connects all C calls, waits until all
  are ready, and has them speak at the same moment, so every turn overlaps the others.
- The LLM requests each ScriptedLLM received give what each server transcribed (the last user message)
  and how many requests a call made (Pono may start a reply early, on a pause, and drop it).

Limits
- The voice is synthetic: espeak-ng, one short question, no noise. Smart Turn scores espeak speech
  "complete" readily, so the end-of-turn wait is the short one on both servers; real callers pause and
  trail off, and both servers then wait longer.
- Pipecat runs as its defaults and examples set it up, not tuned: VAD stop_secs 0.2, Smart Turn with its
  3 s fallback, sentence aggregation before TTS, Whisper's beam size 5 and faster-whisper's 4 CPU threads
  (Pono: greedy, 2 threads), a Whisper model loaded per call, on the event loop, when the call starts (so
  the bot's worst loop lag includes those loads), and used cold for its one turn (all in
  bench/pipecat_bot.py's docstring). A tuned Pipecat bot would be faster; so might a tuned Pono.
- The TTS service for hibari is ours (Pipecat has none); by default it cuts hibari's leading ~0.3 s of
  silence as Pono does (--no-trim: play it as hibari makes it).
- This measures the servers on loopback: no network, no browser jitter buffer, no phone codec.
- Small N on a shared machine gives noisy figures: print the load average with them, and rerun.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from latency import QUESTION, REPLY, espeak_question, metric, pct  # bench/latency.py: the same question and reply

from pono.agent.embedded import free_port
from pono.signaling.ice import restrict_host_addresses
from pono.signaling.webrtc import first_channel
from pono.testing.caller import RATE, Caller, SdpEdit
from pono.testing.ready import wait_until_ready
from pono.testing.scripted_llm import Script, ScriptedLLM
from pono.voice.stt import resolve_model_dir

BENCH = Path(__file__).resolve().parent
DEFAULT_PIPECAT_PYTHON = Path("/tmp/pipecat-venv/bin/python")
PIPECAT_VERSION = "1.14"
INSTALL = ('python3 -m venv /tmp/pipecat-venv && /tmp/pipecat-venv/bin/pip install '
           '"pipecat-ai[webrtc,silero,whisper,runner]==1.14.*" "hibari-tts==0.2.1"')
PIPECAT_CHECK = ("import importlib.metadata as m, aiortc, faster_whisper, fastapi, hibari, pipecat; "
                 "print(m.version('pipecat-ai'))")


@dataclass
class Heard:
    """Seconds from the question's last sample sent to the answer's first sample received: by the arrival
    of the packet that carried it (the figure), and by sample count (a cross-check)."""

    arrival: float
    sample_clock: float


class TimedCaller(Caller):
    """pono.testing.caller.Caller that also notes when each received frame arrived.

    Caller.first_sound_after (bench/latency.py) times the answer by sample count from the call's first
    packet: free of arrival jitter, but right only while the server's audio clock never slips. A sender that
    falls behind and re-anchors its clock (Pono's does once it is 0.2 s behind: pono/signaling/audio_out.py)
    sends fewer samples than wall time passed, so the count puts the answer too early. So the figure here is
    the arrival of the packet that carries the first loud sample (what "received" means; loopback adds
    little jitter), and the sample count, restarted from the frames that arrive just after the question
    ended, is kept beside it: where the two differ, a server's audio clock slipped during the turn.
    """

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.arrivals: list[float] = []  # when each received frame arrived
        self.offsets: list[int] = []  # where it starts in recording()

    async def _record(self, track: MediaStreamTrack) -> None:
        samples = 0
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if self.first_arrival is None:
                    self.first_arrival = now
                pcm = self.to_48k(first_channel(frame).astype(np.int16), frame.sample_rate)
                self.arrivals.append(now)
                self.offsets.append(samples)
                samples += pcm.size
                self.received.append(pcm)

    def answer_heard(self, sent: float, threshold: int = 500) -> Heard | None:
        """When the first sample above threshold received after `sent` arrived (its frame's arrival, plus its
        place in the frame), and when it plays by sample count from the frames that arrived within 0.2 s
        after `sent` (the least delayed one: late delivery only adds)."""
        first = bisect.bisect_right(self.arrivals, sent)
        if first >= len(self.arrivals):
            return None
        audio = np.concatenate(self.received[first:])
        loud = np.flatnonzero(np.abs(audio) > threshold)
        if loud.size == 0:
            return None
        sample = self.offsets[first] + int(loud[0])
        anchors = range(first, min(first + 10, len(self.arrivals)))
        clock = min(self.arrivals[i] - self.offsets[i] / RATE for i in anchors)  # wall time of sample 0
        frame = bisect.bisect_right(self.offsets, sample) - 1
        return Heard(self.arrivals[frame] + (sample - self.offsets[frame]) / RATE - sent, clock + sample / RATE - sent)


class PipecatCaller(TimedCaller):
    """pono.testing.caller.Caller, signalling with the Pipecat bot instead of Pono's /api/calls.

    The offer goes to the bot's /api/offer (Pipecat's SmallWebRTCRequestHandler) and the answer's pc_id
    names the call. There is no data channel (Pipecat's transport needs none); readiness is asked of the
    bot, and the bot closes the call on /api/hangup.
    """

    async def connect(self, *, audio: bool = True, persona: str | None = None, edit_offer: SdpEdit | None = None,
                      edit_answer: SdpEdit | None = None) -> dict[str, Any]:
        if audio:
            self.pc.addTrack(self.mic)
        self.pc.on("track", self._on_track)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        async with self.http.post(f"{self.base_url}/api/offer", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"offer refused: {r.status} {await r.text()}")
            answer: dict[str, Any] = await r.json()
        self.call_id = answer["pc_id"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        return answer

    async def wait_open(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # pc_id holds a '#': quote it
            async with self.http.get(f"{self.base_url}/api/ready/{quote(self.call_id, safe='')}") as r:
                if r.status != 200:
                    raise RuntimeError(f"the Pipecat bot does not know call {self.call_id}: {r.status}")
                if (await r.json())["ready"]:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("the Pipecat pipeline did not start")
            await asyncio.sleep(0.02)

    async def hang_up(self) -> int:
        status = 0
        if self.call_id:
            async with self.http.post(f"{self.base_url}/api/hangup/{quote(self.call_id, safe='')}") as r:
                status = r.status
        await self.close()
        return status


@dataclass
class Server:
    name: str
    url: str
    caller: type[TimedCaller]
    llm: ScriptedLLM
    sequential: list[Heard | None] = field(default_factory=list)
    concurrent: list[Heard | None] = field(default_factory=list)
    requests_per_call: list[float] = field(default_factory=list)


async def connect(server: Server) -> TimedCaller:
    caller = server.caller(server.url)
    try:
        await caller.connect()
        await caller.wait_open()
    except BaseException:
        await caller.close()
        raise
    return caller


async def speak_and_time(caller: TimedCaller, question: np.ndarray, timeout: float) -> Heard | None:
    """Speak the question; when the answer's first sample was heard (None: no answer within timeout)."""
    caller.speak(question)
    await caller.mic.speech_done.wait()
    sent = caller.mic.last_speech_sent_at
    assert sent is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        heard = caller.answer_heard(sent)
        if heard is not None:
            return heard
        await asyncio.sleep(0.05)
    return None


async def calls(server: Server, question: np.ndarray, count: int, timeout: float) -> list[Heard | None]:
    """`count` calls at once: all connect, all get ready, then all speak at the same moment."""
    requests_before = len(server.llm.script.requests)
    callers: list[TimedCaller] = []
    try:
        for caller in await asyncio.gather(*(connect(server) for _ in range(count)), return_exceptions=True):
            if isinstance(caller, BaseException):
                raise caller
            callers.append(caller)
        await asyncio.sleep(0.5)  # let the jitter buffers settle, as a person says hello after pick-up
        timings = await asyncio.gather(*(speak_and_time(c, question, timeout) for c in callers))
        await asyncio.sleep(0.3)  # let a late preemptive request or two arrive before counting them
    finally:
        await asyncio.gather(*(c.hang_up() for c in callers), return_exceptions=True)
    server.requests_per_call.append(round((len(server.llm.script.requests) - requests_before) / count, 2))
    return list(timings)


def transcripts(llm: ScriptedLLM) -> list[str]:
    """What the server sent the LLM as the caller's words: the last user message of each request."""
    heard = []
    for request in llm.script.requests:
        users = [m for m in request.get("messages", []) if m.get("role") == "user"]
        if users:
            content = users[-1].get("content")
            if isinstance(content, list):  # content parts
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            heard.append(str(content).strip())
    return sorted(set(heard))


def check_pipecat(python: Path) -> str:
    """The Pipecat venv's pipecat-ai version; exits loudly, with the install command, when it is unusable."""
    problem = None
    if not python.exists():
        problem = f"{python} does not exist"
    else:
        done = subprocess.run([str(python), "-c", PIPECAT_CHECK], capture_output=True, text=True, check=False,
                              env=child_env())
        version = done.stdout.strip()
        if done.returncode != 0:
            problem = f"{python} cannot import what the bot needs:\n{done.stderr.strip()[-2000:]}"
        elif not version.startswith(PIPECAT_VERSION + "."):
            problem = f"{python} has pipecat-ai {version}, not {PIPECAT_VERSION}.*"
        else:
            return version
    sys.exit(f"error: no usable Pipecat {PIPECAT_VERSION} environment: {problem}\n"
             f"Install it (its own venv, never Pono's .venv):\n    {INSTALL}\n"
             "or pass --pipecat-python PATH/TO/VENV/bin/python.")


def child_env() -> dict[str, str]:
    """The environment for the Pipecat bot: nothing of Pono's venv leaks in, and nothing is downloaded."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:]


async def wait_for_bot(url: str, process: asyncio.subprocess.Process, log: Path, timeout: float) -> None:
    try:
        await wait_until_ready(url, timeout, process, path="/health")
    except RuntimeError as exc:
        raise RuntimeError(f"the Pipecat bot: {exc}; its log {log}:\n{tail(log)}") from None
    except TimeoutError:
        raise TimeoutError(f"the Pipecat bot did not answer within {timeout} s; its log: {log}") from None


def summary(values: list[Heard | None]) -> dict[str, Any]:
    heard = [v.arrival for v in values if v is not None]
    clock = [v.sample_clock for v in values if v is not None]
    return {
        "calls": len(values),
        "answered": len(heard),
        "median_ms": round(1000 * statistics.median(heard)) if heard else None,
        "p90_ms": round(1000 * pct(heard, 0.9)) if heard else None,
        "all_ms": [None if v is None else round(1000 * v.arrival) for v in values],
        "by_sample_count_median_ms": round(1000 * statistics.median(clock)) if clock else None,
        "by_sample_count_all_ms": [None if v is None else round(1000 * v.sample_clock) for v in values],
    }


def ratio(pono: dict[str, Any], pipecat: dict[str, Any], key: str) -> float | None:
    if pono[key] is None or not pipecat[key]:
        return None
    return round(pono[key] / pipecat[key], 2)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=5, help="N sequential calls to each server, interleaved")
    ap.add_argument("--concurrent", type=int, default=3, help="C calls at once to each server (0: none)")
    ap.add_argument("--rounds", type=int, default=1, help="concurrent rounds per server (C calls each)")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted calls to each server first")
    ap.add_argument("--stt-model", default="tiny.en", help="tiny.en or base, for both servers")
    ap.add_argument("--ttft", type=float, default=0.2, help="scripted LLM time to first token (s)")
    ap.add_argument("--tokens-per-s", type=float, default=50.0, help="the scripted LLM's streaming rate")
    ap.add_argument("--gap", type=float, default=1.0,
                    help="seconds between calls, so one server's hang-up work does not land in the other's turn")
    ap.add_argument("--turn-timeout", type=float, default=30.0, help="seconds to wait for an answer")
    ap.add_argument("--pipecat-python", type=Path, default=DEFAULT_PIPECAT_PYTHON,
                    help=f"the Pipecat venv's python (default {DEFAULT_PIPECAT_PYTHON})")
    ap.add_argument("--trim", action=argparse.BooleanOptionalAction, default=True,
                    help="Pipecat's hibari service cuts hibari's leading silence as Pono does (default: on)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, data)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args()

    version = check_pipecat(args.pipecat_python)
    load_start = loadavg()
    print(f"load average at start: {load_start} ({os.cpu_count()} CPUs)", flush=True)

    restrict_host_addresses(["127.0.0.1"])
    workdir = Path(tempfile.mkdtemp(prefix="pono-vs-pipecat-"))
    question = espeak_question(workdir)
    model_dir = resolve_model_dir(args.stt_model, workdir / "models")

    def scripted() -> ScriptedLLM:
        return ScriptedLLM(Script(reply=REPLY, first_token_s=args.ttft, token_interval_s=1 / args.tokens_per_s))

    pono_llm, pipecat_llm = scripted(), scripted()
    await pono_llm.start()
    await pipecat_llm.start()

    pono_port, bot_port = free_port(), free_port()
    env = {**os.environ, "PONO_PORT": str(pono_port), "PONO_DATA_DIR": str(workdir / "data"),
           "PONO_STT_MODEL": args.stt_model, "PONO_ICE_INTERFACES": '["127.0.0.1"]', "PONO_SPEAK_GREETING": "false",
           "OPENAI_BASE_URL": pono_llm.base_url, "PONO_LLM_MODEL": "scripted", "PONO_LOG_LEVEL": "WARNING",
           "PONO_CALL_TOKENS_PER_MINUTE": "10000", "PONO_METRICS_TOKEN": "bench"}
    pono = await asyncio.create_subprocess_exec(sys.executable, "-m", "pono", "serve", env=env)
    bot_log = workdir / "pipecat_bot.log"
    with bot_log.open("wb") as log:
        bot = await asyncio.create_subprocess_exec(
            str(args.pipecat_python), str(BENCH / "pipecat_bot.py"), "--port", str(bot_port),
            "--llm-url", pipecat_llm.base_url, "--whisper-model", str(model_dir),
            "--trim" if args.trim else "--no-trim", env=child_env(), stdout=log, stderr=log)
    servers = [
        Server("Pono", f"http://127.0.0.1:{pono_port}", TimedCaller, pono_llm),
        Server("Pipecat", f"http://127.0.0.1:{bot_port}", PipecatCaller, pipecat_llm),
    ]
    try:
        await asyncio.gather(wait_until_ready(servers[0].url, 180, pono),
                             wait_for_bot(servers[1].url, bot, bot_log, 180))
        for _ in range(args.warmup):
            for server in servers:
                await calls(server, question, 1, args.turn_timeout)
                await asyncio.sleep(args.gap)
        for server in servers:
            server.requests_per_call.clear()
        for i in range(args.calls):
            for server in servers:
                (latency,) = await calls(server, question, 1, args.turn_timeout)
                server.sequential.append(latency)
                await asyncio.sleep(args.gap)
                shown = "no answer" if latency is None else f"{1000 * latency.arrival:.0f} ms"
                print(f"  sequential {i + 1}/{args.calls} {server.name}: {shown}", flush=True)
        for r in range(args.rounds if args.concurrent > 0 else 0):
            for server in servers:
                timings = await calls(server, question, args.concurrent, args.turn_timeout)
                server.concurrent.extend(timings)
                await asyncio.sleep(args.gap)
                shown = ", ".join("none" if t is None else f"{1000 * t.arrival:.0f}" for t in timings)
                print(f"  {args.concurrent} concurrent, round {r + 1}/{args.rounds} {server.name}: {shown} ms",
                      flush=True)
        async with aiohttp.ClientSession() as http:
            pono_lag = await metric(http, servers[0].url, "bench", "pono_event_loop_lag_max_seconds")
            async with http.get(f"{servers[1].url}/health") as r:
                pipecat_lag = float((await r.json())["worst_loop_lag_s"])
    finally:
        for process in (pono, bot):
            if process.returncode is None:
                process.terminate()
        for process in (pono, bot):
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()
        await pono_llm.stop()
        await pipecat_llm.stop()

    report: dict[str, Any] = {
        "pipecat_version": version,
        "stt_model": args.stt_model,
        "llm_ttft_ms": round(args.ttft * 1000),
        "llm_tokens_per_s": args.tokens_per_s,
        "question": QUESTION,
        "reply": REPLY,
        "pipecat_tts_trim": args.trim,
        "load_average_start": load_start,
        "load_average_end": loadavg(),
        "cpus": os.cpu_count(),
        "pono_event_loop_worst_lag_ms": round(pono_lag * 1000, 1),
        "pipecat_event_loop_worst_lag_ms": round(pipecat_lag * 1000, 1),
    }
    for key, label in (("sequential", f"{args.calls} sequential"),
                       ("concurrent", f"{args.concurrent} concurrent x {args.rounds}")):
        pono_s = summary(getattr(servers[0], key))
        pipecat_s = summary(getattr(servers[1], key))
        report[key] = {"label": label, "pono": pono_s, "pipecat": pipecat_s,
                       "ratio_median": ratio(pono_s, pipecat_s, "median_ms"),
                       "ratio_p90": ratio(pono_s, pipecat_s, "p90_ms")}
    for server in servers:
        report[f"{server.name.lower()}_transcripts"] = transcripts(server.llm)
        report[f"{server.name.lower()}_llm_requests_per_call"] = server.requests_per_call

    print(f"\nPono vs Pipecat {version}, voice-to-voice (caller's last speech sample sent → first agent audio "
          "sample received), same aiortc caller, loopback")
    print(f"  STT faster-whisper {args.stt_model} (int8, CPU) on both; scripted LLM first token "
          f"{report['llm_ttft_ms']} ms, {args.tokens_per_s:g} tokens/s; TTS hibari 'heart' "
          f"({'leading silence cut on both' if args.trim else 'Pipecat side untrimmed'})")
    print(f"  load average: {load_start} at start, {report['load_average_end']} at end ({os.cpu_count()} CPUs, "
          "shared with other work)")
    for key in ("sequential", "concurrent"):
        part = report[key]
        if not part["pono"]["calls"]:
            continue
        p, q = part["pono"], part["pipecat"]
        print(f"  {part['label']:>22}: Pono median {p['median_ms']} ms, p90 {p['p90_ms']} ms "
              f"({p['answered']}/{p['calls']} answered) | Pipecat median {q['median_ms']} ms, p90 {q['p90_ms']} ms "
              f"({q['answered']}/{q['calls']} answered) | Pono/Pipecat median {part['ratio_median']}, "
              f"p90 {part['ratio_p90']}")
        print(f"  {'':>22}  (by sample count, bench/latency.py's way: Pono median {p['by_sample_count_median_ms']} "
              f"ms, Pipecat median {q['by_sample_count_median_ms']} ms; lower where a server's audio clock slipped)")
    print(f"  worst event-loop lag over the bench (a 100 ms timer's lateness): Pono "
          f"{report['pono_event_loop_worst_lag_ms']} ms, Pipecat bot {report['pipecat_event_loop_worst_lag_ms']} ms")
    for server in servers:
        name = server.name.lower()
        print(f"  {server.name} heard: {report[f'{name}_transcripts']}; "
              f"LLM requests per call: {report[f'{name}_llm_requests_per_call']}")
    if args.json:
        print("JSON " + json.dumps(report))
    if args.keep:
        print(f"  work folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
