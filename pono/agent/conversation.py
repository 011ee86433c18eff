"""What the LLM sees of a call: the system prompt and the turns as the caller actually heard them."""

from __future__ import annotations

from typing import Any

APOLOGY = "Sorry, I can't think clearly right now. Please try again in a moment."


MAX_USER_TURN_CHARS = 4000  # a merged caller turn keeps its newest words up to this size
MAX_KEPT_MESSAGES = 200  # older messages are dropped: only the newest `max_messages` are ever sent


class Conversation:
    """The messages of one call, bounded: a caller turn is capped at `max_user_chars` (its newest words are
    kept) and at most `max_kept` messages are held, so a flood of text or a long call cannot make every LLM
    request grow without limit. `prompt()` sends the system prompt and the newest `max_messages`."""

    def __init__(self, system_prompt: str, max_messages: int = 12, *, max_user_chars: int = MAX_USER_TURN_CHARS,
                 max_kept: int = MAX_KEPT_MESSAGES) -> None:
        self.system_prompt = system_prompt
        self.max_messages = max_messages
        self.max_user_chars = max_user_chars
        self.max_kept = max(max_kept, max_messages)
        self.messages: list[dict[str, Any]] = []

    def add_user(self, text: str) -> None:
        # Two caller turns in a row (the agent was cut off before saying anything) merge into one.
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages[-1]["content"] = self._capped(self.messages[-1]["content"] + " " + text)
        else:
            self.messages.append({"role": "user", "content": self._capped(text)})
            self._trim()

    def _capped(self, text: str) -> str:
        if len(text) <= self.max_user_chars:
            return text
        return "…" + text[-(self.max_user_chars - 1):]

    def _trim(self) -> None:
        # Drop the oldest messages, never leaving a tool result without its call at the front.
        excess = len(self.messages) - self.max_kept
        if excess > 0:
            del self.messages[:excess]
            while self.messages and self.messages[0]["role"] == "tool":
                del self.messages[0]

    def replace_user_text(self, old: str, new: str) -> None:
        """Replace the caller's words `old` by `new` in the newest user message that holds them (a merged
        message holds several turns): DLP redacting an earlier turn after the fact."""
        for message in reversed(self.messages):
            if message["role"] == "user" and old in (message["content"] or ""):
                message["content"] = message["content"].replace(old, new)
                return

    def add_agent(self, text: str, *, interrupted: bool = False) -> None:
        if not text:
            return
        # The model must know it was cut off, or it will assume the caller heard everything.
        content = f"{text} [interrupted by the caller]" if interrupted else text
        self.messages.append({"role": "assistant", "content": content})
        self._trim()

    def add_tool_round(self, text: str, calls: list[dict[str, Any]], results: list[dict[str, Any]],
                       at: int | None = None) -> None:
        """A tool call and its result go in together, so an interruption can never split them. `at` is
        where the round began: a barge-in during a slow tool may have added turns since."""
        at = len(self.messages) if at is None else at
        self.messages[at:at] = [{"role": "assistant", "content": text or None, "tool_calls": calls}, *results]

    def prompt(self, pending_user: str | None = None) -> list[dict[str, Any]]:
        """The messages to send; `pending_user` is a caller turn not yet committed (preemptive replies)."""
        recent = [dict(m) for m in self.messages[-self.max_messages:]]
        if pending_user:
            if recent and recent[-1]["role"] == "user":
                recent[-1]["content"] += " " + pending_user
            else:
                recent.append({"role": "user", "content": pending_user})
        if len(self.messages) > self.max_messages:
            # A cut window must not open on an agent turn or a tool result without its call.
            while recent and recent[0]["role"] != "user":
                recent = recent[1:]
        return [{"role": "system", "content": self.system_prompt}, *recent]
