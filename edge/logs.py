"""Structured logging: one JSON object a line on stderr (journald keeps it as is)."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from datetime import datetime, timezone

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


# Characters a terminal acts on rather than shows: C0/C1 controls (ESC starts sequences that retitle the window,
# clear the screen or move the cursor; CR overwrites the line), and Unicode bidi controls and line separators that
# reorder or split what is shown. Network text (any client may publish on an open broker) shows them as escapes.
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    return UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                           else f"\\u{ord(m.group()):04x}", text)


def utc_iso(timestamp: float | None = None) -> str:
    """ISO 8601 in UTC to the millisecond, `Z` (now, without `timestamp`): the MQTT payloads' times and the log
    lines', so that a log line and the message it is about read alike on a till whose clock is set to local time."""
    moment = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {"time": utc_iso(record.created), "level": record.levelname.lower(),
                "logger": record.name, "msg": record.getMessage()}
        body.update({k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None})
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def json_error_line(logger: str, message: str, **fields) -> str:
    """An error said outside logging (a command's last words) as the JSON log lines say theirs."""
    record = logging.LogRecord(logger, logging.ERROR, "", 0, message, (), None)
    record.__dict__.update(fields)
    return JsonFormatter().format(record)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD and v is not None)
        # a payload's key or a camera's error text reaches the terminal as it is shown, not as it acts
        return printable(f"{record.levelname.lower()} {record.name}: {record.getMessage()} {extras}".rstrip())


def setup_logging(level: str = "warning", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimitedLog:
    """At most `per_window` lines per key every `window_s`; what was held back is counted in the next line.

    For input the daemon does not control (payloads from the network): a flood must not flood the journal."""

    def __init__(self, logger: logging.Logger, per_window: int = 5, window_s: float = 10.0):
        self.logger, self.per_window, self.window_s = logger, per_window, window_s
        self._windows: dict[str, tuple[float, int, int]] = {}  # key -> (window start, logged, held back)

    def warning(self, key: str, message: str, **fields) -> bool:
        now = time.monotonic()
        start, logged, held = self._windows.get(key, (now, 0, 0))
        if now - start >= self.window_s:
            start, logged = now, 0
        if logged >= self.per_window:
            self._windows[key] = (start, logged, held + 1)
            return False
        self._windows[key] = (start, logged + 1, 0)
        self.logger.warning(message, extra={**fields, **({"suppressed_before": held} if held else {})})
        return True


class SummarizedLog:
    """One event that may come at every message (an outbox at its bound drops one at each add): the first is said
    at once, then at most one line every `every_s`, with how many came since the line before (`since_last_line`)
    and the fields of the latest, so a daemon at a bound for days writes a line a minute, not one a message.

    `flush()`, from a periodic tick, says what a burst that has stopped left uncounted in the journal."""

    def __init__(self, logger: logging.Logger, message: str, every_s: float = 60.0):
        self.logger, self.message, self.every_s = logger, message, every_s
        self._lock = threading.Lock()  # counted from several threads (the cameras', paho's)
        self._since_last_line = 0
        self._said_at: float | None = None  # monotonic time of the last line; None: never said
        self._level = logging.WARNING
        self._fields: dict = {}

    def count(self, level: int, events: int = 1, **fields) -> None:
        with self._lock:
            self._since_last_line += events
            self._level, self._fields = level, fields
        self.flush()

    def flush(self) -> None:
        with self._lock:
            now = time.monotonic()
            if not self._since_last_line or (self._said_at is not None and now - self._said_at < self.every_s):
                return
            events, self._since_last_line, self._said_at = self._since_last_line, 0, now
            level, fields = self._level, self._fields
        self.logger.log(level, self.message, extra={**fields, "since_last_line": events})
