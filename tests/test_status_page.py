"""The status page on the metrics listener: over HTTP, and in headless Chromium.

A whole stack runs on loopback with its server's metrics served by MetricsService;
clients connect, take calls through the proxy and leave while a real browser
watches the page.  Ids and labels
are peer-supplied, so hostile ones must show as text, server-rendered and live.
"""

import json
import os

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.web.client import Agent, readBody

from chromium import Chromium
from grpcmux.metrics import RATE_WINDOW, ClientStats, MetricsService, ServerMetrics
from grpcmux.registry import ClientInfo, ClientRegistry
from grpcmux.status import COLUMNS, table
from mux_stack import TIMEOUT, Stack
from rpc_backend import route

LOOPBACK = "tcp:0:interface=127.0.0.1"
# Quotes, ampersands and markup that would run script if pasted in as HTML.
HOSTILE_ID = "\"><img>'&amp;"
HOSTILE_LABELS = (
    ("evil", "<script>window.pwned = 1</script>"),
    ("img", '<img src=x onerror="window.pwned = 2">'),
    ("quote", "it's \"quoted\" & <b>bold</b>"),
)
HOSTILE_CELL = ", ".join(f"{k}={v}" for k, v in HOSTILE_LABELS)
# Where to keep a screenshot of the page (docs/status-page.png is made this way).
SCREENSHOT_ENV = "GRPCMUX_STATUS_SCREENSHOT"
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")


@pytest_twisted.async_yield_fixture
async def watched(reactor, tmp_path):
    """A stack whose server metrics and status page are served on ``watched.url``."""
    metrics = ServerMetrics()
    stack = Stack(reactor, tmp_path, proxy_kwargs={"observer": metrics.call_finished},
                  metrics=metrics)
    stack.server_metrics = metrics
    stack.http = MetricsService(reactor, LOOPBACK, metrics.registry, status=metrics)
    stack.http.startService()
    stack.url = f"http://127.0.0.1:{stack.http.port.getHost().port}/"
    yield stack
    await stack.stop()
    await stack.http.stopService()


@pytest_twisted.async_yield_fixture
async def browser(reactor, tmp_path):
    chromium = Chromium(reactor, tmp_path / "chromium-profile")
    try:
        await chromium.start()
        yield chromium
    finally:
        await chromium.stop()


async def get(reactor, url):
    response = await Agent(reactor).request(b"GET", url.encode()).addTimeout(TIMEOUT, reactor)
    body = await readBody(response).addTimeout(TIMEOUT, reactor)
    return response, body.decode()


async def calls(stack, client_id, count, failing=0):
    """``count`` calls to ``client_id`` through the proxy, the first ``failing`` failing."""
    for i in range(count):
        fail = (("x-fail", "UNAVAILABLE down for a moment"),) if i < failing else ()
        result = await stack.invoke("Unary", b"x", route(client_id) + fail)
        assert result.code.name == ("UNAVAILABLE" if i < failing else "OK"), result


def rows_js():
    """JS: the table's rows as arrays of cell texts."""
    return ("[...document.querySelectorAll('#clients tbody tr')]"
            ".map(tr => [...tr.cells].map(td => td.textContent))")


def column(title):
    """Where ``title`` is outside a cluster: every client has a health, none a node."""
    return [c.title for c in COLUMNS if not c.optional or c.title == "Health"].index(title)


# In a browser


