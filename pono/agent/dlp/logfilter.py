"""Redaction in logs: a filter on every handler, so no log line carries personal data or secrets.

Pono never logs transcripts on purpose; this catches what slips in through exception messages and
third-party libraries (a DSN in a driver error, a token in a URL).
"""

from __future__ import annotations

import logging

from pono.agent.dlp.engine import DEFAULT_POLICY


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = DEFAULT_POLICY.scan(message, "redact").text
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def install_log_redaction() -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
