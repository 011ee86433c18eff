"""Cut a streamed reply into sentences, or clauses when a sentence runs long, for streaming TTS."""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*\s+|\n+")
_CLAUSE_END = re.compile(r"[,;:—–]\s+")
_MD_NOISE = re.compile(r"[*_`#]+")
# Where a phrase begins: a first piece may end before one of these words when no punctuation comes soon
# ("The store opens at nine | in the morning tomorrow."), the way a speaker breathes before a phrase.
_PHRASE_START = re.compile(
    r"\s+(?=(?:and|but|or|so|because|which|who|when|where|if|at|in|on|for|with|from|to|by|about|after|"
    r"before|until|since|while)\s)", re.IGNORECASE)
# A reply that opens like a question is not cut at a phrase start: the first piece would be spoken as a statement
# ("Would you like a table | for four?"); it still starts at its first comma or sentence end.
_QUESTION_START = re.compile(
    r"\s*(?:what|when|where|who|whom|whose|why|how|which|would|could|can|do|does|did|is|are|was|were|will|shall|"
    r"should|may|might|have|has|had|isn't|aren't|don't|doesn't|didn't|won't|wouldn't|couldn't)\b", re.IGNORECASE)


def speakable(text: str) -> str:
    """Strip markdown decoration the LLM may emit; TTS would read it aloud or choke on it."""
    return _MD_NOISE.sub("", text).strip()


class SentenceSplitter:
    """Feed text deltas; get back complete pieces to speak.

    The first piece of a reply is cut at a clause boundary (punctuation, or before a word that starts a
    phrase, unless the reply opens like a question) once it has `first_clause_words` words, so speech starts
    before the first sentence has arrived whole; later pieces are cut at clauses only when a sentence exceeds
    `max_chars`, so the prosody holds. `first_clause_words=None` cuts the first piece like the others (a text
    known whole, which need not start early).
    """

    def __init__(self, first_clause_words: int | None = 4, max_chars: int = 140) -> None:
        self.first_clause_words = first_clause_words
        self.max_chars = max_chars
        self._buffer = ""
        self._emitted = 0

    def feed(self, delta: str) -> list[str]:
        self._buffer += delta
        pieces: list[str] = []
        while True:
            piece = self._next_piece()
            if piece is None:
                break
            if speakable(piece):
                pieces.append(speakable(piece))
                self._emitted += 1
        return pieces

    def flush(self) -> list[str]:
        rest, self._buffer = speakable(self._buffer), ""
        return [rest] if rest else []

    def _next_piece(self) -> str | None:
        match = _SENTENCE_END.search(self._buffer)
        clause = next((c for c in _CLAUSE_END.finditer(self._buffer) if self._wants_clause(c)), None)
        if match and (clause is None or match.start() <= clause.start()):
            return self._take(match.end())
        if clause:
            return self._take(clause.end())
        if self._emitted == 0 and not match and self.first_clause_words is not None \
                and not _QUESTION_START.match(self._buffer):
            phrase = next((p for p in _PHRASE_START.finditer(self._buffer)
                           if len(self._buffer[:p.start()].split()) >= self.first_clause_words), None)
            if phrase is not None:
                return self._take(phrase.end())
        if len(self._buffer) > self.max_chars * 2:
            cut = self._buffer.rfind(" ", 0, self.max_chars * 2)
            return self._take(cut + 1 if cut > 0 else len(self._buffer))
        return None

    def _wants_clause(self, clause: re.Match[str]) -> bool:
        head = self._buffer[: clause.start()]
        if self._emitted == 0 and self.first_clause_words is not None:
            return len(head.split()) >= self.first_clause_words
        return len(head) >= self.max_chars

    def _take(self, end: int) -> str:
        piece, self._buffer = self._buffer[:end], self._buffer[end:]
        return piece


def split_all(text: str) -> list[str]:
    """Every piece of a complete text (a greeting, an operator's line), the unterminated tail included: whole
    sentences (clauses of long ones), since all of it is there to be synthesised."""
    splitter = SentenceSplitter(first_clause_words=None)
    return splitter.feed(text) + splitter.flush()
