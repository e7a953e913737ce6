"""Token files: parsing, one-line errors, and which tokens admit which ids."""

import pytest

from grpcmux.tokens import (
    PROXY_TOKEN_METADATA_KEY,
    ClientTokens,
    ProxyTokens,
    TokenFileError,
    hash_token,
)

LAB = hash_token("lab-secret")
DEVICE = hash_token("device-secret")


def write(tmp_path, text):
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    return str(path)


def test_hash_token_is_the_sha256_hex_digest():
    assert hash_token("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_client_tokens_admit_by_exact_id_and_by_glob(tmp_path):
    tokens = ClientTokens.load(write(tmp_path, f"lab-*: {LAB}\nsensor-1: [{DEVICE}, {LAB}]\n"))
    assert len(tokens) == 2
    assert tokens.admits("lab-7", "lab-secret")
    assert tokens.admits("sensor-1", "device-secret")
    assert tokens.admits("sensor-1", "lab-secret")
    assert not tokens.admits("sensor-2", "device-secret")
    assert not tokens.admits("lab-7", "device-secret")
    assert not tokens.admits("Lab-7", "lab-secret")  # ids are case-sensitive
    assert not tokens.admits("lab-7", "")


def test_digests_are_accepted_in_upper_case(tmp_path):
    tokens = ClientTokens.load(write(tmp_path, f"'*': {LAB.upper()}\n"))
    assert tokens.admits("anything", "lab-secret")


def test_proxy_tokens_map_a_token_to_the_ids_it_may_reach(tmp_path):
    tokens = ProxyTokens.load(write(tmp_path, f"{LAB}: lab-*\n{DEVICE}: [sensor-1, sensor-2]\n"))
    lab = tokens.patterns_for("lab-secret")
    assert lab == ("lab-*",)
    assert ProxyTokens.allows(lab, "lab-3")
    assert not ProxyTokens.allows(lab, "sensor-1")
    assert ProxyTokens.allows(tokens.patterns_for("device-secret"), "sensor-2")
    assert tokens.patterns_for("wrong") is None
    assert tokens.patterns_for("") is None


def test_proxy_tokens_read_exactly_one_token_from_call_metadata(tmp_path):
    tokens = ProxyTokens.load(write(tmp_path, f"{LAB}: lab-*\n"))
    key = PROXY_TOKEN_METADATA_KEY
    assert tokens.patterns_in([("client-id", "lab-1"), (key, "lab-secret")]) == ("lab-*",)
    assert tokens.patterns_in([("authorization", "lab-secret")]) is None
    assert tokens.patterns_in([(key, "lab-secret"), (key, "lab-secret")]) is None
    assert tokens.patterns_in([(key, "wrong")]) is None
    assert tokens.patterns_in([]) is None


@pytest.mark.parametrize(
    "tokens, text, expected",
    [
        (ClientTokens, "lab-1: lab-secret\n", "SHA-256 hex digest"),
        (ClientTokens, "lab-1: []\n", "at least one token digest"),
        (ClientTokens, "[a, b]\n", "non-empty mapping"),
        (ClientTokens, "", "non-empty mapping"),
        (ClientTokens, "lab-1: [\n", "valid YAML"),
        (ClientTokens, f"'': {LAB}\n", "client id or glob pattern"),
        (ClientTokens, f"'a b': {LAB}\n", "client id or glob pattern"),
        (ProxyTokens, "lab-secret: lab-*\n", "SHA-256 hex digest"),
        (ProxyTokens, f"{LAB}: []\n", "pattern or a list"),
        (ProxyTokens, f"{LAB}: {{a: b}}\n", "pattern or a list"),
    ],
)
def test_token_file_errors_are_one_line(tmp_path, tokens, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(TokenFileError) as caught:
        tokens.load(path)
    message = str(caught.value)
    assert expected in message and path in message and "\n" not in message
    assert "lab-s" not in message  # a token pasted by mistake is not echoed


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(TokenFileError, match="cannot be read"):
        ClientTokens.load(str(tmp_path / "nope.yaml"))
