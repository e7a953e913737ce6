"""End-user tokens on the proxy endpoint (``--proxy-auth-tokens``), both engines.

The token file lets ``alpha-token`` call ``alpha`` and ``alpha-*``, and ``all-token``
call every client. Calls are refused with UNAUTHENTICATED without a known token and
PERMISSION_DENIED for an id the token may not reach, whether or not that id is
connected; the token never reaches a backend, nor the logs.
"""

import io

import grpc
import pytest
import pytest_twisted
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from twisted.logger import formatEvent, globalLogPublisher

from certs import make_pki
from grpcmux import cli
from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2 as pb
from grpcmux._proto.grpc.multiplexer.v1.discovery_pb2_grpc import DiscoveryServiceStub
from grpcmux.config import ConfigError, ServerSettings
from grpcmux.rpc.security import UNAUTHENTICATED_DETAILS, ServerTLS, load_proxy_security
from grpcmux.tokens import ProxyTokens, hash_token
from mux_stack import TIMEOUT, Stack, run_cli
from rpc_backend import ENGINES, UNLIMITED, Mux, invoke

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALPHA_TOKEN = "alpha-token-3f9c"
ALL_TOKEN = "all-token-b71e"
TOKENS_YAML = (
    f"{hash_token(ALPHA_TOKEN)}: [alpha, alpha-*]\n"
    f"{hash_token(ALL_TOKEN)}: '*'\n"
)


def token(value):
    return (("grpcmux-token", value),)


def to(client_id):
    return (("client-id", client_id),)


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "proxy-tokens.yaml"
    path.write_text(TOKENS_YAML)
    return ProxyTokens.load(str(path))


@pytest.fixture(params=sorted(ENGINES))
def engine(request):
    return ENGINES[request.param]


@pytest_twisted.async_yield_fixture
async def mux(reactor, tmp_path, tokens, engine):
    m = Mux(reactor, tmp_path, **engine, tokens=tokens)
    m.connect("alpha")
    m.connect("beta")
    yield m
    await m.stop()


def assert_refused(result, code, details):
    assert (result.code, result.details) == (code, details)
    assert result.responses == []


# -- forwarded calls ----------------------------------------------------------------


@pytest.mark.parametrize("metadata", [
    to("alpha"),
    to("alpha") + token("not-a-token"),
    to("alpha") + token(""),
    to("alpha") + token(ALPHA_TOKEN) + token(ALPHA_TOKEN),  # exactly one, or none counts
    to("alpha") + (("authorization", f"Bearer {ALPHA_TOKEN}"),),  # the backend's key
    (),  # no client either: unauthenticated callers learn nothing about routing
])
@pytest_twisted.ensureDeferred
async def test_without_a_known_token_calls_are_unauthenticated(mux, metadata):
    result = await mux.invoke("Unary", b"r", metadata)
    assert_refused(result, UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)
    assert mux.backend.calls.empty()


@pytest.mark.parametrize("kind, request_, expected", [
    ("Unary", b"u", [b"u"]),
    ("Bidi", [b"x", b"y"], [b"x", b"y"]),
])
@pytest_twisted.ensureDeferred
async def test_token_allowed_for_the_id_passes_and_is_stripped(mux, kind, request_, expected):
    sent = (("authorization", "Bearer backend-own-secret"), ("x-other", "1"))
    result = await mux.invoke(kind, request_, to("alpha") + token(ALPHA_TOKEN) + sent)
    assert (result.code, result.responses) == (OK, expected), result.details
    assert mux.backend.next_call().metadata == sent  # no grpcmux-token, no client-id


@pytest_twisted.ensureDeferred
async def test_wildcard_token_reaches_every_client(mux):
    result = await mux.invoke("Unary", b"r", to("beta") + token(ALL_TOKEN))
    assert (result.code, result.responses) == (OK, [b"r"]), result.details


