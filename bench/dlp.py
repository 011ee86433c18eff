"""DLP quality and cost on the labelled corpus in tests/fixtures.

    .venv/bin/python bench/dlp.py

Prints precision, recall and F1 per entity type, and the time per utterance (p50, p99).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from pono.agent.dlp.engine import DEFAULT_POLICY
from pono.agent.dlp.evaluate import evaluate, load_corpus

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "dlp_corpus.jsonl"


def main() -> None:
    corpus = load_corpus(CORPUS)
    scores, errors = evaluate(DEFAULT_POLICY, corpus)
    print(f"DLP on {len(corpus)} labelled lines ({CORPUS.name})")
    print(f"  {'entity':<18} {'precision':>9} {'recall':>7} {'F1':>6} {'tp':>4} {'fp':>4} {'fn':>4}")
    for kind, s in sorted(scores.items()):
        print(f"  {kind:<18} {s.precision:>9.3f} {s.recall:>7.3f} {s.f1:>6.3f} {s.tp:>4} {s.fp:>4} {s.fn:>4}")
    for error in errors:
        print("   ", error)
    texts = [str(line["text"]) for line in corpus]
    for text in texts[:50]:
        DEFAULT_POLICY.scan(text)  # warm caches (phonenumbers metadata, compiled patterns)
    timings = []
    for _ in range(5):
        for text in texts:
            started = time.perf_counter()
            DEFAULT_POLICY.scan(text)
            timings.append((time.perf_counter() - started) * 1000)
    timings.sort()
    print(f"  time per utterance: p50 {statistics.median(timings):.2f} ms, "
          f"p99 {timings[int(0.99 * (len(timings) - 1))]:.2f} ms ({len(timings)} scans)")


if __name__ == "__main__":
    main()
