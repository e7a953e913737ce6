"""The status page on the metrics listener: who is connected, live.

``/`` is a server-rendered table (twisted.web.template escapes every peer-supplied
id and label), complete without JavaScript; ``/status.js`` refreshes it every
second from ``/status.json`` with ``textContent`` only, never as HTML.  No external
assets, and a Content-Security-Policy that allows none, nor inline script.

A column is one ``Column`` line in ``COLUMNS``; an optional one (health, node) is
shown only while some client has a value for it.
"""

import json
import time
from dataclasses import asdict
from importlib import resources
from typing import Callable, NamedTuple

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.template import Element, TagLoader, renderElement, tags

from grpcmux import __version__

# How often the page asks for fresh rows, in milliseconds (status.js reads it).
REFRESH_MS = 1000
# Without JavaScript, the browser reloads the whole page this often, in seconds.
NOSCRIPT_REFRESH_S = 5
_HEADERS = {
    b"content-security-policy": b"default-src 'none'; script-src 'self'; style-src 'self'; "
                                b"connect-src 'self'; img-src 'self'; base-uri 'none'; "
                                b"form-action 'none'; frame-ancestors 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
}


def _since(posix):
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(posix))


def _size(count):
    if count is None:
        return None
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def _number(value, spec="d"):
    return None if value is None else format(value, spec)


class Column(NamedTuple):
    title: str
    cell: Callable  # ClientStatus -> str, or None where unknown
    optional: bool = False  # hidden while no client has a value


COLUMNS = (
    Column("Client ID", lambda c: c.client_id),
    Column("Labels", lambda c: ", ".join(f"{k}={v}" for k, v in c.labels)),
    Column("Protocol", lambda c: c.wire_protocol),
    Column("Remote address", lambda c: c.remote_address),
    Column("Connected since", lambda c: _since(c.connected_at)),
    Column("Node", lambda c: c.node, optional=True),
    Column("Health", lambda c: c.health, optional=True),
    Column("Calls/s", lambda c: _number(c.calls_per_second, ".1f")),
    Column("Calls", lambda c: _number(c.calls)),
    Column("Errors", lambda c: _number(c.errors)),
    Column("Bytes in", lambda c: _size(c.bytes_received)),
    Column("Bytes out", lambda c: _size(c.bytes_sent)),
)


def table(clients):
    """``(titles, rows)``: the shown columns' titles and each client's cells ("-" unknown)."""
    cells = [[column.cell(client) for column in COLUMNS] for client in clients]
    shown = [i for i, column in enumerate(COLUMNS)
             if not column.optional or any(row[i] is not None for row in cells)]
    titles = [COLUMNS[i].title for i in shown]
    rows = [["-" if row[i] is None or row[i] == "" else row[i] for i in shown] for row in cells]
    return titles, rows


def summary(count):
    if count == 0:
        return "No clients connected."
    return f"{count} client{'s' if count != 1 else ''} connected."


def snapshot(source):
    """What /status.json serves: the table as shown, and the raw rows."""
    clients = source.clients()
    titles, rows = table(clients)
    return {
        "summary": summary(len(clients)),
        "columns": titles,
        "rows": rows,
        "clients": [dict(asdict(client), labels=dict(client.labels)) for client in clients],
    }


def _secure(request, content_type):
    request.setHeader(b"content-type", content_type)
    for name, value in _HEADERS.items():
        request.setHeader(name, value)


class _Page(Element):
    def __init__(self, data):
        rows = [tags.tr(*(tags.td(cell) for cell in row)) for row in data["rows"]]
        page = tags.html(
            tags.head(
                tags.meta(charset="utf-8"),
                tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
                tags.title("grpcmux status"),
                tags.link(rel="stylesheet", href="status.css"),
                tags.noscript(tags.meta(**{"http-equiv": "refresh",
                                           "content": str(NOSCRIPT_REFRESH_S)})),
                tags.script(src="status.js", defer="defer",
                            **{"data-refresh-ms": str(REFRESH_MS)}),
            ),
            tags.body(
                tags.h1("grpcmux status"),
                tags.p(data["summary"], id="summary"),
                tags.table(
                    tags.thead(tags.tr(*(tags.th(title) for title in data["columns"]))),
                    tags.tbody(*rows),
                    id="clients",
                ),
                tags.p("", id="problem", role="status"),
                tags.footer(f"grpcmux {__version__} · ", tags.a("metrics", href="metrics")),
            ),
            lang="en",
        )
        super().__init__(loader=TagLoader(page))


class StatusPage(Resource):
    """``GET /``: the whole table, rendered on the server."""

    isLeaf = True

    def __init__(self, source):
        super().__init__()
        self.source = source

    def render_GET(self, request):
        _secure(request, b"text/html; charset=utf-8")
        renderElement(request, _Page(snapshot(self.source)))
        return NOT_DONE_YET


class StatusJSON(Resource):
    """``GET /status.json``: the same table as data, for status.js and scripts."""

    isLeaf = True

    def __init__(self, source):
        super().__init__()
        self.source = source

    def render_GET(self, request):
        _secure(request, b"application/json")
        return json.dumps(snapshot(self.source), sort_keys=True).encode()


class _Asset(Resource):
    isLeaf = True

    def __init__(self, body, content_type):
        super().__init__()
        self.body = body
        self.content_type = content_type

    def render_GET(self, request):
        _secure(request, self.content_type)
        return self.body


def _asset(name):
    return (resources.files("grpcmux") / "static" / name).read_bytes()


def add_status_page(root, source):
    """Serve the page for ``source`` (``.clients()``: ClientStatus rows) under ``root``."""
    root.putChild(b"", StatusPage(source))
    root.putChild(b"status.json", StatusJSON(source))
    root.putChild(b"status.js", _Asset(_asset("status.js"), b"text/javascript; charset=utf-8"))
    root.putChild(b"status.css", _Asset(_asset("status.css"), b"text/css; charset=utf-8"))
