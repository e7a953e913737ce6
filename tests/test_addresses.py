"""HOST:PORT parsing and the endpoint descriptions made from it."""

import pytest

from grpcmux.addresses import AddressError, server_endpoint_description, split_host_port


@pytest.mark.parametrize(
    "address, expected",
    [
        ("localhost:7602", ("localhost", 7602)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:7592", ("::1", 7592)),
        (":7602", ("", 7602)),
    ],
)
def test_split(address, expected):
    assert split_host_port(address) == expected


@pytest.mark.parametrize(
    "address, why",
    [
        ("localhost", "not HOST:PORT"),
        ("localhost:http", "not a number"),
        ("localhost:70000", "between 0 and 65535"),
        ("::1:7602", "brackets"),
    ],
)
def test_split_errors(address, why):
    with pytest.raises(AddressError, match=why):
        split_host_port(address)


@pytest.mark.parametrize(
    "address, description",
    [
        ("localhost:7602", "tcp:7602:interface=localhost"),
        ("[::1]:7602", r"tcp6:7602:interface=\:\:1"),
        (":7602", "tcp:7602"),
        ("unix:/run/grpcmux.sock", "unix:/run/grpcmux.sock"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_server_endpoint_description(address, description):
    assert server_endpoint_description(address) == description
