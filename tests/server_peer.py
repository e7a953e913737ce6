"""A multiplexer client written by hand, frame by frame, against a MultiplexerServer
on a StringTransport: no reactor, no sockets."""

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.accepting import SessionFactory
from grpcmux.handshake import MAGIC, MessageReader, encode_message
from grpcmux.testing import data_frame, read_frames, window_update
from grpcmux.yamux import frame as f


class Peer:
    """A client connection to ``server`` on a StringTransport; frames written by hand."""

    def __init__(self, server, port):
        address = IPv4Address("TCP", "127.0.0.1", port)
        self.connection = SessionFactory(server).buildProtocol(address)
        self.session = self.connection.protocol  # behind the first bytes' check
        self.transport = StringTransport(peerAddress=address)
        self.connection.makeConnection(self.transport)
        self.frames = []

    def send(self, *frames):
        self.connection.dataReceived(b"".join(frames))

    def received(self):
        self.frames += read_frames(self.transport)
        return self.frames

    def answers(self):
        """The server's messages on the control stream."""
        body = b"".join(fr.data for fr in self.received() if fr.type == f.TYPE_DATA)
        return [tunnel_pb2.ServerMessage.FromString(m) for m in MessageReader().feed(body)]


def hello(client_id):
    """A native client's opening: the control stream's SYN and its Hello."""
    return window_update(1, flags=f.FLAG_SYN) + data_frame(
        1, MAGIC + encode_message(tunnel_pb2.Hello(client_id=client_id)))
