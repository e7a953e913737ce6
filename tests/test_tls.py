"""TLS and mTLS on the multiplexer endpoint, over real loopback connections.

Certificates are made per module by ``tests/certs.py``.  A client whose TLS fails
reports one line (no traceback, no logged error) and keeps retrying; the retries are
observed as new connections at the server.
"""

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from grpcmux import tls
from grpcmux.client import Tunnel, TunnelClientService
from grpcmux.config import ClientSettings, ServerSettings
from grpcmux.registry import ClientRegistry
from grpcmux.server import MultiplexerServer
from mux_stack import TIMEOUT, Stack, first_report


def server_tls(pki, client_ca=False):
    """The ServerSettings fields of a TLS multiplexer endpoint."""
    fields = {"tls_cert": pki.server.cert, "tls_key": pki.server.key}
    return {**fields, "tls_client_ca": pki.ca} if client_ca else fields


def client_tls(pki, name="localhost", ca=None, issued=None):
    return tls.client_creator(
        name,
        ca or pki.ca,
        issued.cert if issued else None,
        issued.key if issued else None,
    )


@pytest_twisted.async_yield_fixture
async def tls_stack(reactor, tmp_path, pki):
    """A stack whose multiplexer endpoint speaks TLS (no client certificates)."""
    stack = Stack(reactor, tmp_path, settings=server_tls(pki))
    yield stack
    await stack.stop()


@pytest_twisted.async_yield_fixture
async def mtls_stack(reactor, tmp_path, pki):
    """TLS with client certificates from the test CA and ids bound to them."""
    stack = Stack(reactor, tmp_path,
                  settings={**server_tls(pki, client_ca=True), "client_id_from_cert": True})
    yield stack
    await stack.stop()


def connections(stack, count):
    """A Deferred firing once the server has accepted ``count`` more connections."""
    reached = Deferred()
    accept = stack.server.connection_accepted
    seen = []

    def counting(session, addr):
        accept(session, addr)
        seen.append(addr)
        if len(seen) == count and not reached.called:
            reached.callback(len(seen))

    stack.server.connection_accepted = counting
    return reached.addTimeout(TIMEOUT, stack.reactor)


def texts(events):
    from twisted.logger import formatEvent

    return [formatEvent(event) for event in events]


# -- TLS ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_call_through_a_tls_tunnel(tls_stack, pki):
    await tls_stack.connected_client("secure", tls_creator=client_tls(pki))
    connection = tls_stack.server.connected_clients["secure"]
    assert connection.session.transport.getPeerCertificate() is None  # no mTLS here
    result = await tls_stack.invoke("Unary", b"over tls", (("client-id", "secure"),))
    assert result.responses == [b"over tls"], result.details


@pytest_twisted.ensureDeferred
async def test_server_name_can_be_the_ip_address(tls_stack, pki):
    await tls_stack.connected_client("by-ip", tls_creator=client_tls(pki, name="127.0.0.1"))


@pytest_twisted.ensureDeferred
async def test_plain_client_gets_no_session_from_a_tls_server(tls_stack, pki, log_events):
    client = tls_stack.client("plain")
    problem = await first_report(client)
    assert problem.endswith("refused client plain: the server speaks TLS: connect with --tls")
    assert tls_stack.registry.snapshot == {}
    server_side = [t for t in texts(log_events) if t.startswith("127.0.0.1:")]
    assert server_side and server_side[0].endswith(
        " sent plaintext to the TLS multiplexer endpoint: the client needs --tls (and "
        "--tls-ca unless the system trusts the server's certificate); closing")


@pytest_twisted.ensureDeferred
async def test_name_mismatch_is_one_line_and_the_client_retries(tls_stack, pki, log_events):
    retried = connections(tls_stack, 3)
    client = tls_stack.client("misled", tls_creator=client_tls(pki, name="mux.example.com"))
    problem = await first_report(client)
    assert problem == (
        f"TLS with multiplexer {tls_stack.multiplexer_address} failed: the server's "
        "certificate is not valid for mux.example.com; retrying"
    )
    assert await retried == 3
    assert max(client.tunnel.retry_policy.attempts) >= 2  # refusals count as failures
    assert tls_stack.registry.snapshot == {}
    assert not any("Traceback" in text for text in texts(log_events))


@pytest_twisted.ensureDeferred
async def test_unknown_ca_is_one_line_and_the_client_retries(tls_stack, pki):
    retried = connections(tls_stack, 3)
    client = tls_stack.client("doubtful", tls_creator=client_tls(pki, ca=pki.other_ca))
    problem = await first_report(client)
    assert "\n" not in problem
    assert "failed: TLS handshake failed: certificate verify failed" in problem
    assert "--tls-ca" in problem and problem.endswith("; retrying")
    assert await retried == 3


@pytest_twisted.ensureDeferred
async def test_legacy_handshake_over_tls(tls_stack, pki):
    doubtful = tls_stack.client("old-1", wire_protocol="legacy",
                                tls_creator=client_tls(pki, ca=pki.other_ca))
    problem = await first_report(doubtful)
    assert "failed: TLS handshake failed: certificate verify failed" in problem
    await doubtful.stopService()
    await tls_stack.connected_client("old-2", wire_protocol="legacy",
                                     tls_creator=client_tls(pki))
    result = await tls_stack.invoke("Unary", b"old", (("client-id", "old-2"),))
    assert result.responses == [b"old"], result.details


