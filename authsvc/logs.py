"""Structured JSON logs with a redaction filter: no PHI leaves through a log line."""

from __future__ import annotations

import json
import logging
import re
import sys

_REDACT = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9_\-\.]+")
_SAFE_EXTRA = {"payer_id", "case_id", "order_id", "actor", "status", "attempt", "event"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; CR/LF inside values are escaped by JSON itself."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        data = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _REDACT.sub(r"\1[redacted]", message),
        }
        for key in _SAFE_EXTRA:
            if key in record.__dict__:
                data[key] = record.__dict__[key]
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type only: messages and tracebacks may carry argument values.
            data["exception"] = record.exc_info[0].__name__
        return json.dumps(data, ensure_ascii=True)


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
