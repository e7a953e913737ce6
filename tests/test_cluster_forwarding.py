"""Forwarding between nodes: a call entering node A for a client held by node B.

Node B serves a cluster listener (a router that takes only calls carrying the
cluster's node token, and routes them to its own clients); node A's router sends
calls for B's clients there. The registry that tells A where a client is comes
from etcd in a cluster (grpcmux/cluster); here A's registry is filled by hand.
"""

import time

import grpc
import pytest_twisted
from twisted.internet.endpoints import TCP4ClientEndpoint

from grpcmux.http2.targets import NodeTarget
from grpcmux.registry import ClientInfo
from mux_stack import Stack
from rpc_backend import UNLIMITED, invoke, route, start_call

TOKEN = b"node-secret-0123456789abcdef"
OK = grpc.StatusCode.OK


@pytest_twisted.ensureDeferred
async def test_a_call_for_a_client_on_another_node_goes_through_its_cluster_listener(
        reactor, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    b = Stack(reactor, tmp_path / "b", proxy_kwargs={
        "cluster_listener": "tcp:0:interface=127.0.0.1", "node_token": TOKEN})
    b_port = b.proxy.cluster_port.getHost().port

    def remote(info):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", b_port)
        return NodeTarget("b", endpoint, TOKEN)

    a = Stack(reactor, tmp_path / "a", proxy_kwargs={"remote": remote})
    try:
        await b.connected_client("lab")
        a.registry.add(ClientInfo("lab", time.time(), "192.0.2.1:1", "native"))
        for kind, request, expected in (("Unary", b"via a", [b"via a"]),
                                        ("Bidi", [b"x", b"y"], [b"x", b"y"])):
            result = await a.invoke(kind, request, route("lab") + (("x-trailer-t", "w"),))
            assert (result.code, result.responses) == (OK, expected), result.details
            assert dict(result.trailers)["t"] == "w"
        for record in (b.backend.next_call(), b.backend.next_call()):
            assert "client-id" not in dict(record.metadata)
            assert "grpcmux-node-token" not in dict(record.metadata)
            assert record.via.count("grpcmux-") == 2  # both routers named themselves

        # The cluster listener is no second proxy endpoint: no token, no call.
        channel = grpc.insecure_channel(f"127.0.0.1:{b_port}", options=UNLIMITED)
        try:
            refused = await b.in_thread(invoke, channel, "Unary", b"x", route("lab"), 10)
        finally:
            channel.close()
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED
        assert b.backend.calls.empty()
    finally:
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_every_call_kind_deadline_and_cancellation_pass_between_nodes(reactor, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    b = Stack(reactor, tmp_path / "b", proxy_kwargs={
        "cluster_listener": "tcp:0:interface=127.0.0.1", "node_token": TOKEN})
    b_port = b.proxy.cluster_port.getHost().port
    a = Stack(reactor, tmp_path / "a", proxy_kwargs={"remote": lambda info: NodeTarget(
        "b", TCP4ClientEndpoint(reactor, "127.0.0.1", b_port), TOKEN)})
    try:
        await b.connected_client("lab")
        a.registry.add(ClientInfo("lab", time.time(), "192.0.2.1:1", "native"))
        lab = route("lab")
        for kind, request, extra, expected in (
                ("Unary", b"u", (), [b"u"]),
                ("ServerStream", b"s", (("x-count", "3"),), [b"s"] * 3),
                ("ClientStream", [b"a", b"b"], (), [b"a|b"]),
                ("Bidi", [b"x", b"y"], (), [b"x", b"y"])):
            result = await a.invoke(kind, request, lab + extra + (("x-header-h", "v"),))
            assert (result.code, result.responses) == (OK, expected), (kind, result.details)
            assert dict(result.headers)["h"] == "v"
        # The backend's own status, and a deadline that reaches it through both nodes.
        failed = await a.invoke("Unary", b"x", lab + (("x-fail", "NOT_FOUND nope"),))
        assert (failed.code, failed.details) == (grpc.StatusCode.NOT_FOUND, "nope")
        expired = await a.invoke("Unary", b"x", lab + (("x-wait", "1"),), timeout=0.5)
        assert expired.code == grpc.StatusCode.DEADLINE_EXCEEDED
        records = [b.backend.next_call() for _ in range(6)]
        assert await b.in_thread(records[-1].settled.wait, 10)
        assert records[-1].outcome == "deadline"
        assert records[-1].time_remaining is not None  # grpc-timeout went through
        # A cancelled call is cancelled at the backend.
        pending = start_call(a.channel, "Bidi", [b"r"], lab + (("x-wait", "1"),))
        record = await b.in_thread(b.backend.next_call)
        pending.cancel()
        assert await b.in_thread(record.settled.wait, 10)
        assert record.outcome == "cancelled"
    finally:
        await a.stop()
        await b.stop()