@pytest_twisted.ensureDeferred
async def test_tls_over_a_unix_listener(reactor, tmp_path, pki):
    registry = ClientRegistry()
    path = tmp_path / "mux.sock"
    server = MultiplexerServer(reactor, registry, ServerSettings(
        multiplexer_listener=f"unix:{path}", **server_tls(pki)))
    server.startService()
    tunnel = Tunnel(reactor, ClientSettings(client_id="local", grpc_server_address="127.0.0.1:1",
                                            multiplexer_address=f"unix:{path}"))
    creator = client_tls(pki)
    client = TunnelClientService(reactor, tunnel, tls_creator_for=lambda address: creator)
    client.startService()
    try:
        session = await client.when_connected().addTimeout(TIMEOUT, reactor)
        assert session.transport.getPeerCertificate() is not None  # the server's
        assert "local" in server.connected_clients
    finally:
        await client.stopService()
        await server.stopService()


# -- mTLS -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_certificate_names_bind_the_id(mtls_stack, pki):
    await mtls_stack.connected_client("sensor-2", tls_creator=client_tls(pki, issued=pki.client))
    connection = mtls_stack.server.connected_clients["sensor-2"]
    assert tls.peer_names(connection.session.transport) == ("sensor-1", "sensor-2")
    result = await mtls_stack.invoke("Unary", b"bound", (("client-id", "sensor-2"),))
    assert result.responses == [b"bound"], result.details


@pytest_twisted.ensureDeferred
async def test_a_client_certificate_from_an_intermediate_ca_is_sent_with_its_chain(
        mtls_stack, pki):
    # The server trusts only the root: it needs the intermediate from the client.
    await mtls_stack.connected_client("sensor-3",
                                      tls_creator=client_tls(pki, issued=pki.chained_client))
    result = await mtls_stack.invoke("Unary", b"chained", (("client-id", "sensor-3"),))
    assert result.responses == [b"chained"], result.details


@pytest_twisted.ensureDeferred
async def test_common_name_binds_when_there_is_no_dns_name(mtls_stack, pki):
    await mtls_stack.connected_client("cn-client", tls_creator=client_tls(pki, issued=pki.cn_only))


@pytest_twisted.ensureDeferred
async def test_id_outside_the_certificate_is_permission_denied(mtls_stack, pki, log_events):
    client = mtls_stack.client("sensor-3", tls_creator=client_tls(pki, issued=pki.client))
    problem = await first_report(client)
    assert "CODE_PERMISSION_DENIED" in problem
    assert "client id 'sensor-3' is not a name in the client certificate " \
           "(sensor-1, sensor-2)" in problem
    assert mtls_stack.registry.snapshot == {}
    refused = [t for t in texts(log_events) if t.startswith("refused client 'sensor-3'")]
    assert refused and "PERMISSION_DENIED" in refused[0]


@pytest.mark.parametrize("issued", [None, "other_client"])
@pytest_twisted.ensureDeferred
async def test_missing_or_foreign_client_certificate_fails_tls(mtls_stack, pki, log_events,
                                                               issued):
    retried = connections(mtls_stack, 2)
    creator = client_tls(pki, issued=getattr(pki, issued) if issued else None)
    client = mtls_stack.client("sensor-1", tls_creator=creator)
    problem = await first_report(client)
    assert problem.startswith(f"TLS with multiplexer {mtls_stack.multiplexer_address} failed: ")
    assert "\n" not in problem
    assert await retried == 2
    assert mtls_stack.registry.snapshot == {}
    server_side = [t for t in texts(log_events) if t.startswith("TLS with 127.0.0.1:")]
    assert server_side and "TLS handshake failed" in server_side[0]


# -- files ----------------------------------------------------------------------


def test_bad_files_are_one_line_errors(tmp_path, pki):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [
        (lambda: tls.server_options(str(tmp_path / "missing.crt"), pki.server.key),
         "missing.crt: cannot be read: No such file or directory"),
        (lambda: tls.server_options(str(junk), pki.server.key),
         "expected one or more PEM certificates"),
        (lambda: tls.server_options(pki.server.cert, str(junk)),
         "expected a PEM private key"),
        (lambda: tls.server_options(pki.server.cert, pki.client.key),
         "does not match the certificate"),
        (lambda: tls.server_options(pki.server.cert, pki.server.key, str(junk)),
         f"--tls-client-ca {junk}: expected one or more PEM certificates"),
        (lambda: tls.client_creator("localhost", str(junk)),
         f"--tls-ca {junk}: expected one or more PEM certificates"),
    ]
    for build, expected in cases:
        with pytest.raises(tls.TLSConfigError) as info:
            build()
        assert expected in str(info.value) and "\n" not in str(info.value)


def test_server_certificate_chain_is_sent(tmp_path, pki):
    chained = tmp_path / "chain.crt"
    chained.write_text(open(pki.server.cert).read() + open(pki.ca).read())
    options = tls.server_options(str(chained), pki.server.key)
    assert len(options.extraCertChain) == 1
