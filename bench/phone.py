"""Phone figures: voice-to-voice latency over SIP and a Twilio-style stream, concurrent SIP calls with media,
and SIP call set-ups per second under sipp load.

Starts `pono serve` as a child process with SIP on loopback, against a scripted OpenAI-compatible LLM.

    .venv/bin/python bench/phone.py --stt-model base --calls 5

- SIP voice-to-voice: a scripted SIP phone (pono/testing/sip_caller.py) sends the question as paced PCMU RTP;
  latency is last speech packet sent → first audible reply packet received.
- Twilio voice-to-voice: streamdouble plays the question; latency is its last speech frame → first agent media.
- Concurrent SIP calls: N phones, each asking once and holding the line; paced output is late when a packet
  arrives more than 20 ms after its slot on the 20 ms grid. Prints p99 lateness per N, and the largest N
  whose p99 stays within 20 ms.
- Set-ups per second: sipp runs INVITE/200/ACK/BYE at increasing rates; prints the highest rate where every
  call succeeds, and the achieved rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

from pono.agent.embedded import free_port
from pono.signaling.audio_out import Resampler
from pono.testing.ready import wait_until_ready
from pono.testing.scripted_llm import Script, ScriptedLLM
from pono.testing.sip_caller import SipCaller

sys.path.insert(0, str(Path(__file__).parent))
from latency import espeak_question, pct

REPLY = "Of course. Your table for two is booked for seven tonight."
TOKEN = "bench-provider"


async def sip_v2v(sip: tuple[str, int], question: np.ndarray) -> float | None:
    phone = SipCaller(sip)
    assert await phone.call() == 200
    try:
        await asyncio.sleep(0.5)
        phone.say(question, 16000)
        await phone.speech_sent.wait()
        assert phone.speech_ended_at is not None
        for _ in range(300):
            if (heard := phone.first_sound_after(phone.speech_ended_at)) is not None:
                return heard - phone.speech_ended_at
            await asyncio.sleep(0.1)
        return None
    finally:
        await phone.bye()


async def twilio_v2v(url: str, wav: Path, speech_s: float) -> float | None:
    from streamdouble.api import run_scenario
    from streamdouble.session import SessionConfig

    scenario = wav.parent / "bench-scenario.yaml"
    scenario.write_text(f"name: bench\nsteps:\n  - say: {wav}\n  - wait_for: {{event: mark, timeout: 30}}\n")
    report = await run_scenario(url, scenario, config=SessionConfig(response_timeout_s=30, quiet_period_s=0.3))
    if report.result.first_audio_at is None:
        return None
    return report.result.first_audio_at - (report.result.started_at + speech_s)


async def concurrent_lateness(sip: tuple[str, int], question: np.ndarray, calls: int, hold_s: float) -> float:
    """p99 arrival lateness (ms) of Pono's paced RTP across `calls` simultaneous calls that each ask once."""
    phones = [SipCaller(sip, caller=f"+1555{i:07d}") for i in range(calls)]
    statuses = await asyncio.gather(*(p.call() for p in phones))
    if any(s != 200 for s in statuses):
        raise RuntimeError(f"{statuses.count(200)} of {calls} calls were answered")
    for i, phone in enumerate(phones):  # questions spread over the first seconds, as real calls are
        asyncio.get_running_loop().call_later(0.5 + 3 * i / calls, phone.say, question, 16000)
    await asyncio.sleep(hold_s)
    lateness: list[float] = []
    for phone in phones:
        lateness += phone.arrival_lateness_ms(skip_s=1.0)  # after the call's first second has settled
    await asyncio.gather(*(p.bye() for p in phones))
    return pct(lateness, 0.99)


