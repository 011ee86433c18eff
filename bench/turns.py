"""Turn-taking of the whole pipeline, with the end-of-turn model on and off, in real aiortc calls.

    .venv/bin/python bench/turns.py [--stt-model tiny.en] [--voices espeak hibari piper] [--kinds ...] [--json]

Plays each case of tests/fixtures/turns/cases.json (complete questions, sentences with a 600-900 ms thinking
pause, sentences trailing off in "and" / "so" before a pause, backchannels and real interruptions said while
the agent speaks) into a call of its own to `pono serve` (a child process) with a scripted LLM (200 ms to the
first token, 50 tokens/s). The audio is made at run time from the text (bench/turn_cases.py). The server runs
twice: model on (PONO_END_OF_TURN_MODEL=true, Smart Turn v3.2) and off (silence alone, PONO_HANGOVER_MS=450).

Prints for each:
  - false cut-offs: paused and trailing sentences whose turn the server ended mid-way (more than one
    speech.stopped, i.e. more than one user turn);
  - false interruptions: backchannels that produced a barge_in event (and how many paused the agent and
    resumed it); interruptions that did cut the agent;
  - end-of-turn delay on complete questions, median and p90: the caller's last speech sample sent → the
    server's speech.stopped event (both clocks are this host's);
  - the word error rate of the live pipeline (the call's transcript.final texts) against offline transcription,
    by the same Whisper model and code path (SpeechModels.run_stt), of the same audio after the same Opus round
    trip (pono.testing.codec). 0 means the pipeline lost no words; it says nothing of Whisper's own accuracy.

Synthetic voices are no proof of accuracy on human speech: espeak and TTS prosody is not a person's. A recorded
set (tests/fixtures/turns/README.md) plays through the same code with --cases.
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
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import pct  # bench/latency.py: the same nearest-rank percentile
from turn_cases import CASES, KINDS, OVER_AGENT, Case, Voices, load_cases

from pono.agent.embedded import free_port
from pono.settings import Settings
from pono.signaling.ice import restrict_host_addresses
from pono.testing.caller import Caller
from pono.testing.codec import opus_round_trip
from pono.testing.ready import wait_until_ready
from pono.testing.scripted_llm import Script, ScriptedLLM

SHORT_REPLY = "Sure, I can help with that."
LONG_REPLY = (
    "Let me tell you about our restaurant. We open every day at noon and close at midnight. "
    "The kitchen serves fresh fish from the harbour, vegetables from our own garden, and bread baked "
    "every morning. On weekends there is live music in the courtyard, and children eat for free."
)
DISCLAIMER = ("Synthetic voices (espeak-ng, TTS) are no proof of accuracy on human speech: their prosody is not a "
              "person's. These figures compare configurations on the same audio; re-run with a recorded set.")


async def offline_transcripts(stt_model: str, workdir: Path, clips: dict[tuple[str, str], np.ndarray]
                              ) -> dict[tuple[str, str], str]:
    """What the server's own STT path hears of each clip after the caller → server Opus round trip."""
    from pono.voice.models import SpeechModels

    models = SpeechModels(Settings(data_dir=workdir / "offline", stt_model=stt_model, end_of_turn_model=False))
    await models.load()
    try:
        return {key: await models.run_stt(opus_round_trip(pcm)) for key, pcm in clips.items()}
    finally:
        models.close()


async def play(url: str, llm: ScriptedLLM, case: Case, clip: np.ndarray) -> dict[str, Any]:
    """One case in a call of its own: what the caller saw."""
    caller = Caller(url)
    try:
        await caller.connect()
        await caller.wait_open()
        await asyncio.sleep(0.5)  # jitter buffers settle, as a person says hello after pick-up
        over_agent = case.kind in OVER_AGENT
        llm.script.reply = LONG_REPLY if over_agent else SHORT_REPLY
        if over_agent:
            caller.send_text("Tell me about the restaurant")
            await caller.wait_for(lambda e: e["type"] == "call.state" and e["state"] == "speaking", 20)
            await asyncio.sleep(1.0)
        old = {id(e) for e in caller.events}
        caller.speak(clip)
        await caller.mic.speech_done.wait()
        assert caller.mic.last_speech_sent_at is not None
        sent_wall = time.time() - (time.monotonic() - caller.mic.last_speech_sent_at)

        def new(e: dict[str, Any]) -> bool:
            return id(e) not in old

        try:
            if case.kind == "backchannel":  # heard as an interruption, or paused and resumed, or neither
                await caller.wait_for(lambda e: new(e) and e["type"] in ("barge_in", "agent.resumed"), 4)
            else:
                stop = await caller.wait_for(lambda e: new(e) and e["type"] == "speech.stopped"
                                             and e["ts"] >= sent_wall - 0.05, 10)
                await caller.wait_for(lambda e: new(e) and e["type"] == "transcript.final"
                                      and e.get("source") == "voice" and e["ts"] >= stop["ts"], 15)
        except TimeoutError:
            pass
        await asyncio.sleep(0.3)
        events = [e for e in caller.events if new(e)]
    finally:
        await caller.hang_up()
    stops = [e for e in events if e["type"] == "speech.stopped"]
    final_stop = next((e for e in stops if e["ts"] >= sent_wall - 0.05), None)
    return {
        "id": case.id, "kind": case.kind,
        "turns": len(stops),
        "ignored": sum(bool(e.get("ignored")) for e in stops),
        "end_of_turn_p": [e.get("end_of_turn") for e in stops],
        "eot_delay_ms": None if final_stop is None else round(1000 * (final_stop["ts"] - sent_wall)),
        "barge_in": any(e["type"] == "barge_in" for e in events),
        "resumed": any(e["type"] == "agent.resumed" for e in events),
        "live": " ".join(e["text"] for e in events if e["type"] == "transcript.final"
                         and e.get("source") == "voice" and e.get("text")),
    }


