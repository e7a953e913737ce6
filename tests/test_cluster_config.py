"""The cluster options of grpcmux.config: sources, checks, derived values."""

import socket

import pytest

from grpcmux.config import ConfigError, load_server_settings

URLS = "http://127.0.0.1:2379,http://127.0.0.1:22379"


@pytest.fixture
def token(tmp_path):
    path = tmp_path / "cluster.token"
    path.write_text("s3cret\n")
    return str(path)


def load(tmp_path, flags=None, environ=None, yaml=None):
    if yaml is not None:
        (tmp_path / "server.yaml").write_text(yaml)
        flags = dict(flags or {}, config=str(tmp_path / "server.yaml"))
    return load_server_settings(flags or {}, environ=environ or {}, home=str(tmp_path),
                                etc_dir=str(tmp_path))


def error_of(tmp_path, **kwargs):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_off_by_default(tmp_path):
    settings = load(tmp_path)
    assert settings.cluster_etcd is None and settings.node_name is None


def test_flag_environment_and_yaml_each_turn_it_on(tmp_path, token):
    by_flag = load(tmp_path, {"cluster_etcd": URLS, "cluster_token_file": token})
    by_env = load(tmp_path, environ={"GRPCMUX_CLUSTER_ETCD": URLS,
                                     "GRPCMUX_CLUSTER_TOKEN_FILE": token})
    by_yaml = load(tmp_path, yaml=f"cluster-etcd: {URLS}\ncluster-token-file: {token}\n"
                                  "node-name: n1\ncluster-listener: 10.0.0.5:7612\n")
    for settings in (by_flag, by_env, by_yaml):
        assert settings.cluster_etcd == URLS
        assert settings.cluster_token == "s3cret"
        assert settings.etcd_tls is None and settings.etcd_password is None
    assert by_flag.node_name == socket.gethostname()
    assert by_flag.cluster_advertise == "localhost:7612"  # from the default listener
    assert by_yaml.node_name == "n1" and by_yaml.cluster_advertise == "10.0.0.5:7612"


def test_advertise_given_or_needed(tmp_path, token):
    base = {"cluster_etcd": URLS, "cluster_token_file": token}
    given = load(tmp_path, dict(base, cluster_listener="tcp:7612",
                                cluster_advertise="node1.example:7612"))
    assert given.cluster_advertise == "node1.example:7612"
    message = error_of(tmp_path, flags=dict(base, cluster_listener="0.0.0.0:7612"))
    assert message.startswith("--cluster-advertise: expected the HOST:PORT other nodes dial")
    assert "--cluster-advertise: expected" in error_of(
        tmp_path, flags=dict(base, cluster_advertise="node1"))


@pytest.mark.parametrize("flags, expected", [
    ({"node_name": "n1"}, "--node-name: expected --cluster-etcd as well"),
    ({"cluster_tls_ca": "/x"}, "--cluster-tls-ca: expected --cluster-etcd as well"),
    ({"cluster_etcd": "ftp://h:1"}, "--cluster-etcd: expected etcd client URLs"),
    ({"cluster_etcd": "http://h:1,https://h:2"}, "mix http:// and https://"),
    ({"cluster_etcd": "http://h:99999"}, "has a bad port"),
    ({"cluster_etcd": URLS}, "--cluster-token-file: expected a file"),
    ({"cluster_etcd": URLS, "node_name": "a/b"}, "--node-name: expected a node name"),
])
def test_bad_values_are_one_line(tmp_path, flags, expected):
    assert expected in error_of(tmp_path, flags=flags)


def test_options_that_go_together(tmp_path, token, pki):
    base = {"cluster_etcd": URLS, "cluster_token_file": token}
    assert "expected all three" in error_of(
        tmp_path, flags=dict(base, cluster_tls_cert=pki.server.cert))
    assert "--cluster-etcd-ca: expected https:// etcd URLs" in error_of(
        tmp_path, flags=dict(base, cluster_etcd_ca=pki.ca))
    assert "--cluster-etcd-user and --cluster-etcd-password-file" in error_of(
        tmp_path, flags=dict(base, cluster_etcd_user="grpcmux"))
    assert "--cluster-tls-key" in error_of(tmp_path, flags=dict(
        base, cluster_tls_cert=pki.server.cert, cluster_tls_key=pki.client.key,
        cluster_tls_ca=pki.ca))
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    assert error_of(tmp_path, flags=dict(base, cluster_token_file=str(empty))) == (
        f"--cluster-token-file {empty}: expected a token of printable characters "
        "without whitespace")
    missing = error_of(tmp_path, flags=dict(base, cluster_token_file="/nonexistent/t"))
    assert missing == "--cluster-token-file /nonexistent/t: cannot be read: No such file or directory"


def test_etcd_tls_and_auth_files_are_read(tmp_path, token, pki):
    password = tmp_path / "etcd.password"
    password.write_text("pw\n")
    settings = load(tmp_path, {
        "cluster_etcd": "https://127.0.0.1:2379", "cluster_token_file": token,
        "cluster_etcd_ca": pki.ca, "cluster_etcd_cert": pki.client.cert,
        "cluster_etcd_key": pki.client.key, "cluster_etcd_user": "grpcmux",
        "cluster_etcd_password_file": str(password),
        "cluster_tls_cert": pki.server.cert, "cluster_tls_key": pki.server.key,
        "cluster_tls_ca": pki.ca})
    ca, key, chain = settings.etcd_tls
    assert ca.startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" in key and chain.startswith(b"-----BEGIN CERTIFICATE-----")
    assert settings.etcd_password == "pw"
    system_roots = load(tmp_path, {"cluster_etcd": "https://etcd.example:2379",
                                   "cluster_token_file": token})
    assert system_roots.etcd_tls == (None, None, None)
