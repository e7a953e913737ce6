"""grpcmux.logging: JSON and pretty formats, the level filter, the stdlib bridge."""

import io
import json
import logging

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, LogPublisher, Logger, globalLogPublisher
from twisted.python.failure import Failure

from grpcmux import logging as grpcmux_logging

WHEN = 1764000000.25  # 2025-11-24T16:00:00.250Z


def emit(observer, level, fmt, **fields):
    log = Logger(namespace="grpcmux.test", observer=observer)
    log.emit(level, fmt, **fields)


def test_json_one_object_per_line_with_fields():
    out = io.StringIO()
    observer = grpcmux_logging.make_observer(out, "debug", "json")
    log = Logger(namespace="grpcmux.server", observer=observer)
    log.info(
        "client {client_id} connected from {remote_address}",
        client_id="alpha",
        remote_address="10.0.0.1:5000",
        streams=3,
    )
    log.debug("second {thing!r}", thing=object)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first.pop("time").endswith("Z")
    assert first == {
        "level": "info",
        "message": "client alpha connected from 10.0.0.1:5000",
        "namespace": "grpcmux.server",
        "client_id": "alpha",
        "remote_address": "10.0.0.1:5000",
        "streams": 3,
    }
    second = json.loads(lines[1])
    assert second["level"] == "debug"
    assert second["thing"] == str(object)
    assert second["message"] == "second <class 'object'>"


def test_json_failure_has_error_and_traceback():
    out = io.StringIO()
    observer = grpcmux_logging.make_observer(out, "info", "json")
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    Logger(observer=observer).failure("lost {client_id}", failure, client_id="b")
    record = json.loads(out.getvalue())
    assert record["level"] == "critical"
    assert record["message"] == "lost b"
    assert record["error"] == "division by zero"
    assert "ZeroDivisionError" in record["traceback"]


def test_json_time_is_rfc3339_utc_with_milliseconds():
    record = json.loads(grpcmux_logging.format_json({"log_format": "x", "log_time": WHEN}))
    assert record["time"] == "2025-11-24T16:00:00.250Z"


def test_json_legacy_keys_are_dropped():
    record = json.loads(
        grpcmux_logging.format_json(
            {"log_format": "hi", "message": ("hi",), "system": "-", "isError": 0,
             "log_time": WHEN, "time": WHEN, "format": "%(x)s"}
        )
    )
    assert record == {"time": "2025-11-24T16:00:00.250Z", "level": "info",
                      "message": "hi"}


def test_pretty_format():
    out = io.StringIO()
    observer = grpcmux_logging.make_observer(out, "info", "pretty")
    emit(observer, LogLevel.warn, "client {client_id} slow", client_id="c")
    line = out.getvalue()
    assert line.endswith(" WRN [grpcmux.test] client c slow\n")
    assert line[4] == "-" and line[13] == ":"  # 'YYYY-MM-DD HH:MM:SS ...'


def test_pretty_failure_includes_traceback():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failure = Failure()
    text = grpcmux_logging.format_pretty(
        {"log_format": "oops", "log_level": LogLevel.error, "log_failure": failure,
         "log_time": WHEN}
    )
    assert " ERR [-] oops\n" in text
    assert "RuntimeError: boom" in text


@pytest.mark.parametrize(
    "level, shown",
    [
        ("debug", ["debug", "info", "warn", "error", "critical"]),
        ("info", ["info", "warn", "error", "critical"]),
        ("warning", ["warn", "error", "critical"]),
        ("error", ["error", "critical"]),
    ],
)
def test_level_filter(level, shown):
    out = io.StringIO()
    observer = grpcmux_logging.make_observer(out, level, "json")
    for name in ["debug", "info", "warn", "error", "critical"]:
        emit(observer, LogLevel.levelWithName(name), name)
    messages = [json.loads(line)["message"] for line in out.getvalue().splitlines()]
    assert messages == shown