async def run_server(label: str, extra_env: dict[str, str], args: argparse.Namespace, workdir: Path,
                     plays: list[tuple[str, Case, np.ndarray]]) -> list[dict[str, Any]]:
    """Start `pono serve` with `extra_env`, play every clip in a call of its own, stop it."""
    llm = ScriptedLLM(Script(reply=SHORT_REPLY, first_token_s=0.2, token_interval_s=0.02))
    await llm.start()
    port = free_port()
    env = {**os.environ, "PONO_PORT": str(port), "PONO_DATA_DIR": str(workdir / f"data-{label}"),
           "PONO_STT_MODEL": args.stt_model, "PONO_ICE_INTERFACES": '["127.0.0.1"]', "PONO_SPEAK_GREETING": "false",
           "OPENAI_BASE_URL": llm.base_url, "PONO_LLM_MODEL": "scripted", "PONO_LOG_LEVEL": "WARNING",
           "PONO_CALL_TOKENS_PER_MINUTE": "10000", **extra_env}
    server = await asyncio.create_subprocess_exec(sys.executable, "-m", "pono", "serve", env=env)
    url = f"http://127.0.0.1:{port}"
    results = []
    try:
        await wait_until_ready(url, 180, server)
        for i, (voice, case, clip) in enumerate(plays):
            result = await play(url, llm, case, clip)
            result["voice"] = voice
            results.append(result)
            print(f"  [{label} {i + 1}/{len(plays)}] {voice:6s} {case.id:16s} turns={result['turns']} "
                  f"barge_in={result['barge_in']} resumed={result['resumed']} eot={result['eot_delay_ms']} ms "
                  f"live={result['live']!r}", flush=True)
    finally:
        server.terminate()
        await server.wait()
        await llm.stop()
    return results


def word_errors(offline: str, live: str) -> tuple[int, int]:
    """(edits, reference words) of `live` against `offline`, ignoring case and punctuation."""
    import jiwer

    norm = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                          jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    if not offline.strip():
        return len(live.split()), 0
    out = jiwer.process_words(offline, live, reference_transform=norm, hypothesis_transform=norm)
    return out.substitutions + out.deletions + out.insertions, out.substitutions + out.deletions + out.hits


def summarize(results: list[dict[str, Any]], offline: dict[tuple[str, str], str]) -> dict[str, Any]:
    """The figures for one server run (all voices together, and per voice)."""
    def of(*kinds: str) -> list[dict[str, Any]]:
        return [r for r in results if r["kind"] in kinds]

    paused, backchannels, interruptions = of("thinking_pause", "trailing"), of("backchannel"), of("interruption")
    delays = [float(r["eot_delay_ms"]) for r in of("complete") if r["eot_delay_ms"] is not None]
    heard = of("complete", "thinking_pause", "trailing", "interruption")
    errors = [word_errors(offline[(r["voice"], r["id"])], r["live"]) for r in heard]
    whole = [e for r, e in zip(heard, errors, strict=True) if r["turns"] <= 1]  # turns the server kept whole
    mismatches = [{"voice": r["voice"], "id": r["id"], "turns": r["turns"], "offline": offline[(r["voice"], r["id"])],
                   "live": r["live"]} for r, (e, _) in zip(heard, errors, strict=True) if e]

    def wer(pairs: list[tuple[int, int]]) -> float | None:
        words = sum(n for _, n in pairs)
        return round(sum(e for e, _ in pairs) / words, 4) if words else None
    return {
        "cases": len(results),
        "false_cutoffs": sum(r["turns"] > 1 for r in paused), "paused_cases": len(paused),
        "false_cutoffs_by_kind": {k: sum(r["turns"] > 1 for r in of(k)) for k in ("thinking_pause", "trailing")},
        "backchannel_barge_ins": sum(r["barge_in"] for r in backchannels), "backchannels": len(backchannels),
        "backchannels_paused_resumed": sum(r["resumed"] for r in backchannels),
        "interruptions_cut": sum(r["barge_in"] for r in interruptions), "interruptions": len(interruptions),
        "complete_cut": sum(r["turns"] > 1 for r in of("complete")),
        "eot_delay_median_ms": round(statistics.median(delays)) if delays else None,
        "eot_delay_p90_ms": round(pct(delays, 0.9)) if delays else None, "eot_delays_measured": len(delays),
        "wer_live_vs_offline": wer(errors), "wer_words": sum(n for _, n in errors),
        "wer_whole_turns": wer(whole), "whole_turns": len(whole),
        "wer_mismatches": mismatches,
    }


