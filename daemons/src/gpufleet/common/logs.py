"""Logging set-up shared by the daemons, with a filter that keeps secrets out of logs."""

from __future__ import annotations

import logging
import re
import sys

# Bearer tokens, our own token formats and URL passwords are masked wherever they appear.
_SECRET_PATTERNS = [
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1***"),
    (re.compile(r"\b(gf[a-z]{0,3}_)[A-Za-z0-9_-]{8,}"), r"\1***"),
    (re.compile(r"(://[^:/@\s]*:)[^@\s]+@"), r"\1***@"),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def setup_logging(name: str, level: str = "INFO") -> logging.Logger:
    root = logging.getLogger()
    if not any(getattr(h, "_gpufleet", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(RedactingFilter())
        handler._gpufleet = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    return logging.getLogger(name)