def test_bridge_routes_stdlib_records_into_twisted_logger():
    events = []
    publisher = LogPublisher(events.append)
    stdlib = logging.getLogger("grpcmux.test.bridge")
    stdlib.propagate = False
    handler = grpcmux_logging.TwistedLoggerHandler(publisher)
    stdlib.addHandler(handler)
    try:
        stdlib.setLevel(logging.DEBUG)
        stdlib.warning("rpc {curly} %s", "failed")
        stdlib.debug("detail")
        try:
            raise ValueError("bad frame")
        except ValueError:
            stdlib.exception("handler crashed")
    finally:
        stdlib.removeHandler(handler)
        stdlib.propagate = True
    assert [e["log_level"] for e in events] == [LogLevel.warn, LogLevel.debug,
                                                LogLevel.error]
    assert events[0]["log_namespace"] == "grpcmux.test.bridge"
    out = io.StringIO()
    observer = grpcmux_logging.make_observer(out, "info", "json")
    for event in events:
        observer(event)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["message"] for r in records] == ["rpc {curly} failed", "handler crashed"]
    assert records[1]["error"] == "bad frame"


def test_bridge_stdlib_logging_is_idempotent_and_sets_level():
    stdlib = logging.getLogger("grpcmux.test.level")
    try:
        grpcmux_logging.bridge_stdlib_logging("warning", stdlib)
        grpcmux_logging.bridge_stdlib_logging("error", stdlib)
        bridges = [h for h in stdlib.handlers
                   if isinstance(h, grpcmux_logging.TwistedLoggerHandler)]
        assert len(bridges) == 1
        assert stdlib.level == logging.ERROR
    finally:
        grpcmux_logging.unbridge_stdlib_logging(stdlib)
    assert not stdlib.handlers


def test_bridged_records_reach_the_global_publisher():
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    stdlib = logging.getLogger("grpcmux.test.global")
    stdlib.propagate = False
    try:
        grpcmux_logging.bridge_stdlib_logging("info", stdlib)
        stdlib.info("from grpc")
        stdlib.debug("filtered by the stdlib level")
    finally:
        grpcmux_logging.unbridge_stdlib_logging(stdlib)
        stdlib.propagate = True
        globalLogPublisher.removeObserver(events.append)
    texts = [e.get("log_format") for e in events if e.get("log_namespace") == stdlib.name]
    assert texts == ["from grpc"]


def test_import_sets_nothing_up():
    import subprocess
    import sys

    code = (
        "import logging, sys; import grpcmux.logging; "
        "assert not logging.getLogger().handlers; "
        "assert 'twisted.internet.reactor' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_legacy_events_use_their_system_as_namespace():
    event = {"log_format": "x", "log_namespace": "log_legacy", "system": "HTTP",
             "log_time": WHEN}
    assert json.loads(grpcmux_logging.format_json(event))["namespace"] == "HTTP"
    assert " [HTTP] x" in grpcmux_logging.format_pretty(event)
    event["system"] = "-"
    assert json.loads(grpcmux_logging.format_json(event))["namespace"] == "log_legacy"


@pytest_twisted.ensureDeferred
async def test_twisted_listener_and_factory_lines_show_only_at_debug(reactor):
    outs = {level: io.StringIO() for level in ("info", "debug")}
    observers = [grpcmux_logging.make_observer(out, level, "pretty")
                 for level, out in outs.items()]
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    try:
        factory = Factory.forProtocol(Protocol)
        factory.noisy = True
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        await port.stopListening()
        Logger(namespace="grpcmux.test").info("metrics starting on 1234")  # ours: kept
    finally:
        for observer in observers:
            globalLogPublisher.removeObserver(observer)
    debug, info = outs["debug"].getvalue(), outs["info"].getvalue()
    for chatter in ("Factory starting on", "Starting factory", "Stopping factory",
                    "Port", "Closed)"):
        assert chatter in debug
        assert chatter not in info
    assert info.count("\n") == 1 and "[grpcmux.test] metrics starting on 1234" in info