@pytest_twisted.ensureDeferred
async def test_permission_denied_does_not_reveal_whether_the_id_is_connected(mux):
    denied = (PERMISSION_DENIED, "this proxy token may not call client 'beta'")
    connected = await mux.invoke("Unary", b"r", to("beta") + token(ALPHA_TOKEN))
    mux.registry.remove("beta")
    gone = await mux.invoke("Unary", b"r", to("beta") + token(ALPHA_TOKEN))
    assert (connected.code, connected.details) == (gone.code, gone.details) == denied
    never = await mux.invoke("Unary", b"r", to("gamma") + token(ALPHA_TOKEN))
    assert_refused(never, PERMISSION_DENIED, "this proxy token may not call client 'gamma'")
    assert mux.backend.calls.empty()


@pytest_twisted.ensureDeferred
async def test_allowed_pattern_for_an_absent_client_is_not_found(mux):
    result = await mux.invoke("Unary", b"r", to("alpha-2") + token(ALPHA_TOKEN))
    assert_refused(result, NOT_FOUND, "client 'alpha-2' is not connected")


@pytest_twisted.ensureDeferred
async def test_default_client_is_authorized_too(reactor, tmp_path, tokens, engine):
    mux = Mux(reactor, tmp_path, **engine, tokens=tokens,
              settings={"default_client_id": "beta"})
    try:
        mux.connect("beta")
        denied = await mux.invoke("Unary", b"r", token(ALPHA_TOKEN))
        assert_refused(denied, PERMISSION_DENIED, "this proxy token may not call client 'beta'")
        allowed = await mux.invoke("Unary", b"r", token(ALL_TOKEN))
        assert (allowed.code, allowed.responses) == (OK, [b"r"]), allowed.details
    finally:
        await mux.stop()


@pytest_twisted.ensureDeferred
async def test_authority_routing_is_authorized(reactor, tmp_path, tokens):
    mux = Mux(reactor, tmp_path, settings={"authority_domain": "mux.invalid"}, tokens=tokens)
    channel = grpc.insecure_channel(mux.address, options=UNLIMITED + [
        ("grpc.default_authority", "beta.mux.invalid")])
    try:
        mux.connect("beta")
        denied = await mux.invoke("Unary", b"r", token(ALPHA_TOKEN), channel=channel)
        assert_refused(denied, PERMISSION_DENIED, "this proxy token may not call client 'beta'")
        anonymous = await mux.invoke("Unary", b"r", (), channel=channel)
        assert_refused(anonymous, UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)
        allowed = await mux.invoke("Unary", b"r", token(ALL_TOKEN), channel=channel)
        assert (allowed.code, allowed.responses) == (OK, [b"r"]), allowed.details
    finally:
        channel.close()
        await mux.stop()


@pytest_twisted.ensureDeferred
async def test_refused_calls_reach_the_call_observer_with_their_code(reactor, tmp_path,
                                                                     tokens, engine):
    codes = []

    def observer(client, code, seconds, bytes_in, bytes_out):
        codes.append(code)

    mux = Mux(reactor, tmp_path, **engine, tokens=tokens, observer=observer)
    try:
        mux.connect("alpha")
        await mux.invoke("Unary", b"r", to("alpha"))
        await mux.invoke("Unary", b"r", to("beta") + token(ALPHA_TOKEN))
        await mux.invoke("Unary", b"r", to("alpha") + token(ALPHA_TOKEN))
    finally:
        await mux.stop()
    assert codes == ["UNAUTHENTICATED", "PERMISSION_DENIED", "OK"]


# -- Discovery: a valid token, and only the ids it may reach ---------------------------


def listed(mux, metadata):
    stub = DiscoveryServiceStub(mux.channel)
    return mux.in_thread(stub.ListGRPCServer, pb.ListGRPCServerRequest(), timeout=TIMEOUT,
                         metadata=metadata)


def rpc_error(mux, fn, *args, **kwargs):
    """A Deferred firing with the grpc.RpcError that ``fn`` raises (in a thread)."""

    def call():
        with pytest.raises(grpc.RpcError) as info:
            result = fn(*args, **kwargs)
            if not hasattr(result, "SerializeToString"):  # a stream: read it
                next(result)
        return info.value

    return mux.in_thread(call)