def rate(n: int, of: int) -> str:
    return f"{n}/{of} ({100 * n / of:.0f}%)" if of else "-"


def report(summary: dict[str, dict[str, Any]], voices: list[str]) -> None:
    modes = list(summary)
    print("\nTurn-taking, live pipeline (" + ", ".join(voices) + "): " + " | ".join(modes))
    rows = [
        ("false cut-offs (paused + trailing)", lambda s: rate(s["false_cutoffs"], s["paused_cases"])),
        ("  thinking pause / trailing", lambda s: "{thinking_pause} / {trailing}".format(**s["false_cutoffs_by_kind"])),
        ("false interruptions (backchannel → barge_in)", lambda s: rate(s["backchannel_barge_ins"], s["backchannels"])),
        ("  backchannels that paused and resumed the agent", lambda s: rate(s["backchannels_paused_resumed"],
                                                                            s["backchannels"])),
        ("interruptions that cut the agent", lambda s: rate(s["interruptions_cut"], s["interruptions"])),
        ("complete questions cut in two", lambda s: rate(s["complete_cut"], s["eot_delays_measured"])),
        ("end-of-turn delay median / p90 (ms)", lambda s: f"{s['eot_delay_median_ms']} / {s['eot_delay_p90_ms']}"),
        ("WER live vs offline (same audio, Opus)", lambda s: f"{s['wer_live_vs_offline']} ({s['wer_words']} words)"),
        ("  on turns kept whole (one speech.stopped)", lambda s: f"{s['wer_whole_turns']} ({s['whole_turns']} clips)"),
    ]
    for name, cell in rows:
        print(f"  {name:50s} " + " | ".join(f"{cell(summary[m]):>22s}" for m in modes))
    for mode in modes:
        for m in summary[mode]["wer_mismatches"]:
            print(f"  [{mode}] {m['voice']} {m['id']} ({m['turns']} turns): offline {m['offline']!r} / "
                  f"live {m['live']!r}")
    print("\n" + DISCLAIMER)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stt-model", default="tiny.en")
    ap.add_argument("--voices", nargs="+", default=["espeak", "hibari", "piper"],
                    choices=["espeak", "hibari", "piper"])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--cases", type=Path, default=CASES, help="a cases.json (a recorded set, for one)")
    ap.add_argument("--modes", nargs="+", default=["on", "off"], choices=["on", "off"],
                    help="the end-of-turn model on, off (silence alone, 450 ms)")
    ap.add_argument("--per-kind", type=int, default=0, help="only the first N cases of each kind (0: all)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args()

    restrict_host_addresses(["127.0.0.1"])
    workdir = Path(tempfile.mkdtemp(prefix="pono-turns-"))
    cases = load_cases(args.cases, args.kinds)
    if args.per_kind:
        cases = [c for k in KINDS for c in [c for c in cases if c.kind == k][:args.per_kind]]
    voices = Voices(args.voices, workdir)
    for name, why in voices.skipped.items():
        print(f"voice {name} skipped: {why}")
    plays: list[tuple[str, Case, np.ndarray]] = []
    for case in cases:
        for voice in (["recorded"] if case.audio else voices.available):
            plays.append((voice, case, voices.clip(voice, case)))
    print(f"{len(plays)} clips ({len(cases)} cases × voices {voices.available}); STT {args.stt_model}; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    offline = await offline_transcripts(args.stt_model, workdir, {(v, c.id): pcm for v, c, pcm in plays})
    envs = {"on": {"PONO_END_OF_TURN_MODEL": "true"},
            "off": {"PONO_END_OF_TURN_MODEL": "false", "PONO_HANGOVER_MS": "450"}}
    labels = {"on": "model on", "off": "model off (450 ms silence)"}
    summary: dict[str, dict[str, Any]] = {}
    raw: dict[str, list[dict[str, Any]]] = {}
    for mode in args.modes:
        raw[mode] = await run_server(mode, envs[mode], args, workdir, plays)
        summary[labels[mode]] = summarize(raw[mode], offline)
    report(summary, voices.available)
    if args.json:
        print("JSON " + json.dumps({"stt_model": args.stt_model, "voices": voices.available, "summary": summary,
                                    "results": raw, "offline": {f"{v}/{i}": t for (v, i), t in offline.items()},
                                    "note": DISCLAIMER}))


if __name__ == "__main__":
    asyncio.run(main())
