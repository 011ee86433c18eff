"""Which words of the agent's reply the caller actually heard, from the transport's playout position."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SpokenPiece:
    text: str
    start_s: float  # position on the transport's playout clock
    end_s: float


class PlayoutTracker:
    def __init__(self) -> None:
        self.pieces: list[SpokenPiece] = []

    def add(self, text: str, start_s: float, duration_s: float) -> None:
        self.pieces.append(SpokenPiece(text, start_s, start_s + duration_s))

    @property
    def end_s(self) -> float:
        return self.pieces[-1].end_s if self.pieces else 0.0

    def heard_text(self, played_s: float) -> str:
        """The text played up to `played_s`; a piece cut mid-way keeps its words in proportion."""
        heard: list[str] = []
        for piece in self.pieces:
            if played_s >= piece.end_s:
                heard.append(piece.text)
                continue
            if played_s > piece.start_s:
                words = piece.text.split()
                fraction = (played_s - piece.start_s) / max(piece.end_s - piece.start_s, 1e-6)
                cut = int(len(words) * fraction)
                if cut:
                    heard.append(" ".join(words[:cut]))
            break
        return " ".join(heard)
