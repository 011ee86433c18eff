"""Precision and recall of DLP on a labelled corpus (shared by the test and bench/dlp.py)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pono.agent.dlp.engine import DlpPolicy


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def load_corpus(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate(policy: DlpPolicy, corpus: list[dict[str, object]]) -> tuple[dict[str, Score], list[str]]:
    """Per-type scores; a finding counts when its type matches a labelled value it overlaps."""
    scores: dict[str, Score] = defaultdict(Score)
    errors: list[str] = []
    for line in corpus:
        text = str(line["text"])
        labels = []
        for entity in line["entities"]:  # type: ignore[attr-defined]
            start = text.index(entity["value"])
            labels.append((entity["type"], start, start + len(entity["value"])))
        found = [(f.entity_type, f.start, f.end) for f in policy.detect(text)]
        matched_labels = set()
        for kind, start, end in found:
            hit = next((i for i, (k, s, e) in enumerate(labels) if k == kind and start < e and s < end), None)
            if hit is None:
                scores[kind].fp += 1
                errors.append(f"FP {kind}: {text[start:end]!r} in {text!r}")
            elif hit not in matched_labels:
                matched_labels.add(hit)
                scores[kind].tp += 1
        for i, (kind, start, end) in enumerate(labels):
            if i not in matched_labels:
                scores[kind].fn += 1
                errors.append(f"FN {kind}: {text[start:end]!r} in {text!r}")
    return dict(scores), errors