async def sipp_setups(sip_port: int, rate: int, calls: int) -> tuple[bool, float]:
    """Run `calls` sipp call set-ups at `rate` per second; (all succeeded, achieved set-ups per second)."""
    sipp = shutil.which("sipp")
    if sipp is None:
        raise SystemExit("sipp is not installed (Debian sip-tester): run scripts/install.sh --test")
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sipp, f"127.0.0.1:{sip_port}", "-sf", str(Path(__file__).parent / "sip" / "setup.xml"), "-s", "agent",
        "-i", "127.0.0.1", "-p", "0", "-r", str(rate), "-m", str(calls), "-l", str(rate * 2), "-nostdin",
        "-timeout", "120s", "-timeout_error", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    code = await process.wait()
    return code == 0, calls / (time.monotonic() - started)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stt-model", default="base")
    ap.add_argument("--calls", type=int, default=5, help="sequential calls per voice-to-voice figure")
    ap.add_argument("--levels", default="5,10,20,30,40,60", help="concurrent SIP call counts to try")
    ap.add_argument("--hold", type=float, default=12.0, help="seconds each concurrency level holds its calls")
    ap.add_argument("--rates", default="10,20,40,80,160", help="sipp call set-up rates (per second) to try")
    ap.add_argument("--parts", default="v2v,concurrency,setups", help="which figures to measure")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="pono-phone-bench-"))
    question = espeak_question(workdir)
    wav = workdir / "question.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)  # what a phone network carries
        w.writeframes(Resampler(8000)(question, 16000).tobytes())
    llm = ScriptedLLM(Script(reply=REPLY, first_token_s=0.1, token_interval_s=0.02))
    await llm.start()
    port, sip_port = free_port(), free_port()
    env = {**os.environ, "PONO_PORT": str(port), "PONO_DATA_DIR": str(workdir / "data"),
           "PONO_STT_MODEL": args.stt_model, "PONO_SPEAK_GREETING": "false", "OPENAI_BASE_URL": llm.base_url,
           "PONO_LLM_MODEL": "scripted", "PONO_LOG_LEVEL": "WARNING", "PONO_SIP_HOST": "127.0.0.1",
           "PONO_SIP_PORT": str(sip_port), "PONO_SIP_MAX_CALLS": "1000", "PONO_MAX_CALLS": "1000",
           "PONO_TWILIO_TOKEN": TOKEN}
    server = await asyncio.create_subprocess_exec(sys.executable, "-m", "pono", "serve", env=env)
    url = f"http://127.0.0.1:{port}"
    sip = ("127.0.0.1", sip_port)
    try:
        await wait_until_ready(url, 120, server)
        print(f"Pono phone figures: STT {args.stt_model}, scripted LLM first token 100 ms")
        parts = set(args.parts.split(","))
        if "v2v" in parts:
            await voice_to_voice(sip, f"ws://127.0.0.1:{port}/api/phone/twilio?token={TOKEN}", question, wav,
                                 args.calls)
        if "concurrency" in parts:
            await max_concurrent(sip, question, [int(x) for x in args.levels.split(",")], args.hold)
        if "setups" in parts:
            await setups(sip_port, [int(x) for x in args.rates.split(",")])
    finally:
        server.terminate()
        await server.wait()
        await llm.stop()


async def voice_to_voice(sip: tuple[str, int], stream_url: str, question: np.ndarray, wav: Path,
                         calls: int) -> None:
    sip_results = [await sip_v2v(sip, question) for _ in range(calls)]
    twilio_results = [await twilio_v2v(stream_url, wav, len(question) / 16000) for _ in range(calls)]
    for label, results in (("SIP (PCMU RTP)", sip_results), ("Twilio stream", twilio_results)):
        got = [r for r in results if r is not None]
        print(f"  voice-to-voice, {label}: {len(got)}/{len(results)} answered, "
              f"median {round(1000 * statistics.median(got)) if got else None} ms, "
              f"p90 {round(1000 * pct(got, 0.9)) if got else None} ms")


async def max_concurrent(sip: tuple[str, int], question: np.ndarray, levels: list[int], hold: float) -> None:
    best = 0
    for level in levels:
        try:
            p99 = await concurrent_lateness(sip, question, level, hold)
        except RuntimeError as exc:
            print(f"  {level} concurrent SIP calls: {exc}")
            break
        print(f"  {level} concurrent SIP calls with media: p99 paced-output lateness {p99:.1f} ms")
        if p99 > 20:
            break
        best = level
        await asyncio.sleep(2)
    print(f"  maximum concurrent SIP calls with p99 lateness within 20 ms: {best}")


async def setups(sip_port: int, rates: list[int]) -> None:
    best_rate, achieved = 0, 0.0
    for rate in rates:
        ok, per_second = await sipp_setups(sip_port, rate, rate * 5)
        print(f"  sipp at {rate} set-ups/s: {'all succeeded' if ok else 'failures'}, "
              f"achieved {per_second:.1f} set-ups/s")
        if not ok:
            break
        best_rate, achieved = rate, per_second
        await asyncio.sleep(2)
    print(f"  SIP call set-ups per second (every call INVITE→200→ACK→BYE→200): {achieved:.1f} "
          f"(offered {best_rate}/s)")


if __name__ == "__main__":
    asyncio.run(main())