@pytest_twisted.ensureDeferred
async def test_clients_appear_and_disappear_live(watched, browser, tmp_path):
    await browser.navigate(watched.url)
    assert await browser.evaluate("document.getElementById('summary').textContent") == (
        "No clients connected.")

    await watched.connected_client(HOSTILE_ID, labels=HOSTILE_LABELS)
    legacy = await watched.connected_client("beta", wire_protocol="legacy")
    await calls(watched, HOSTILE_ID, 4, failing=1)
    rows = await browser.wait_for(
        f"(rows => rows.length === 2 && rows[0][{column('Calls')}] === '4' && rows)"
        f"({rows_js()})", "both clients listed with their calls")
    assert [row[:3] for row in rows] == [[HOSTILE_ID, HOSTILE_CELL, "native"],
                                         ["beta", "-", "legacy"]]
    assert rows[0][column("Errors")] == "1"
    assert rows[0][column("Health")] == "unknown"  # these clients check no gRPC server
    assert rows[0][column("Calls/s")] == f"{4 / RATE_WINDOW:.1f}"
    assert rows[0][column("Remote address")].startswith("127.0.0.1:")
    # Live updates are text, never markup: nothing injected, nothing ran.
    assert await browser.evaluate(
        "[document.querySelectorAll('#clients img, #clients script, #clients b').length,"
        " typeof window.pwned]") == [0, "undefined"]
    assert await browser.evaluate("document.getElementById('summary').textContent") == (
        "2 clients connected.")

    await legacy.stopService()
    rows = await browser.wait_for(f"(rows => rows.length === 1 && rows)({rows_js()})",
                                  "beta gone from the page")
    assert rows[0][0] == HOSTILE_ID


@pytest_twisted.ensureDeferred
async def test_a_screenshot_of_a_busy_page(watched, browser):
    """What docs/status-page.png shows (written where $GRPCMUX_STATUS_SCREENSHOT says)."""
    await watched.connected_client("lab-printer", labels=(("role", "printer"), ("site", "berlin")))
    await watched.connected_client("sensor-17", labels=(("site", "lisbon"),))
    await watched.connected_client("build-farm", wire_protocol="legacy")
    await calls(watched, "lab-printer", 12, failing=1)
    await calls(watched, "sensor-17", 30)
    await browser.navigate(watched.url)
    await browser.wait_for(f"(rows => rows.length === 3 && rows[2][{column('Calls')}] === '30')"
                           f"({rows_js()})", "three clients with their calls")
    screenshot = await browser.screenshot()
    assert screenshot.startswith(b"\x89PNG\r\n\x1a\n")
    if os.environ.get(SCREENSHOT_ENV):
        with open(os.environ[SCREENSHOT_ENV], "wb") as file:
            file.write(screenshot)


@pytest_twisted.ensureDeferred
async def test_without_javascript_the_page_is_a_plain_table(watched, browser):
    await watched.connected_client(HOSTILE_ID, labels=HOSTILE_LABELS)
    await browser.send("Emulation.setScriptExecutionDisabled", value=True)
    await browser.navigate(watched.url)
    rows = await browser.evaluate(rows_js())
    assert [row[:3] for row in rows] == [[HOSTILE_ID, HOSTILE_CELL, "native"]]
    headers = await browser.evaluate(
        "[...document.querySelectorAll('#clients th')].map(th => th.textContent)")
    assert headers == ["Client ID", "Labels", "Protocol", "Remote address", "Connected since",
                       "Health", "Calls/s", "Calls", "Errors", "Bytes in", "Bytes out"]
    assert await browser.evaluate(
        "[document.querySelectorAll('#clients img, #clients script, #clients b').length,"
        " typeof window.pwned]") == [0, "undefined"]


# Over HTTP


@pytest_twisted.ensureDeferred
async def test_the_page_escapes_ids_and_labels_and_forbids_inline_script(reactor, watched):
    await watched.connected_client(HOSTILE_ID, labels=HOSTILE_LABELS)
    response, body = await get(reactor, watched.url)
    assert response.code == 200
    headers = response.headers
    assert headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    policy = headers.getRawHeaders(b"content-security-policy")[0]
    assert b"script-src 'self';" in policy and b"default-src 'none'" in policy
    assert headers.getRawHeaders(b"x-content-type-options") == [b"nosniff"]
    assert body.startswith("<!DOCTYPE html>")
    # Text content: <, > and & escaped (quotes need it only in attribute values).
    assert "<td>\"&gt;&lt;img&gt;'&amp;amp;</td>" in body
    assert "evil=&lt;script&gt;window.pwned = 1&lt;/script&gt;" in body
    assert "<script>window" not in body and "<img" not in body and "<b>" not in body
    assert body.count("<script") == 1 and '<script src="status.js"' in body


