"""Dialling the multiplexer: several addresses in turn, host names as all their addresses.

``MultiplexerDialer`` is the endpoint the client's ``ClientService`` connects
through.  Its ``_Gate`` stands between a connection and ClientService's proxy of
the session, so that ClientService only hears of the end of admitted sessions.
"""

import ipaddress
import random

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import IProtocol, IResolutionReceiver, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from grpcmux.addresses import client_endpoint, parse_host_port

CONNECT_TIMEOUT = 10.0  # seconds for one TCP connect


@implementer(IProtocol)
class _Gate:
    """The connection's protocol in front of ClientService's proxy of the session.

    ClientService has no transition for a connection that ends while
    prepareConnection runs or after it failed (automat raises NoTransition in
    connectionLost), so only an admitted session's end is passed through it;
    an unadmitted one ends at the session alone.
    """

    def __init__(self, proxy):
        self.proxy = proxy
        self.session = proxy.unwrapped

    def makeConnection(self, transport):
        self.proxy.makeConnection(transport)
        self.dataReceived = self.session.dataReceived  # no hop per read

    def connectionMade(self):
        pass  # makeConnection did it

    def dataReceived(self, data):
        self.session.dataReceived(data)

    def connectionLost(self, reason):
        if self.session.admitted:
            self.proxy.connectionLost(reason)
        else:
            self.session.connectionLost(reason)


class _GateFactory(Factory):
    noisy = False

    def __init__(self, factory):
        self._factory = factory

    def buildProtocol(self, addr):
        proxy = self._factory.buildProtocol(addr)
        return None if proxy is None else _Gate(proxy)


@implementer(IResolutionReceiver)
class _Resolution:
    """Collects what a host name resolves to (IHostnameResolver's receiver)."""

    def __init__(self):
        self.addresses = []
        self.done = Deferred()

    def resolutionBegan(self, resolution):
        pass

    def addressResolved(self, address):
        if address.host not in self.addresses:
            self.addresses.append(address.host)

    def resolutionComplete(self):
        self.done.callback(self.addresses)


@implementer(IStreamClientEndpoint)
class MultiplexerDialer:
    """The multiplexer addresses as one endpoint for ``ClientService``.

    Addresses are tried in turn, starting at a random one; a host name stands
    for every address it resolves to (resolved at each turn, and taken in turn
    too, from a random one).  Each attempt starts at the address after the one
    used last and moves on at once when a connect fails; it fails (and
    ClientService backs off) only when every address failed.  So a server that
    sends GoAway, refuses the client or goes down is left for the next one.

    ``tls_creator_for(address)`` gives the TLS options for a configured address
    (or None for plaintext); ``resolver`` is an IHostnameResolver (default: the
    reactor's).
    """

    _log = Logger()

    def __init__(self, reactor, tunnel, tls_creator_for=None, resolver=None, rng=None):
        self._reactor = reactor
        self._tunnel = tunnel
        self._addresses = tunnel.settings.multiplexer_addresses
        self._tls_creator_for = tls_creator_for or (lambda address: None)
        self._resolver = resolver
        self._random = rng or random.Random()
        self._index = self._random.randrange(len(self._addresses))
        self._offsets = {}  # host name address -> where its next turn starts

    def __repr__(self):
        return f"multiplexer {self._tunnel.settings.multiplexer_address}"

    def connect(self, factory):
        return self._attempt(_GateFactory(factory)).addCallback(lambda gate: gate.proxy)

    @inlineCallbacks
    def _attempt(self, factory):
        problems = []
        for _ in self._addresses:
            address = self._addresses[self._index]
            self._index = (self._index + 1) % len(self._addresses)
            try:
                targets = yield self._targets(address)
            except CancelledError:
                raise
            except Exception as error:  # DNSLookupError, mostly
                problems.append(f"{address}: {Failure(error).getErrorMessage()}")
                continue
            for turn, (label, endpoint) in enumerate(targets):
                self._tunnel.dialling = label
                try:
                    gate = yield endpoint.connect(factory)
                except (CancelledError, ConnectingCancelledError):
                    raise
                except Exception as error:
                    problems.append(f"{label}: {Failure(error).getErrorMessage()}")
                    continue
                if address in self._offsets:
                    self._offsets[address] += turn + 1
                if problems:
                    self._log.info("multiplexer {problems}; connected to {address}",
                                   problems="; ".join(problems), address=label)
                return gate
        problem = "; ".join(problems)
        self._tunnel.connect_failed(problem)
        raise _AllFailed(problem)

    def _targets(self, address):
        """A Deferred list of (label, endpoint): the ways to reach ``address``, in turn."""
        creator = self._tls_creator_for(address)

        def wrapped(endpoint):
            return endpoint if creator is None else wrapClientTLS(creator, endpoint)

        if address.startswith("unix:"):
            return succeed([(address, wrapped(client_endpoint(self._reactor, address)))])
        host, port = parse_host_port(address)
        if _is_ip(host):
            return succeed([(address, wrapped(self._tcp(host, port)))])
        resolver = self._resolver or self._reactor.nameResolver
        receiver = _Resolution()
        resolver.resolveHostName(receiver, host, port)

        def in_turn(hosts):
            if not hosts:
                raise DNSLookupError(f"{host} resolves to no address")
            if address not in self._offsets:
                self._offsets[address] = self._random.randrange(len(hosts))
            start = self._offsets[address] % len(hosts)
            hosts = hosts[start:] + hosts[:start]
            return [(f"{address} ({ip})", wrapped(self._tcp(ip, port))) for ip in hosts]

        return receiver.done.addCallback(in_turn)

    def _tcp(self, host, port):
        endpoint = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        return endpoint(self._reactor, host, port, timeout=CONNECT_TIMEOUT)


class _AllFailed(Exception):
    """No multiplexer address could be dialled in one attempt."""


def _is_ip(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
