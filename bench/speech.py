"""Final-transcript latency of Pono's streaming STT with N concurrent callers.

Each synthetic caller streams espeak-ng questions in real time (20 ms frames, partial transcripts on, as in a
call), starting at staggered moments, and asks for the final transcript the moment its speech ends. The
latency is from the end of speech to the final's text. Engines:
- `local`: the in-process engine without batching (one clip per Whisper call),
- `batched`: the in-process engine with cross-call batching,
- `worker`: a `pono speech-worker` child process, reached over its WebSocket protocol.

    .venv/bin/python bench/speech.py --stt-model tiny.en --calls 1 2 4 8 16 --engines local batched worker

Prints p50 and p90 per engine and N, and the largest N whose p90 stays within --target-ms. With --fidelity it
prints word error rates per encoder window instead (PONO_STT_FINAL_WINDOW_S):

    .venv/bin/python bench/speech.py --stt-model base --fidelity 30 20 15 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pono.agent.embedded import free_port
from pono.settings import Settings
from pono.voice.models import SpeechModels

SHORT_ANSWERS = ("Yes", "No thanks", "Hello", "Thanks, goodbye", "Seven", "Maybe later")
QUESTIONS = ("Please book a table for two at seven tonight",
             "What is the weather in Paris tomorrow morning",
             "I would like to cancel my order number twelve",
             "Can I speak to somebody about my invoice",
             "Transfer me to a human please",
             "What time does the library open on Sunday")
FRAME = 320  # 20 ms at 16 kHz


def espeak(text: str, folder: Path, name: str) -> np.ndarray:
    raw, wav = folder / f"{name}.raw.wav", folder / f"{name}.wav"
    subprocess.run(["espeak-ng", "-s", "160", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav)], check=True)
    import wave

    with wave.open(str(wav)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    loud = np.flatnonzero(np.abs(pcm) > 300)
    return pcm[max(0, loud[0] - 1600): loud[-1] + 1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def caller(models: SpeechModels, questions: list[np.ndarray], rounds: int, stagger_s: float,
                 rng: random.Random) -> list[float]:
    """One caller: `rounds` questions in real time, each followed by a wait for its final; seconds per final."""
    await asyncio.sleep(rng.uniform(0, stagger_s))
    recognizer = models.recognizer("en", partial_interval_s=1.0, on_partial=lambda text: None)
    latencies: list[float] = []
    try:
        for _ in range(rounds):
            speech = rng.choice(questions)
            recognizer.reset()
            started = time.perf_counter()
            for i, at in enumerate(range(0, speech.size, FRAME)):
                recognizer.push(speech[at:at + FRAME])
                await asyncio.sleep(max(0.0, started + (i + 1) * 0.02 - time.perf_counter()))  # the wall clock
            ended = time.perf_counter()
            text = await recognizer.final()
            latencies.append(time.perf_counter() - ended)
            if not text:
                print("  (an empty final)", file=sys.stderr)
            await asyncio.sleep(rng.uniform(0.5, 1.5))  # the agent answers; the caller listens
    finally:
        recognizer.close()
    return latencies


async def run_engine(settings: Settings, counts: list[int], rounds: int, questions: list[np.ndarray],
                     target_ms: float) -> dict[int, tuple[float, float]]:
    models = SpeechModels(settings)
    await models.load()
    results: dict[int, tuple[float, float]] = {}
    try:
        for n in counts:
            rng = random.Random(n)
            per_caller = await asyncio.gather(*(caller(models, questions, rounds, 1.5, random.Random(rng.random()))
                                                for _ in range(n)))
            latencies = [x for c in per_caller for x in c]
            p50, p90 = 1000 * statistics.median(latencies), 1000 * pct(latencies, 0.9)
            results[n] = (p50, p90)
            print(f"  N={n:<3} finals={len(latencies):<3} p50={p50:6.0f} ms  p90={p90:6.0f} ms", flush=True)
    finally:
        models.close()
    within = [n for n, (_, p90) in results.items() if p90 <= target_ms]
    print(f"  largest N with p90 <= {target_ms:.0f} ms: {max(within) if within else 'none'}", flush=True)
    return results


def fidelity(model: str, device: str, workdir: Path, windows: list[float]) -> None:
    """Word error rate against the text espeak spoke, per encoder window (30 s is Whisper's own)."""
    import jiwer

    from pono.voice.speech.whisper import BatchedWhisper, Clip

    whisper = BatchedWhisper(model, workdir / "models", device)
    texts = [*QUESTIONS, *SHORT_ANSWERS]
    clips = [espeak(t, workdir, f"f{i}") for i, t in enumerate(texts)]
    norm = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                          jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    print(f"fidelity of {model}: WER against the spoken text, {len(texts)} clips ({len(SHORT_ANSWERS)} short)")
    for window in windows:
        started = time.perf_counter()
        heard = [whisper.transcribe_batch([Clip(pcm, window_s=window)])[0].text or "-" for pcm in clips]
        seconds = (time.perf_counter() - started) / len(clips)
        wer = jiwer.wer(list(texts), heard, reference_transform=norm, hypothesis_transform=norm)
        short = jiwer.wer(list(SHORT_ANSWERS), heard[len(QUESTIONS):], reference_transform=norm,
                          hypothesis_transform=norm)
        print(f"  window {window:4.0f} s: WER {wer:.3f} (short answers {short:.3f}), {1000 * seconds:.0f} ms a clip")


async def start_worker(settings: Settings, token: str, data_dir: Path) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    env = {**os.environ, "PONO_SPEECH_WORKER_TOKEN": token, "PONO_STT_MODEL": settings.stt_model,
           "PONO_DATA_DIR": str(data_dir), "PONO_HOST": "127.0.0.1",
           "PONO_STT_BATCH_WINDOW_MS": str(settings.stt_batch_window_ms),
           "PONO_STT_MAX_BATCH": str(settings.stt_max_batch)}
    worker = await asyncio.create_subprocess_exec(sys.executable, "-m", "pono", "speech-worker", "--port", str(port),
                                                  env=env)
    url = f"http://127.0.0.1:{port}"
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            try:
                async with http.get(f"{url}/ready") as r:
                    if r.status == 200:
                        return worker, url
            except aiohttp.ClientError:
                pass
            if worker.returncode is not None:
                raise RuntimeError("the speech worker exited")
            await asyncio.sleep(0.5)
    raise RuntimeError("the speech worker never became ready")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stt-model", default="tiny.en")
    ap.add_argument("--stt-device", default="auto")
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=3, help="questions per caller")
    ap.add_argument("--engines", nargs="+", default=["local", "batched", "worker"],
                    choices=["local", "batched", "worker"])
    ap.add_argument("--max-batch", type=int, default=8, help="for the batched engine and the worker")
    ap.add_argument("--batch-window-ms", type=float, default=20.0)
    ap.add_argument("--target-ms", type=float, default=500.0)
    ap.add_argument("--fidelity", type=float, nargs="*", metavar="WINDOW_S",
                    help="instead: word error rates for these encoder windows (default 30 20 15 10)")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="pono-speech-bench-"))
    if args.fidelity is not None:
        fidelity(args.stt_model, args.stt_device, workdir, args.fidelity or [30, 20, 15, 10])
        return
    questions = [espeak(q, workdir, f"q{i}") for i, q in enumerate(QUESTIONS)]
    base = {"data_dir": workdir, "stt_model": args.stt_model, "stt_device": args.stt_device}
    print(f"{args.stt_model} on {args.stt_device}, {os.cpu_count()} CPUs, {args.rounds} questions per caller")
    for engine in args.engines:
        if engine == "local":
            print("in-process, no batching")
            await run_engine(Settings(**base, stt_max_batch=1, stt_batch_window_ms=0), args.calls, args.rounds,
                             questions, args.target_ms)
        elif engine == "batched":
            print(f"in-process, batches of up to {args.max_batch} ({args.batch_window_ms:.0f} ms window)")
            await run_engine(Settings(**base, stt_max_batch=args.max_batch,
                                      stt_batch_window_ms=args.batch_window_ms),
                             args.calls, args.rounds, questions, args.target_ms)
        else:
            token = secrets.token_hex(16)
            settings = Settings(**base, stt_max_batch=args.max_batch, stt_batch_window_ms=args.batch_window_ms)
            worker, url = await start_worker(settings, token, workdir)
            print(f"speech worker ({url}), batches of up to {args.max_batch}")
            try:
                await run_engine(Settings(**base, speech_worker_url=url, speech_worker_token=token,
                                          speech_fallback="none"),
                                 args.calls, args.rounds, questions, args.target_ms)
            finally:
                worker.terminate()
                await worker.wait()


if __name__ == "__main__":
    asyncio.run(main())
