"""A real Go v0.2.1 client against a server that requires tokens: refused, logged.

The legacy handshake has no answer, so the Go client only sees its connection
end; the server logs why and never lists it.
"""

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher

from grpcmux.tokens import hash_token
from mux_stack import TIMEOUT, Stack
from peers import Peer


@pytest_twisted.ensureDeferred
async def test_go_legacy_client_is_refused_when_tokens_are_required(reactor, tmp_path,
                                                                    go_program):
    program = go_program("legacyclient")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"'*': {hash_token('only-for-native-clients')}\n")
    stack = Stack(reactor, tmp_path, settings={"auth_tokens": str(tokens)})
    refused = Deferred()

    def observe(event):
        text = formatEvent(event)
        if text.startswith("refused client 'rainbow'") and not refused.called:
            refused.callback(text)

    globalLogPublisher.addObserver(observe)
    client = Peer([program, "--client-id", "rainbow",
                   "--multiplexer-address", stack.multiplexer_address,
                   "--grpc-server-address", stack.backend.tcp_address])
    try:
        text = await refused.addTimeout(TIMEOUT, reactor)
        assert "CODE_UNAUTHENTICATED: legacy clients carry no credentials" in text
        assert "from 127.0.0.1:" in text
        await stack.in_thread(client.wait, TIMEOUT)  # its tunnel ended: it exits
        assert stack.registry.snapshot == {}
    finally:
        globalLogPublisher.removeObserver(observe)
        await stack.in_thread(client.stop)
        await stack.stop()