@pytest_twisted.ensureDeferred
async def test_status_json_has_the_table_and_the_raw_rows(reactor, watched):
    await watched.connected_client("alpha", labels=(("site", "lab"),))
    response, body = await get(reactor, watched.url + "status.json")
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    data = json.loads(body)
    assert data["summary"] == "1 client connected."
    assert data["columns"][:3] == ["Client ID", "Labels", "Protocol"]
    assert data["rows"][0][:3] == ["alpha", "site=lab", "native"]
    raw = data["clients"][0]
    assert (raw["client_id"], raw["labels"], raw["calls"], raw["health"]) == (
        "alpha", {"site": "lab"}, 0, "unknown")
    assert raw["bytes_received"] > 0 and raw["bytes_sent"] > 0


@pytest_twisted.ensureDeferred
async def test_assets_and_metrics_are_served_and_the_rest_is_not_found(reactor, watched):
    for path, kind in (("status.js", b"text/javascript"), ("status.css", b"text/css"),
                       ("metrics", b"text/plain")):
        response, body = await get(reactor, watched.url + path)
        assert response.code == 200, path
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(kind)
        assert body
    response, _ = await get(reactor, watched.url + "nothing-here")
    assert response.code == 404


# Units


def test_client_stats_count_calls_errors_and_a_windowed_rate():
    clock = task.Clock()
    stats = ClientStats(clock.seconds)
    for code in ("OK", "OK", "NOT_FOUND"):
        stats.finished(code)
    assert (stats.calls, stats.errors) == (3, 1)
    assert stats.calls_per_second() == 3 / RATE_WINDOW
    clock.advance(RATE_WINDOW - 1)
    stats.finished("OK")
    assert stats.calls_per_second() == 4 / RATE_WINDOW
    clock.advance(1)
    assert stats.calls_per_second() == 1 / RATE_WINDOW
    clock.advance(RATE_WINDOW)
    assert stats.calls_per_second() == 0


class _Server:
    """What ServerMetrics.track reads of a MultiplexerServer."""

    def __init__(self):
        self.registry = ClientRegistry()
        self.connected_clients = {}


def test_calls_count_while_connected_and_never_for_ids_not_connected():
    server = _Server()
    metrics = ServerMetrics()
    metrics.track(server)
    for i in range(100):
        metrics.call_finished(f"nobody-{i}", "NOT_FOUND", 0.001, 0, 0)
    metrics.call_finished("", "OK", 0.001, 0, 0)  # the proxy's own services
    assert metrics.client_ids_with_stats == []
    server.registry.add(ClientInfo(client_id="a", connected_at=0.0, remote_address="x:1",
                                   wire_protocol="native"))
    metrics.call_finished("a", "OK", 0.001, 5, 5)
    metrics.call_finished("a", "CANCELLED", 0.001, 5, 5)
    (row,) = metrics.clients()
    assert (row.client_id, row.calls, row.errors, row.bytes_received) == ("a", 2, 1, None)
    server.registry.remove("a")
    assert metrics.client_ids_with_stats == [] and metrics.clients() == []


def test_optional_columns_show_only_when_some_client_has_a_value():
    from grpcmux.metrics import ClientStatus

    plain = ClientStatus("a", (), "native", "127.0.0.1:1", 0.0)
    titles, rows = table([plain])
    assert "Health" not in titles and "Node" not in titles
    assert rows == [["a", "-", "native", "127.0.0.1:1", "1970-01-01 00:00:00Z",
                     "-", "-", "-", "-", "-"]]
    sick = ClientStatus("b", (), "native", "127.0.0.1:2", 0.0, health="NOT_SERVING",
                        node="node-2", bytes_received=2048)
    titles, rows = table([plain, sick])
    assert titles[5:7] == ["Node", "Health"]
    assert rows[1][5:7] == ["node-2", "NOT_SERVING"] and rows[0][5:7] == ["-", "-"]
    assert rows[1][titles.index("Bytes in")] == "2.0 KiB"
