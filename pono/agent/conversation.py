"""What the LLM sees of a call: the system prompt and the turns as the caller actually heard them."""

from __future__ import annotations

from typing import Any

APOLOGY = "Sorry, I can't think clearly right now. Please try again in a moment."


class Conversation:
    def __init__(self, system_prompt: str, max_messages: int = 12) -> None:
        self.system_prompt = system_prompt
        self.max_messages = max_messages
        self.messages: list[dict[str, Any]] = []

    def add_user(self, text: str) -> None:
        # Two caller turns in a row (the agent was cut off before saying anything) merge into one.
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages[-1]["content"] += " " + text
        else:
            self.messages.append({"role": "user", "content": text})

    def add_agent(self, text: str, *, interrupted: bool = False) -> None:
        if not text:
            return
        # The model must know it was cut off, or it will assume the caller heard everything.
        content = f"{text} [interrupted by the caller]" if interrupted else text
        self.messages.append({"role": "assistant", "content": content})

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
