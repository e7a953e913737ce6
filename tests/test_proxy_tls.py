"""TLS and mTLS on the proxy endpoint: file checks, both engines, the CLI, the tunnel.

Certificates are made per module by ``tests/certs.py``: a CA with a server certificate
for ``localhost`` and 127.0.0.1 and a client certificate, and an unrelated CA with a
client certificate of its own.
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.python import usage

from grpcmux import cli
from grpcmux.config import ConfigError, ServerSettings
from grpcmux.rpc.security import ServerTLS, channel_credentials, load_proxy_security
from grpcmux.tap import server as server_tap
from grpcmux.tls import TLSConfigError
from mux_stack import TIMEOUT, Stack, run_cli
from rpc_backend import ENGINES, UNLIMITED, Mux, invoke

REPO = Path(__file__).resolve().parent.parent
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
ROUTE = (("client-id", "alpha"),)
_TWISTD = ("import sys; sys.argv = ['twistd'] + sys.argv[1:]; "
           "from twisted.scripts.twistd import run; run()")


def server_tls(pki, mutual=False):
    return ServerTLS.load(pki.server.cert, pki.server.key,
                          pki.ca if mutual else None)


def tls_channel(address, ca, cert=None, key=None):
    return grpc.secure_channel(address, channel_credentials(ca, cert, key), options=UNLIMITED)


# -- file checks: one line naming option and file, before grpcio sees anything -------


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def error_of(call, *args):
    with pytest.raises(TLSConfigError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_good_files_load(pki):
    tls = server_tls(pki, mutual=True)
    assert tls.pair.chain_pem == Path(pki.server.cert).read_bytes()
    assert tls.pair.key_pem == Path(pki.server.key).read_bytes()
    assert [c.public_bytes(serialization.Encoding.PEM) for c in tls.client_ca] == [
        c.public_bytes(serialization.Encoding.PEM)
        for c in x509.load_pem_x509_certificates(Path(pki.ca).read_bytes())]
    assert tls.requires_client_certificates
    assert not server_tls(pki).requires_client_certificates


def test_missing_certificate_file(pki, tmp_path):
    missing = tmp_path / "nope.pem"
    assert error_of(ServerTLS.load, missing, pki.server.key) == (
        f"--proxy-tls-cert {missing}: cannot be read: No such file or directory")


@pytest.mark.parametrize("data", [b"", b"garbage\n", b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                                  b"-----END CERTIFICATE-----\n"])
def test_garbage_certificate(pki, tmp_path, data):
    bad = write(tmp_path, "bad.pem", data)
    assert error_of(ServerTLS.load, bad, pki.server.key) == (
        f"--proxy-tls-cert {bad}: expected one or more PEM certificates "
        "(-----BEGIN CERTIFICATE-----)")


def test_garbage_key(pki, tmp_path):
    bad = write(tmp_path, "bad.key", b"-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n")
    assert error_of(ServerTLS.load, pki.server.cert, bad) == (
        f"--proxy-tls-key {bad}: expected a PEM private key (-----BEGIN PRIVATE KEY-----)")


def test_certificate_given_as_key(pki):
    path = pki.server.cert
    assert error_of(ServerTLS.load, path, path).startswith(f"--proxy-tls-key {path}: expected")


def test_encrypted_key(pki, tmp_path):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(pki.server.key).read_bytes(), None)
    encrypted = write(tmp_path, "enc.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    assert error_of(ServerTLS.load, pki.server.cert, encrypted).startswith(
        f"--proxy-tls-key {encrypted}: the private key is encrypted; expected an unencrypted")


def test_key_of_another_certificate(pki):
    message = error_of(ServerTLS.load, pki.server.cert, pki.client.key)
    assert message == (
        f"--proxy-tls-key {pki.client.key}: does not match the certificate in "
        f"--proxy-tls-cert {pki.server.cert} (the first certificate must be the one "
        "the key signs for)")


def test_garbage_client_ca(pki, tmp_path):
    bad = write(tmp_path, "ca.pem", b"not a CA")
    assert error_of(ServerTLS.load, pki.server.cert, pki.server.key, bad) == (
        f"--proxy-tls-client-ca {bad}: expected one or more PEM certificates "
        "(-----BEGIN CERTIFICATE-----)")


def test_channel_credentials_errors_name_the_cli_flags(pki, tmp_path):
    bad = write(tmp_path, "bad.pem", b"x")
    assert error_of(channel_credentials, bad).startswith(f"--tls-ca {bad}: expected")
    assert error_of(channel_credentials, None, pki.client.cert) == (
        "--tls-cert and --tls-key go together")
    assert error_of(channel_credentials, None, pki.client.cert,
                    pki.server.key).startswith(f"--tls-key {pki.server.key}: "
                                                    "does not match")


def test_settings_take_certificate_and_key_together(pki):
    with pytest.raises(ConfigError, match="^--proxy-tls-cert and --proxy-tls-key: expected "
                                          "both"):
        ServerSettings(proxy_tls_cert=pki.server.cert)
    with pytest.raises(ConfigError, match="^--proxy-tls-client-ca: expected --proxy-tls-cert "
                                          "and --proxy-tls-key as well"):
        ServerSettings(proxy_tls_client_ca=pki.ca)


def test_load_proxy_security(pki, tmp_path):
    assert load_proxy_security(ServerSettings()).tls is None
    settings = ServerSettings(proxy_tls_cert=pki.server.cert,
                              proxy_tls_key=pki.server.key)
    loaded = load_proxy_security(settings).tls
    assert (loaded.pair.chain_pem, loaded.pair.key_pem, loaded.client_ca) == (
        Path(pki.server.cert).read_bytes(), Path(pki.server.key).read_bytes(), None)
    bad = write(tmp_path, "bad.pem", b"x")
    with pytest.raises(ConfigError, match=f"^--proxy-tls-cert {bad}: expected one"):
        load_proxy_security(ServerSettings(proxy_tls_cert=str(bad),
                                           proxy_tls_key=pki.server.key))


def test_twistd_exits_with_one_line_for_a_bad_certificate(tmp_path):
    bad = write(tmp_path, "proxy.pem", b"garbage")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPCMUX_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=os.pathsep.join([str(REPO)] + sys.path))
    result = subprocess.run(
        [sys.executable, "-c", _TWISTD, "--nodaemon", "--pidfile=", "grpcmux-server",
         "--proxy-tls-cert", str(bad), "--proxy-tls-key", str(bad)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"--proxy-tls-cert {bad}: expected one or more PEM certificates" in output
    assert "Traceback" not in output


def test_twistd_options_report_a_bad_key_in_one_line(pki, tmp_path):
    options = server_tap.Options(environ={}, home=str(tmp_path), etc_dir=str(tmp_path))
    with pytest.raises(usage.UsageError) as info:
        options.parseOptions(["--proxy-tls-cert", pki.server.cert,
                              "--proxy-tls-key", pki.client.key])
    assert str(info.value).startswith(f"--proxy-tls-key {pki.client.key}: does not match")


# -- both engines serve TLS and mTLS on the one port ----------------------------------


@pytest_twisted.async_yield_fixture(params=sorted(ENGINES))
async def tls_mux(request, reactor, tmp_path, pki):
    m = Mux(reactor, tmp_path, **ENGINES[request.param], tls=server_tls(pki))
    m.connect("alpha")
    yield m
    await m.stop()


@pytest_twisted.async_yield_fixture(params=sorted(ENGINES))
async def mtls_mux(request, reactor, tmp_path, pki):
    m = Mux(reactor, tmp_path, **ENGINES[request.param], tls=server_tls(pki, mutual=True))
    m.connect("alpha")
    yield m
    await m.stop()


async def call_with(mux, channel, kind="Unary", request=b"ping", metadata=ROUTE):
    try:
        return await mux.invoke(kind, request, metadata, channel=channel)
    finally:
        channel.close()


def assert_handshake_failed(result):
    assert result.code == UNAVAILABLE, (result.code, result.details)
    assert result.responses == []


@pytest_twisted.ensureDeferred
async def test_tls_call_with_the_right_ca(tls_mux, pki):
    for host in ("127.0.0.1", "localhost"):  # an IP and a DNS subject alternative name
        channel = tls_channel(f"{host}:{tls_mux.service.port}", pki.ca)
        result = await call_with(tls_mux, channel, "Bidi", [b"a", b"b"])
        assert (result.code, result.responses) == (OK, [b"a", b"b"]), result.details


@pytest_twisted.ensureDeferred
async def test_tls_local_services_share_the_port(tls_mux, pki):
    channel = tls_channel(tls_mux.address, pki.ca)
    try:
        reply = await tls_mux.in_thread(health_pb2_grpc.HealthStub(channel).Check,
                                        health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    finally:
        channel.close()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest_twisted.ensureDeferred
async def test_tls_fails_with_a_wrong_ca(tls_mux, pki):
    result = await call_with(tls_mux, tls_channel(tls_mux.address, pki.other_ca))
    assert_handshake_failed(result)
    assert "CERTIFICATE_VERIFY_FAILED" in result.details
    assert tls_mux.backend.calls.empty()


@pytest_twisted.ensureDeferred
async def test_tls_port_refuses_plaintext(tls_mux):
    result = await tls_mux.invoke("Unary", b"ping", ROUTE)  # Mux's own channel: plaintext
    assert_handshake_failed(result)
    assert tls_mux.backend.calls.empty()


@pytest_twisted.ensureDeferred
async def test_tls_server_name_must_match(tls_mux, pki):
    credentials = channel_credentials(pki.ca)
    channel = grpc.secure_channel(tls_mux.address, credentials,
                                  options=[("grpc.ssl_target_name_override", "other.example")])
    result = await call_with(tls_mux, channel)
    assert_handshake_failed(result)


@pytest_twisted.ensureDeferred
async def test_mtls_with_a_client_certificate(mtls_mux, pki):
    channel = tls_channel(mtls_mux.address, pki.ca,
                          pki.client.cert, pki.client.key)
    result = await call_with(mtls_mux, channel)
    assert (result.code, result.responses) == (OK, [b"ping"]), result.details


@pytest_twisted.ensureDeferred
async def test_mtls_without_a_client_certificate_fails(mtls_mux, pki):
    result = await call_with(mtls_mux, tls_channel(mtls_mux.address, pki.ca))
    assert_handshake_failed(result)
    assert mtls_mux.backend.calls.empty()


@pytest_twisted.ensureDeferred
async def test_mtls_with_a_certificate_from_another_ca_fails(mtls_mux, pki):
    channel = tls_channel(mtls_mux.address, pki.ca,
                          pki.other_client.cert, pki.other_client.key)
    result = await call_with(mtls_mux, channel)
    assert_handshake_failed(result)
    assert mtls_mux.backend.calls.empty()


# -- through a real tunnel, and the grpcmux command -----------------------------------


@pytest_twisted.async_yield_fixture
async def tls_stack(reactor, tmp_path, pki):
    s = Stack(reactor, tmp_path, proxy_kwargs={"tls": server_tls(pki, mutual=True)})
    yield s
    await s.stop()


def cli_tls_args(pki, address):
    return ["--proxy-address", address, "--tls-ca", pki.ca,
            "--tls-cert", pki.client.cert, "--tls-key", pki.client.key]


@pytest_twisted.ensureDeferred
async def test_mtls_through_the_tunnel_and_cli_list(reactor, tls_stack, pki):
    await tls_stack.connected_client("edge")
    address = f"localhost:{tls_stack.proxy.port}"
    channel = tls_channel(address, pki.ca, pki.client.cert,
                          pki.client.key)
    try:
        result = await tls_stack.in_thread(invoke, channel, "Unary", b"hi",
                                           (("client-id", "edge"),), TIMEOUT)
    finally:
        channel.close()
    assert (result.code, result.responses) == (OK, [b"hi"]), result.details

    status, out, err = await run_cli(reactor, "list", "--json", *cli_tls_args(pki, address))
    assert (status, err) == (0, "")
    assert '"client_id": "edge"' in out

    # --tls-server-name: the certificate names localhost, not the address dialled.
    status, out, err = await run_cli(
        reactor, "list", "--proxy-address", f"127.0.0.1:{tls_stack.proxy.port}",
        "--tls-ca", pki.ca, "--tls-cert", pki.client.cert,
        "--tls-key", pki.client.key, "--tls-server-name", "localhost")
    assert (status, err) == (0, "")
    assert out.splitlines()[1].startswith("edge ")


@pytest_twisted.ensureDeferred
async def test_cli_without_client_certificate_fails_in_one_line(reactor, tls_stack, pki):
    address = f"localhost:{tls_stack.proxy.port}"
    status, out, err = await run_cli(reactor, "list", "--proxy-address", address,
                                     "--tls-ca", pki.ca, "--timeout", "5")
    assert (status, out) == (1, "")
    assert err.startswith(f"grpcmux list: cannot reach the grpcmux proxy at {address}: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--tls-ca", "--tls-cert"])
def test_cli_bad_certificate_file_is_a_one_line_usage_error(tmp_path, pki, flag):
    bad = write(tmp_path, "bad.pem", b"nonsense")
    argv = ["list", "--proxy-address", "127.0.0.1:1", flag, str(bad)]
    if flag == "--tls-cert":
        argv += ["--tls-key", pki.client.key]
    out, err = io.StringIO(), io.StringIO()
    assert cli.run(argv, out, err) == cli.EXIT_USAGE
    assert err.getvalue() == (
        f"grpcmux list: {flag} {bad}: expected one or more PEM certificates "
        "(-----BEGIN CERTIFICATE-----)\n")
    out, err = io.StringIO(), io.StringIO()
    assert cli.run(["watch", "--proxy-address", "127.0.0.1:1", "--tls-key",
                    pki.client.key], out, err) == cli.EXIT_USAGE
    assert err.getvalue() == "grpcmux watch: --tls-cert and --tls-key go together\n"
