"""Log output for grpcmux: a level filter, a JSON and a pretty format, stdlib bridge.

Nothing happens at import time.  :func:`make_observer` builds the observer that
writes events in the chosen format and drops those below the chosen level;
:func:`bridge_stdlib_logging` sends Python ``logging`` records (grpcio's) into
``twisted.logger`` so they take the same path.  The tap installs both under twistd.
"""

from __future__ import annotations

import json
import logging
import re
import time as _time
from datetime import datetime, timezone
from typing import IO, Any, Callable, Optional

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    PredicateResult,
    formatEvent,
)
from twisted.python.failure import Failure

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
}
_ABBREVIATIONS = {
    LogLevel.debug: "DBG",
    LogLevel.info: "INF",
    LogLevel.warn: "WRN",
    LogLevel.error: "ERR",
    LogLevel.critical: "CRT",
}
_LEVEL_NAMES = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warning",
    LogLevel.error: "error",
    LogLevel.critical: "critical",
}
# Keys of events from twisted.python.log (legacy) that are no user fields.
_LEGACY_KEYS = frozenset(
    ("message", "format", "isError", "system", "time", "why", "failure", "printed")
)
_RESERVED = frozenset(("time", "level", "message", "namespace", "error", "traceback"))


def _level_of(event: dict) -> LogLevel:
    level = event.get("log_level")
    if level in _LEVEL_NAMES:
        return level
    return LogLevel.error if event.get("isError") else LogLevel.info


def _namespace(event: dict) -> str:
    """The event's namespace; for twisted.python.log events, their 'system'."""
    namespace = event.get("log_namespace") or ""
    if namespace == "log_legacy" and event.get("system") not in (None, "-"):
        return str(event["system"])
    return namespace


def _message(event: dict) -> str:
    text = formatEvent(event)
    if not text and "log_failure" in event:
        text = event["log_failure"].getErrorMessage()
    return text


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return str(value)


def format_json(event: dict) -> str:
    """One JSON object per line: time (RFC 3339, UTC), level, message, namespace,
    the event's own fields (client_id, remote_address, ...), and error/traceback."""
    when = datetime.fromtimestamp(event.get("log_time", _time.time()), timezone.utc)
    record = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": _LEVEL_NAMES.get(_level_of(event), "info"),
        "message": _message(event),
    }
    if _namespace(event):
        record["namespace"] = _namespace(event)
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in _RESERVED:
            continue
        record[key] = _json_value(value)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def format_pretty(event: dict) -> str:
    """Human text: local time, level abbreviation, namespace, message, traceback."""
    when = datetime.fromtimestamp(event.get("log_time", _time.time()))
    level = _ABBREVIATIONS.get(_level_of(event), "INF")
    namespace = _namespace(event) or "-"
    line = f"{when:%Y-%m-%d %H:%M:%S} {level} [{namespace}] {_message(event)}\n"
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        line += failure.getTraceback()
    return line


FORMATTERS: dict[str, Callable[[dict], str]] = {
    "json": format_json,
    "pretty": format_pretty,
}


# Twisted's own info lines for every listener and factory:
# "Site starting on 7592", "(TCP Port 7592 Closed)", "Starting factory <...>".
# grpcmux logs each endpoint once, with its address and purpose; these are debug.
_TWISTED_CHATTER = re.compile(
    r"\S.* starting on \S+|\((TCP |UNIX |UDP )?Port \S+ Closed\)|(Starting|Stopping) factory .*"
)


def _quiet_twisted_chatter(event: dict) -> PredicateResult:
    """Drop Twisted's listener/factory lines (kept at --log-level debug)."""
    namespace = event.get("log_namespace") or ""
    twisted = namespace == "log_legacy" or namespace.startswith("twisted.")
    if twisted and _level_of(event) == LogLevel.info:
        if _TWISTED_CHATTER.fullmatch(_message(event)):
            return PredicateResult.no
    return PredicateResult.maybe


def filter_observer(observer: ILogObserver, level: str) -> ILogObserver:
    """Pass on to *observer* only events at *level* ("debug".."error") or above,
    and Twisted's listener/factory chatter only at debug."""
    predicates = [LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])]
    if level != "debug":
        predicates.insert(0, _quiet_twisted_chatter)
    return FilteringLogObserver(observer, predicates)


def make_observer(out: IO[str], level: str = "info", fmt: str = "pretty") -> ILogObserver:
    """An observer writing events of *level* and above to *out* in format *fmt*."""
    return filter_observer(FileLogObserver(out, FORMATTERS[fmt]), level)


_STDLIB_LEVELS = (
    (logging.CRITICAL, LogLevel.critical),
    (logging.ERROR, LogLevel.error),
    (logging.WARNING, LogLevel.warn),
    (logging.INFO, LogLevel.info),
)


class TwistedLoggerHandler(logging.Handler):
    """A ``logging.Handler`` re-emitting stdlib records as twisted.logger events.

    The record's logger name becomes the namespace; its exception, if any, the
    event's failure.  (The inverse of ``twisted.logger.STDLibLogObserver``: never
    install both, or records would loop.)
    """

    def __init__(self, publisher: Optional[ILogObserver] = None) -> None:
        super().__init__()
        self._publisher = publisher

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = next(
                (twisted for stdlib, twisted in _STDLIB_LEVELS if record.levelno >= stdlib),
                LogLevel.debug,
            )
            text = record.getMessage().replace("{", "{{").replace("}", "}}")
            log = Logger(namespace=record.name, observer=self._publisher)
            if record.exc_info and record.exc_info[1] is not None:
                failure = Failure(record.exc_info[1], record.exc_info[0], record.exc_info[2])
                log.failure(text, failure, level=level)
            else:
                log.emit(level, text)
        except Exception:
            self.handleError(record)


def bridge_stdlib_logging(
    level: str = "info", logger: Optional[logging.Logger] = None
) -> TwistedLoggerHandler:
    """Route records of *logger* (default: the root logger) into twisted.logger.

    Sets the stdlib logger's level to *level* so filtered records are not even
    formatted, and replaces a bridge installed earlier (idempotent).
    """
    target = logging.getLogger() if logger is None else logger
    unbridge_stdlib_logging(target)
    handler = TwistedLoggerHandler()
    target.addHandler(handler)
    target.setLevel(
        {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
         "error": logging.ERROR}[level]
    )
    return handler


def unbridge_stdlib_logging(logger: Optional[logging.Logger] = None) -> None:
    """Remove the bridge handlers from *logger* (default: the root logger)."""
    target = logging.getLogger() if logger is None else logger
    for handler in list(target.handlers):
        if isinstance(handler, TwistedLoggerHandler):
            target.removeHandler(handler)


def start_logging(out: IO[str], level: str = "info", fmt: str = "pretty") -> ILogObserver:
    """Outside twistd: begin global logging to *out* and bridge stdlib logging."""
    from twisted.logger import globalLogBeginner

    observer = make_observer(out, level, fmt)
    globalLogBeginner.beginLoggingTo([observer])
    bridge_stdlib_logging(level)
    return observer
