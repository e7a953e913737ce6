"""Several multiplexer addresses against real servers on loopback (issue 13, client part).

Real MultiplexerServers on 127.0.0.1 / ::1, a real client service on the real
reactor; every wait has a timeout.
"""

import random
import socket

import pytest_twisted
from twisted.application.internet import backoffPolicy
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver
from zope.interface import implementer

from grpcmux.client import Tunnel, TunnelClientService
from grpcmux.config import ClientSettings, ServerSettings
from grpcmux.registry import ClientRegistry
from grpcmux.server import MultiplexerServer

TIMEOUT = 20.0


class Servers:
    def __init__(self, reactor):
        self.reactor = reactor
        self.started = []

    def start(self, listener):
        registry = ClientRegistry()
        server = MultiplexerServer(self.reactor, registry,
                                   ServerSettings(multiplexer_listener=listener))
        server.startService()
        server.registry = registry
        self.started.append(server)
        return server

    async def stop(self):
        for server in self.started:
            if server.running:
                await server.stopService().addTimeout(TIMEOUT, self.reactor)


def address_of(server):
    host = server.port.getHost()
    return f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"


def listed(reactor, server, client_id):
    """A Deferred firing once ``server`` lists ``client_id``."""
    result = Deferred()
    if client_id in server.registry.snapshot:
        result.callback(None)
        return result

    def observe(event):
        if event.info.client_id == client_id and client_id in server.registry.snapshot:
            unsubscribe()
            result.callback(None)

    unsubscribe = server.registry.subscribe(observe)
    return result.addTimeout(TIMEOUT, reactor)


def client(reactor, addresses, rng_seed=0, resolver=None, client_id="roamer"):
    attempts = []
    policy = backoffPolicy(initialDelay=0.05, maxDelay=0.2)

    def recording(attempt):
        attempts.append(attempt)
        return policy(attempt)

    settings = ClientSettings(client_id=client_id, grpc_server_address="127.0.0.1:1",
                              multiplexer_address=addresses, shutdown_grace=1.0)
    tunnel = Tunnel(reactor, settings, retry_policy=recording)
    service = TunnelClientService(reactor, tunnel, resolver=resolver,
                                  rng=random.Random(rng_seed))
    service.attempts = attempts
    service.startService()
    return service


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_client_moves_to_the_next_server_when_one_sends_go_away(reactor):
    servers = Servers(reactor)
    one, two = servers.start("tcp:0:interface=127.0.0.1"), servers.start("tcp:0:interface=127.0.0.1")
    service = client(reactor, f"{address_of(one)},{address_of(two)}")
    try:
        first_in = await service.when_connected().addTimeout(TIMEOUT, reactor)
        holder, other = (one, two) if "roamer" in one.registry.snapshot else (two, one)
        assert first_in.address == address_of(holder)
        moved = listed(reactor, other, "roamer")
        await holder.stop_accepting()  # GoAway: the client drains and leaves
        await moved
        await first_in.when_closed().addTimeout(TIMEOUT, reactor)
        assert "roamer" not in holder.registry.snapshot
        assert (await service.when_connected().addTimeout(TIMEOUT, reactor)).address \
            == address_of(other)
    finally:
        await service.stopService().addTimeout(TIMEOUT, reactor)
        await servers.stop()


@pytest_twisted.ensureDeferred
async def test_a_dead_address_is_passed_over_within_one_attempt(reactor):
    servers = Servers(reactor)
    alive = servers.start("tcp:0:interface=127.0.0.1")
    dead = f"127.0.0.1:{free_port()}"
    # Both orders: the dead one first or second.
    services = [client(reactor, f"{dead},{address_of(alive)}", rng_seed=seed,
                       client_id=f"roamer-{seed}") for seed in (0, 1)]
    try:
        for service in services:
            session = await service.when_connected().addTimeout(TIMEOUT, reactor)
            assert session.address == address_of(alive)
            assert service.attempts == []  # no failed attempt, no backoff
    finally:
        for service in services:
            await service.stopService().addTimeout(TIMEOUT, reactor)
        await servers.stop()


@implementer(IHostnameResolver)
class LoopbackNames:
    """Answers ``mux.test`` with 127.0.0.1 and ::1, as a name with two A/AAAA records.

    The machine's resolver has no name with several loopback addresses; everything
    after the resolution (connects, TLS-free sessions, servers) is real.
    """

    def resolveHostName(self, receiver, hostName, portNumber=0, **kwargs):
        receiver.resolutionBegan(None)
        if hostName == "mux.test":
            receiver.addressResolved(IPv4Address("TCP", "127.0.0.1", portNumber))
            receiver.addressResolved(IPv6Address("TCP", "::1", portNumber))
        receiver.resolutionComplete()
        return receiver


@pytest_twisted.ensureDeferred
async def test_a_name_with_two_addresses_is_two_servers_in_turn(reactor):
    servers = Servers(reactor)
    v4 = servers.start("tcp:0:interface=127.0.0.1")
    port = v4.port.getHost().port
    v6 = servers.start(f"tcp6:{port}:interface=\\:\\:1")
    service = client(reactor, f"mux.test:{port}", resolver=LoopbackNames())
    try:
        first_in = await service.when_connected().addTimeout(TIMEOUT, reactor)
        holder, other = (v4, v6) if "roamer" in v4.registry.snapshot else (v6, v4)
        other_ip = "::1" if other is v6 else "127.0.0.1"
        moved = listed(reactor, other, "roamer")
        await holder.stop_accepting()
        await moved
        await first_in.when_closed().addTimeout(TIMEOUT, reactor)
        again = await service.when_connected().addTimeout(TIMEOUT, reactor)
        assert again.address == f"mux.test:{port} ({other_ip})"
    finally:
        await service.stopService().addTimeout(TIMEOUT, reactor)
        await servers.stop()


@pytest_twisted.ensureDeferred
async def test_localhost_through_the_system_resolver(reactor):
    servers = Servers(reactor)
    server = servers.start("tcp:0:interface=127.0.0.1")
    port = server.port.getHost().port
    service = client(reactor, f"localhost:{port}")
    try:
        session = await service.when_connected().addTimeout(TIMEOUT, reactor)
        assert session.address == f"localhost:{port} (127.0.0.1)"
        await listed(reactor, server, "roamer")
    finally:
        await service.stopService().addTimeout(TIMEOUT, reactor)
        await servers.stop()