@pytest_twisted.ensureDeferred
async def test_discovery_list_shows_only_reachable_ids(mux):
    mux.connect("alpha-2")
    assert list((await listed(mux, token(ALPHA_TOKEN))).servers) == ["alpha", "alpha-2"]
    response = await listed(mux, token(ALL_TOKEN))
    assert list(response.servers) == ["alpha", "alpha-2", "beta"]
    assert [d.client_id for d in response.details] == ["alpha", "alpha-2", "beta"]


@pytest.mark.parametrize("method, request_", [
    ("ListGRPCServer", pb.ListGRPCServerRequest()),
    ("WatchGRPCServer", pb.WatchGRPCServerRequest(replay=True)),
])
@pytest.mark.parametrize("metadata", [(), token("wrong")])
@pytest_twisted.ensureDeferred
async def test_discovery_without_a_known_token_is_unauthenticated(mux, method, request_,
                                                                  metadata):
    stub = DiscoveryServiceStub(mux.channel)
    error = await rpc_error(mux, getattr(stub, method), request_, timeout=TIMEOUT,
                            metadata=metadata)
    assert (error.code(), error.details()) == (UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)


@pytest_twisted.ensureDeferred
async def test_discovery_watch_shows_only_reachable_ids(reactor, mux):
    stub = DiscoveryServiceStub(mux.channel)
    call = stub.WatchGRPCServer(pb.WatchGRPCServerRequest(replay=True), timeout=TIMEOUT,
                                metadata=token(ALPHA_TOKEN))
    try:
        first = await mux.in_thread(next, call)  # the replay: subscribed by now
        assert (first.server, first.event) == ("alpha", first.EVENT_CONNECTED)
        mux.connect("beta-2")  # hidden from this token
        mux.registry.remove("beta")
        mux.connect("alpha-3")
        second = await mux.in_thread(next, call)
        assert (second.server, second.event) == ("alpha-3", second.EVENT_CONNECTED)
        mux.registry.remove("alpha")
        third = await mux.in_thread(next, call)
        assert (third.server, third.event) == ("alpha", third.EVENT_DISCONNECTED)
    finally:
        call.cancel()


# -- health and reflection describe the proxy itself: no token needed ----------------


