"""Smart Turn v3.2 alone (pono/voice/endpoint.py): its cost per call, and its scores on espeak-ng speech.

    .venv/bin/python bench/end_of_turn.py [--runs 20] [--renderings 5] [--silence-ms 0 200 500]

Prints the median (and p90) features and inference time per call on one thread, and for each sentence of
three kinds (complete questions, the same cut mid-way, sentences trailing off in "and" / "so") the model's
probability over several renderings: sox dithers when it resamples espeak's output, so each rendering
differs a little, and with synthetic prosody that alone moves some scores a lot. --silence-ms replaces
espeak's own trailing silence (about 390 ms) with that much, as a call would cut the turn when the VAD
first hears silence.

Synthetic voices are no proof of accuracy on human speech: these figures show cost and stability, not how
often the model is right on people. The sentences are meant to be shared with a whole-pipeline turn
benchmark (bench/turns.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pono.voice.endpoint import COMPLETE_THRESHOLD, SmartTurn, smart_turn_features

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import espeak  # the tests' espeak-ng + sox helper: 16 kHz int16

COMPLETE = (
    "I would like to book a table for two at seven tonight.",
    "Can you tell me the opening hours of the store?",
    "What time does the next train to Boston leave?",
    "Could you send the invoice to my email address?",
    "Is there a pharmacy open near me right now?",
)
CUT = (
    "I would like to book a",
    "Can you tell me the",
    "What time does the next",
    "Could you send the invoice to my",
    "Is there a pharmacy open near",
)
TRAILING = (
    "I would like to book a table for two and",
    "Can you tell me the opening hours and",
    "I called yesterday about my order so",
    "The delivery was late again so",
    "I need to change my address and",
)
CASES = {"complete": COMPLETE, "cut": CUT, "trailing": TRAILING}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def with_silence(pcm: np.ndarray, silence_ms: int | None) -> np.ndarray:
    """`pcm` with its trailing silence (below -40 dBFS) replaced by `silence_ms` of zeros; None keeps it."""
    if silence_ms is None:
        return pcm
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 300)
    end = int(loud[-1]) + 1 if loud.size else 0
    return np.concatenate([pcm[:end], np.zeros(silence_ms * 16, np.int16)])


def timings(model: SmartTurn, pcm: np.ndarray, runs: int) -> None:
    start = time.perf_counter()
    model.probability(pcm)
    first = time.perf_counter() - start
    features, inference = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        f = smart_turn_features(pcm)
        t1 = time.perf_counter()
        model.infer(f)
        features.append((t1 - t0) * 1000)
        inference.append((time.perf_counter() - t1) * 1000)
    print(f"first call {first * 1000:.0f} ms; over {runs} calls: features median {statistics.median(features):.1f} ms"
          f" (p90 {pct(features, 0.9):.1f}), inference median {statistics.median(inference):.1f} ms"
          f" (p90 {pct(inference, 0.9):.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="timed calls")
    parser.add_argument("--renderings", type=int, default=5, help="espeak renderings of each sentence")
    parser.add_argument("--silence-ms", type=int, nargs="*", default=[],
                        help="trailing silence to test instead of espeak's own (ms)")
    args = parser.parse_args()

    start = time.perf_counter()
    model = SmartTurn()
    print(f"model loaded in {(time.perf_counter() - start) * 1000:.0f} ms from {model.path}")
    silences: list[int | None] = [None, *args.silence_ms]
    with tempfile.TemporaryDirectory(prefix="pono-eot-") as tmp:
        workdir = Path(tmp)
        timings(model, espeak(COMPLETE[0], workdir / "timing.wav"), args.runs)
        header = "  ".join("espeak" if s is None else f"{s} ms" for s in silences)
        print(f"\nP(complete), min/median/max over {args.renderings} renderings; trailing silence: {header}")
        for kind, sentences in CASES.items():
            above = total = 0
            for i, text in enumerate(sentences):
                clips = [espeak(text, workdir / f"{kind}{i}-{r}.wav") for r in range(args.renderings)]
                cells = []
                for silence in silences:
                    probs = [model.probability(with_silence(c, silence)) for c in clips]
                    above += sum(p > COMPLETE_THRESHOLD for p in probs)
                    total += len(probs)
                    cells.append(f"{min(probs):.2f}/{statistics.median(probs):.2f}/{max(probs):.2f}")
                print(f"  {kind:8s} {'  '.join(cells)}  {text!r}")
            print(f"  {kind}: {above}/{total} scored complete (> {COMPLETE_THRESHOLD})")


if __name__ == "__main__":
    main()
