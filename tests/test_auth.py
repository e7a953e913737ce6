"""Client admission on the multiplexer endpoint: tokens and legacy clients.

The policy itself (``grpcmux.admission``) is tested on ``ClientHello`` values; the
rest over a real loopback stack, with a native client and a Python legacy client.
Tokens must never reach the log: every event of a refused and an admitted handshake
is rendered and searched for the token.
"""

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher

from grpcmux.admission import Admission
from grpcmux.config import ClientSettings, ConfigError, ServerSettings, load_client_settings
from grpcmux.handshake import WIRE_LEGACY, WIRE_NATIVE, ClientHello
from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.tokens import ClientTokens, hash_token
from mux_stack import TIMEOUT, Stack, first_report

TOKEN = "s3cret-Token-for-edge"
OTHER_TOKEN = "another-s3cret-token"


def tokens_file(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(
        f"edge-1: {hash_token(TOKEN)}\n"
        f"'lab-*': [{hash_token(OTHER_TOKEN)}]\n"
    )
    return str(path)


def hello(client_id, token="", wire_protocol=WIRE_NATIVE):
    return ClientHello(client_id=client_id, wire_protocol=wire_protocol, token=token)


@pytest.fixture
def tokens(tmp_path):
    return ClientTokens.load(tokens_file(tmp_path))


# -- the policy -------------------------------------------------------------------


def test_no_authentication_admits_everyone():
    admission = Admission()
    assert admission.refusal(hello("x"), None) is None
    assert admission.refusal(hello("x", wire_protocol=WIRE_LEGACY), None) is None
    assert admission.describe() == "no client authentication"


@pytest.mark.parametrize("client_id, token, reason", [
    ("edge-1", TOKEN, None),
    ("lab-7", OTHER_TOKEN, None),
    ("edge-1", "", "this server requires a token"),
    ("edge-1", OTHER_TOKEN, "the token is not valid for client id 'edge-1'"),
    ("lab-7", TOKEN, "the token is not valid for client id 'lab-7'"),
    ("unknown", TOKEN, "the token is not valid for client id 'unknown'"),
])
def test_tokens(tokens, client_id, token, reason):
    refusal = Admission(tokens=tokens).refusal(hello(client_id, token), None)
    if reason is None:
        assert refusal is None
    else:
        assert refusal.code == tunnel_pb2.Reject.CODE_UNAUTHENTICATED
        assert reason in refusal.message
        assert TOKEN not in refusal.message and OTHER_TOKEN not in refusal.message
        assert "lab-" not in refusal.message.replace("'lab-7'", "")  # no other ids


def test_legacy_clients_are_refused_when_clients_authenticate(tokens):
    legacy = hello("free-id", wire_protocol=WIRE_LEGACY)
    for admission in (Admission(tokens=tokens), Admission(client_ca=True)):
        refusal = admission.refusal(legacy, None)
        assert refusal.code == tunnel_pb2.Reject.CODE_UNAUTHENTICATED
        assert "--allow-legacy-clients" in refusal.message


def test_allowed_legacy_clients_may_not_take_ids_a_token_covers(tokens):
    admission = Admission(tokens=tokens, allow_legacy_clients=True)
    assert admission.refusal(hello("free-id", wire_protocol=WIRE_LEGACY), None) is None
    for covered in ("edge-1", "lab-3"):
        refusal = admission.refusal(hello(covered, wire_protocol=WIRE_LEGACY), None)
        assert refusal.code == tunnel_pb2.Reject.CODE_UNAUTHENTICATED
        assert "needs a token" in refusal.message
    # Native clients still need their token.
    assert admission.refusal(hello("edge-1"), None).code == tunnel_pb2.Reject.CODE_UNAUTHENTICATED


def test_certificate_binding_applies_to_allowed_legacy_clients_too():
    admission = Admission(client_ca=True, client_id_from_cert=True, allow_legacy_clients=True)
    legacy = hello("sensor-9", wire_protocol=WIRE_LEGACY)
    refusal = admission.refusal(legacy, ("sensor-1",))
    assert refusal.code == tunnel_pb2.Reject.CODE_PERMISSION_DENIED
    assert admission.refusal(hello("sensor-1", wire_protocol=WIRE_LEGACY), ("sensor-1",)) is None
    assert admission.refusal(hello("sensor-1"), None).code == tunnel_pb2.Reject.CODE_PERMISSION_DENIED


def test_token_is_not_in_the_repr_of_a_hello_or_the_settings(tmp_path):
    assert TOKEN not in repr(hello("edge-1", TOKEN))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    settings = load_client_settings({"token_file": str(token_file)}, environ={},
                                    home=str(tmp_path), etc_dir=str(tmp_path))
    assert settings.token == TOKEN
    assert TOKEN not in repr(settings) and TOKEN not in str(settings)
    from_env = load_client_settings({}, environ={"GRPCMUX_TOKEN": TOKEN},
                                    home=str(tmp_path), etc_dir=str(tmp_path))
    assert from_env.token == TOKEN and TOKEN not in repr(from_env)


@pytest.mark.parametrize("flags, environ", [
    ({"token": "has space"}, {}),
    ({}, {"GRPCMUX_TOKEN": "has\ttab"}),
])
def test_a_bad_token_is_not_echoed(tmp_path, flags, environ):
    with pytest.raises(ConfigError) as info:
        load_client_settings(flags, environ=environ, home=str(tmp_path), etc_dir=str(tmp_path))
    message = str(info.value)
    assert "token" in message and "has" not in message
    with pytest.raises(ConfigError) as info:
        ClientSettings(token="bad token")
    assert "bad token" not in str(info.value)


def test_token_and_token_file_together_is_an_error(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with pytest.raises(ConfigError) as info:
        ClientSettings(token=TOKEN, token_file=str(token_file))
    assert "expected one of them" in str(info.value) and TOKEN not in str(info.value)
    with pytest.raises(ConfigError) as info:
        ClientSettings(token_file=str(tmp_path / "absent"))
    assert "cannot be read" in str(info.value)


def test_a_missing_auth_tokens_file_names_the_option(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        ServerSettings(auth_tokens=str(missing))
    assert str(info.value) == (
        f"--auth-tokens {missing}: cannot be read: No such file or directory")


# -- over loopback ----------------------------------------------------------------


def assert_token_never_logged(events, *tokens):
    for event in events:
        rendered = formatEvent(event) + repr(event)
        for token in tokens:
            assert token not in rendered, event


def refused_event(events, client_id):
    """A Deferred firing with the server's 'refused client' line for ``client_id``."""
    found = Deferred()

    def observe(event):
        text = formatEvent(event)
        if text.startswith(f"refused client {client_id!r}") and not found.called:
            found.callback(text)

    globalLogPublisher.addObserver(observe)
    found.addBoth(lambda result: globalLogPublisher.removeObserver(observe) or result)
    from twisted.internet import reactor

    return found.addTimeout(TIMEOUT, reactor)


def token_stack(reactor, tmp_path, allow_legacy_clients=False):
    return Stack(reactor, tmp_path, settings={"auth_tokens": tokens_file(tmp_path),
                                              "allow_legacy_clients": allow_legacy_clients})


@pytest_twisted.async_yield_fixture
async def tokens_stack(reactor, tmp_path):
    stack = token_stack(reactor, tmp_path)
    yield stack
    await stack.stop()


@pytest_twisted.ensureDeferred
async def test_token_admits_and_its_absence_refuses(log_events, tokens_stack):
    refused = tokens_stack.client("edge-1", token=OTHER_TOKEN)
    problem = await first_report(refused)
    assert problem.endswith(
        "refused client edge-1: CODE_UNAUTHENTICATED: the token is not valid for "
        "client id 'edge-1'")
    await refused.stopService()
    missing = tokens_stack.client("edge-1")
    problem = await first_report(missing)
    assert "CODE_UNAUTHENTICATED: this server requires a token" in problem
    await missing.stopService()
    await tokens_stack.connected_client("edge-1", token=TOKEN)
    result = await tokens_stack.invoke("Unary", b"authenticated", (("client-id", "edge-1"),))
    assert result.responses == [b"authenticated"], result.details
    texts = [formatEvent(event) for event in log_events]
    assert any(t.startswith("refused client 'edge-1'") for t in texts)
    assert "--auth-tokens without --tls-cert: tokens cross the network in clear" in texts
    assert any(t.startswith("client edge-1 connected from") for t in texts)
    assert_token_never_logged(log_events, TOKEN, OTHER_TOKEN)


@pytest_twisted.ensureDeferred
async def test_legacy_client_is_disconnected_when_tokens_are_required(tokens_stack):
    logged = refused_event(None, "free-id")
    client = tokens_stack.client("free-id", wire_protocol="legacy")
    text = await logged
    assert "CODE_UNAUTHENTICATED: legacy clients carry no credentials" in text
    await client.stopService()
    assert tokens_stack.registry.snapshot == {}


@pytest_twisted.ensureDeferred
async def test_allow_legacy_clients_warns_and_admits_uncovered_ids(reactor, tmp_path,
                                                                   log_events):
    stack = token_stack(reactor, tmp_path, allow_legacy_clients=True)
    try:
        warnings = [formatEvent(e) for e in log_events if e.get("log_level").name == "warn"]
        assert any(w.startswith("--allow-legacy-clients: legacy clients are admitted")
                   for w in warnings)
        await stack.connected_client("free-id", wire_protocol="legacy")
        result = await stack.invoke("Unary", b"legacy", (("client-id", "free-id"),))
        assert result.responses == [b"legacy"], result.details
        logged = refused_event(None, "edge-1")
        stack.client("edge-1", wire_protocol="legacy")
        assert "needs a token, which a legacy client cannot send" in await logged
        assert "edge-1" not in stack.registry.snapshot
    finally:
        await stack.stop()


def test_token_command_prints_a_fresh_token_and_its_digest():
    import io

    from grpcmux import cli

    outputs = []
    for _ in range(2):
        out = io.StringIO()
        assert cli.run(["token"], out, io.StringIO()) == 0
        lines = dict(line.split(":", 1) for line in out.getvalue().splitlines())
        token, digest = lines["token"].strip(), lines["digest"].strip()
        assert len(token) >= 40 and digest == hash_token(token)
        assert ClientTokens([("x", (digest.encode(),))]).admits("x", token)
        outputs.append(token)
    assert outputs[0] != outputs[1]


def test_client_warns_about_a_token_without_tls(reactor, log_events):
    from grpcmux.tap.client import make_service

    make_service(ClientSettings(client_id="edge-1", token=TOKEN), reactor)
    texts = [formatEvent(event) for event in log_events]
    assert "a token without --tls crosses the network in clear" in texts
    assert_token_never_logged(log_events, TOKEN)