@pytest_twisted.ensureDeferred
async def test_local_health_and_reflection_need_no_token(mux):
    health = health_pb2_grpc.HealthStub(mux.channel)
    reply = await mux.in_thread(health.Check, health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def services():
        stub = reflection_pb2_grpc.ServerReflectionStub(mux.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
        return sorted(s.name for s in response.list_services_response.service)

    assert "grpc.multiplexer.v1.DiscoveryService" in await mux.in_thread(services)


@pytest_twisted.ensureDeferred
async def test_health_of_a_client_is_a_forwarded_call_and_needs_a_token(mux):
    health = health_pb2_grpc.HealthStub(mux.channel)
    error = await rpc_error(mux, health.Check, health_pb2.HealthCheckRequest(),
                            timeout=TIMEOUT, metadata=to("alpha"))
    assert (error.code(), error.details()) == (UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)


# -- logs, settings ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tokens_never_appear_in_logs(reactor, tmp_path, tokens, engine):
    events = []

    def observe(event):
        events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        mux = Mux(reactor, tmp_path, **engine, tokens=tokens)
        try:
            mux.connect("alpha")
            # A client whose socket is gone: its failure in transit is logged.
            mux.connect("alpha-gone", socket_path=str(tmp_path / "gone.sock"))
            for metadata in (token(ALPHA_TOKEN), token(ALL_TOKEN), token("guess-123")):
                await mux.invoke("Unary", b"r", to("alpha") + metadata)
            gone = await mux.invoke("Unary", b"r", to("alpha-gone") + token(ALPHA_TOKEN))
            assert gone.code == grpc.StatusCode.UNAVAILABLE
        finally:
            await mux.stop()
    finally:
        globalLogPublisher.removeObserver(observe)
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert "2 end-user token(s)" in text  # the startup line says tokens are on
    assert "travel in plaintext" in text  # and warns: no TLS
    assert "alpha-gone" in text  # the failure was logged
    for secret in (ALPHA_TOKEN, ALL_TOKEN, "guess-123"):
        assert secret not in text


def test_settings_name_the_token_file_and_errors_are_one_line(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(TOKENS_YAML)
    assert len(load_proxy_security(ServerSettings(proxy_auth_tokens=str(path))).tokens) == 2
    path.write_text(f"{ALPHA_TOKEN}: alpha\n")  # a raw token, not its digest
    with pytest.raises(ConfigError) as info:
        load_proxy_security(ServerSettings(proxy_auth_tokens=str(path)))
    message = str(info.value)
    assert message.startswith(f"--proxy-auth-tokens {path}: entry 1: expected the SHA-256")
    assert ALPHA_TOKEN not in message and "\n" not in message


# -- the whole stack: TLS, a token, a backend's own authorization, the CLI -------------


@pytest_twisted.async_yield_fixture
async def secure_stack(reactor, tmp_path, tokens):
    pki = make_pki(tmp_path / "pki")
    tls = ServerTLS.load(pki.server.cert, pki.server.key)
    s = Stack(reactor, tmp_path, proxy_kwargs={"tls": tls, "tokens": tokens})
    s.ca_path = pki.ca
    s.address = f"localhost:{s.proxy.port}"
    yield s
    await s.stop()


@pytest_twisted.ensureDeferred
async def test_through_the_tunnel_the_backend_sees_its_authorization_not_the_token(
        reactor, secure_stack):
    from grpcmux.rpc.security import channel_credentials

    await secure_stack.connected_client("alpha")
    await secure_stack.connected_client("beta")
    channel = grpc.secure_channel(secure_stack.address,
                                  channel_credentials(secure_stack.ca_path))
    try:
        sent = (("authorization", "Bearer for-the-backend"),)
        result = await secure_stack.in_thread(
            invoke, channel, "Unary", b"hi", to("alpha") + token(ALPHA_TOKEN) + sent, TIMEOUT)
        assert (result.code, result.responses) == (OK, [b"hi"]), result.details
        assert secure_stack.backend.next_call().metadata == sent
        denied = await secure_stack.in_thread(
            invoke, channel, "Unary", b"hi", to("beta") + token(ALPHA_TOKEN), TIMEOUT)
        assert (denied.code, denied.details) == (
            PERMISSION_DENIED, "this proxy token may not call client 'beta'")
    finally:
        channel.close()

    tls = ["--proxy-address", secure_stack.address, "--tls-ca", secure_stack.ca_path]
    status, out, err = await run_cli(reactor, "list", *tls, "--token", ALPHA_TOKEN)
    assert (status, err) == (0, "")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["alpha"]
    status, out, err = await run_cli(reactor, "list", *tls, "--token", ALL_TOKEN)
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["alpha", "beta"]
    status, out, err = await run_cli(reactor, "list", *tls)
    assert (status, out) == (1, "")
    assert err == (f"grpcmux list: the grpcmux proxy at {secure_stack.address} refused the "
                   f"call: {UNAUTHENTICATED_DETAILS} (pass a valid --token or set "
                   "GRPCMUX_TOKEN)\n")


@pytest.mark.parametrize("argv, environ", [
    (["--token", "caf\u00e9-secret"], {}),
    ([], {"GRPCMUX_TOKEN": "two\nlines"}),
])
def test_cli_token_must_be_a_metadata_value_and_is_never_echoed(monkeypatch, argv, environ):
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    out, err = io.StringIO(), io.StringIO()
    status = cli.run(["list", "--proxy-address", "127.0.0.1:1", *argv], out, err)
    assert (status, out.getvalue()) == (cli.EXIT_USAGE, "")
    assert err.getvalue().startswith("grpcmux list: argument --token: expected a token of "
                                     "printable ASCII characters")
    assert "secret" not in err.getvalue() and "lines" not in err.getvalue()
    assert err.getvalue().count("\n") == 1
