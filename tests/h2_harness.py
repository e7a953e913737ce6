"""A Router between raw-frame callers and raw-frame upstreams, on StringTransports.

:class:`RouterHarness` builds a real :class:`~grpcmux.http2.router.Router` with a
real ClientRegistry; every client registered through :meth:`RouterHarness.client`
gets a :class:`FakeTunnel`, whose ``connect(factory)`` builds the upstream
H2Connection on a StringTransport the test controls (:class:`Upstream`). Callers
are :class:`Caller` objects: ``router.factory.buildProtocol(None)`` on another
StringTransport. Both speak frames built with ``h2_frames`` and read theirs back
with a :class:`~h2_frames.FrameReader`. Time is a ``task.Clock``.
"""

import time

from hpack import Encoder
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from grpcmux.config import ServerSettings
from grpcmux.http2.config import H2Config
from grpcmux.http2.frames import PREFACE, TYPE_HEADERS
from grpcmux.http2.router import Router, RouterLimits
from grpcmux.http2.targets import EndpointTarget, TunnelTarget
from grpcmux.registry import ClientInfo, ClientRegistry

import h2_frames as h2

PATH = b"/test.Echo/Unary"


def request(client_id="alpha", path=PATH, extra=(), authority=b"proxy.test"):
    """A gRPC request header list; ``client_id`` None: no client-id field."""
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path)]
    if authority is not None:
        fields.append((b":authority", authority))
    fields += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
    if client_id is not None:
        fields.append((b"client-id", client_id.encode()))
    return fields + list(extra)


RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
OK_TRAILERS = [(b"grpc-status", b"0")]


class Peer:
    """One end of a connection the test plays: send raw frames, read the router's."""

    def __init__(self, protocol, preface):
        self.protocol = protocol
        self.transport = StringTransport()
        self.encoder = Encoder()
        self.reader = h2.FrameReader(self.transport, preface=preface)
        self.received = []  # every frame read so far
        protocol.makeConnection(self.transport)

    def send(self, *frames):
        self.protocol.dataReceived(b"".join(frames))

    def headers(self, stream_id, fields, end_stream=False, split=None):
        self.send(h2.headers(self.encoder, stream_id, fields, end_stream, split))

    def frames(self):
        """Frames the router wrote since the last call."""
        new = self.reader.read()
        self.received += new
        return new

    def headers_frames(self, stream_id=None):
        return [f for f in self.frames() if f.type == TYPE_HEADERS
                and (stream_id is None or f.stream_id == stream_id)]

    @property
    def disconnecting(self):
        return self.transport.disconnecting


class Caller(Peer):
    """A caller connection to the router; ``start``: preface + SETTINGS sent."""

    def __init__(self, router, start=True, settings=()):
        super().__init__(router.factory.buildProtocol(None), preface=False)
        if start:
            self.send(PREFACE, h2.settings(*settings))

    def call(self, stream_id, fields=None, end_stream=False, **kwargs):
        self.headers(stream_id, fields if fields is not None else request(**kwargs), end_stream)


class Upstream(Peer):
    """An upstream connection the router opened: the test is the gRPC server."""

    def __init__(self, protocol):
        super().__init__(protocol, preface=True)

    def start(self, *settings):
        """The server's SETTINGS (and the ACK of the router's)."""
        self.send(h2.settings(*settings), h2.settings_ack())

    def respond(self, stream_id, message=b"", trailers=OK_TRAILERS):
        self.headers(stream_id, RESPONSE)
        if message:
            self.send(h2.data(stream_id, h2.grpc_message(message)))
        self.headers(stream_id, trailers, end_stream=True)


class FakeTunnel(TunnelTarget):
    """A client's tunnel whose connections are Upstream objects the test drives.

    ``hold``: connect() returns a Deferred the test fires with :meth:`release`;
    ``settings``: the SETTINGS each new upstream sends at once (None: the test does);
    ``refuse``: connect() fails with that exception.
    """

    def __init__(self, client_id, settings=(), hold=False, refuse=None):
        self.label = client_id
        self.refuse = refuse  # an exception connect() fails with
        self.session = type("Session", (), {"closed": False})()
        self.upstreams = []
        self.settings = settings
        self.hold = hold
        self._held = []

    def connect(self, factory):
        if self.refuse is not None:
            return fail(self.refuse)
        upstream = Upstream(factory.buildProtocol(None))
        self.upstreams.append(upstream)
        if self.hold:
            d = Deferred()
            self._held.append((d, upstream))
            return d
        if self.settings is not None:
            upstream.start(*self.settings)
        return succeed(upstream.protocol)

    def release(self):
        held, self._held = self._held, []
        for d, upstream in held:
            d.callback(upstream.protocol)
            if self.settings is not None:
                upstream.start(*self.settings)

    @property
    def upstream(self):
        return self.upstreams[-1]


class RouterHarness:
    """A Router, its registry and clock; clients with fake tunnels."""

    def __init__(self, caller=None, upstream=None, limits=None, tokens=None,
                 authority_domain=None, default_client_id=None, instance=b"testproxy",
                 budget=None):
        self.clock = Clock()
        self.registry = ClientRegistry()
        self.tunnels = {}
        self.local = FakeTunnel("")
        self.local_target = _LocalTarget(self.local)
        self.ended = []  # (label, code, bytes_in, bytes_out) of every call that ended
        self.router = Router(
            self.clock, self.registry, self.tunnels.get, self.local_target,
            caller or H2Config(), upstream or H2Config(
                idle_timeout=0, preface_timeout=0, control_burst=10**6, control_rate=10**5),
            limits=limits or RouterLimits.from_settings(ServerSettings()), tokens=tokens, authority_domain=authority_domain,
            default_client_id=default_client_id, observer=self._observe, instance=instance,
            budget=budget)

    def _observe(self, label, code, seconds, bytes_in, bytes_out):
        self.ended.append((label, code, bytes_in, bytes_out))

    def client(self, client_id="alpha", **tunnel):
        self.registry.add(ClientInfo(client_id, time.time(), "127.0.0.1:1", "native"))
        target = self.tunnels[client_id] = FakeTunnel(client_id, **tunnel)
        return target

    def caller(self, **kwargs):
        return Caller(self.router, **kwargs)


class _LocalTarget(EndpointTarget):
    """The local services' target, connected like a FakeTunnel."""

    def __init__(self, tunnel):
        super().__init__(None, label="")
        self.tunnel = tunnel

    def connect(self, factory):
        return self.tunnel.connect(factory)
