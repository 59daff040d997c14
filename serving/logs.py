"""Server logging: one JSON object per line on stderr, with secrets redacted.

    configure(json=True, level="INFO")
    log.info("request finished", extra={"request_id": rid, "status": "stop", "prompt_tokens": 12})
    -> {"ts": "2025-01-01T12:00:00.123+00:00", "level": "INFO", "logger": "serving.server",
        "msg": "request finished", "request_id": "...", "status": "stop", "prompt_tokens": 12}

Redaction guard: fields whose name says they hold a secret (authorization, password,
secret, credential, cookie, api_key, private_key, or a last word "token" such as
bearer_token; not counts such as prompt_tokens or data such as token_ids) are written
as "[redacted]", also inside nested dicts; "Bearer <credential of 8+ characters>" in
any string, the message included, becomes "Bearer [redacted]".
"""

from __future__ import annotations

import datetime
import json as _json
import logging
import re
import sys

REDACTED = "[redacted]"
_SECRET_WORDS = frozenset({"authorization", "password", "passwd", "secret", "secrets", "credential",
                           "credentials", "cookie", "apikey", "passphrase"})
# An RFC 6750 credential (token68) of 8+ characters, so prose like "bearer token" survives.
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/-]{8,}=*")

# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _words(key: str) -> list[str]:
    """"bearerToken" / "bearer-token" / "BEARER_TOKEN" -> ["bearer", "token"]."""
    key = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", key.lower()) if w]


def is_secret_key(key: str) -> bool:
    """Whether a field named `key` is taken to hold a secret (see the module docstring)."""
    words = _words(str(key))
    if not words:
        return False
    if _SECRET_WORDS.intersection(words):
        return True
    if words[-1] in ("token", "auth"):
        return True
    return words[-2:] in (["api", "key"], ["private", "key"], ["secret", "key"])


def redact(value):
    """`value` with secret-named dict fields replaced and bearer credentials masked."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(k) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _BEARER.sub(r"\1 " + REDACTED, value)
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (ISO-8601, UTC, ms), level, logger, msg, the
    record's `extra` fields, and exc (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _json.dumps(redact(entry), default=str, ensure_ascii=False)


class RedactingTextFormatter(logging.Formatter):
    """Plain text lines (for a terminal) with bearer credentials masked in the message."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


_handler: logging.Handler | None = None


def configure(json: bool = True, level: str | int = "INFO", stream=None) -> logging.Handler:
    """Send all logging to `stream` (default stderr), as JSON lines or plain text.

    Sets the root logger's level and installs one handler; calling again replaces the
    handler this function installed before (other handlers are left alone). Returns it.
    """
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else RedactingTextFormatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)  # Python warnings become records too, not raw stderr text
    _handler = handler
    return handler
