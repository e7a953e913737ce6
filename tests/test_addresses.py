"""HOST:PORT parsing, address checks and the endpoint descriptions made from them."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grpcmux.addresses import (
    AddressError,
    check_dial_address,
    check_listen_address,
    check_server_endpoint,
    parse_host_port,
    server_endpoint_description,
)


@pytest.mark.parametrize(
    "address, listener, expected",
    [
        ("localhost:7602", False, ("localhost", 7602)),
        ("127.0.0.1:1", False, ("127.0.0.1", 1)),
        ("[::1]:7592", False, ("::1", 7592)),
        (":7602", True, ("", 7602)),
        ("127.0.0.1:0", True, ("127.0.0.1", 0)),
    ],
)
def test_split(address, listener, expected):
    assert parse_host_port(address, listener=listener) == expected


@pytest.mark.parametrize(
    "address, listener, why",
    [
        ("localhost", False, "HOST:PORT"),
        ("localhost:http", False, "PORT must be a number"),
        ("localhost:70000", False, "PORT must be in 1..65535"),
        ("localhost:0", False, "PORT must be in 1..65535"),
        (":7602", False, "HOST must be a host name"),
        ("::1:7602", False, "HOST:PORT"),
        ("[nope]:7602", False, "must be an IPv6 address"),
        ("bad_host:1", True, "HOST must be a host name"),
    ],
)
def test_split_errors(address, listener, why):
    with pytest.raises(AddressError, match=why):
        parse_host_port(address, listener=listener)


@pytest.mark.parametrize(
    "address, description",
    [
        ("localhost:7602", "tcp:7602:interface=localhost"),
        ("[::1]:7602", r"tcp6:7602:interface=\:\:1"),
        (":7602", "tcp:7602"),
        ("unix:/run/grpcmux.sock", "unix:/run/grpcmux.sock"),
        ("tcp:7602", "tcp:7602"),
    ],
)
def test_server_endpoint_description(address, description):
    assert server_endpoint_description(address) == description


def test_dial_address_may_be_a_unix_socket():
    assert check_dial_address("unix:/run/grpc.sock") == "unix:/run/grpc.sock"
    with pytest.raises(AddressError, match="path is empty"):
        check_dial_address("unix:")


def test_listen_address_is_not_an_endpoint_string():
    with pytest.raises(AddressError, match="not a Twisted endpoint string"):
        check_listen_address("tcp:7602")


@pytest.mark.parametrize("good", ["tcp:0", "unix:/tmp/x.sock", "localhost:7602"])
def test_server_endpoints(good):
    assert check_server_endpoint(good) == good


def test_bad_server_endpoint_says_what_is_expected():
    with pytest.raises(AddressError, match="Twisted server endpoint"):
        check_server_endpoint("tcp:notaport")


_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_hosts = st.one_of(
    st.lists(_labels, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(str),
)


@given(host=_hosts, port=st.integers(1, 65535))
def test_host_port_round_trip(host, port):
    assert parse_host_port(f"{host}:{port}") == (host, port)


@given(address=st.ip_addresses(v=6), port=st.integers(0, 65535))
def test_ipv6_round_trip(address, port):
    assert parse_host_port(f"[{address}]:{port}", listener=True) == (str(address), port)
