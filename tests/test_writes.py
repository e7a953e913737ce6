"""WriteBatch: socket transports written during a read are sent as it ends."""

from twisted.internet.abstract import FileDescriptor
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.testing import StringTransport

from grpcmux.writes import WriteBatch, send_now


class FakeSocket(FileDescriptor):
    """A FileDescriptor that records doWrite calls instead of sending."""

    def __init__(self, result=None):
        super().__init__(reactor=object())
        self.connected = True
        self.sends = 0
        self.writing = 0
        self.result = result

    def doWrite(self):
        self.sends += 1
        return self.result

    def startWriting(self):
        self.writing += 1


def test_transports_written_in_a_read_are_sent_once_as_it_ends():
    batch = WriteBatch()
    one, two = FakeSocket(), FakeSocket()
    batch.begin()
    batch.wrote(one)
    batch.wrote(two)
    batch.wrote(one)
    assert (one.sends, two.sends) == (0, 0)
    batch.end()
    assert (one.sends, two.sends) == (1, 1)


def test_nested_reads_send_at_the_outermost_end():
    batch = WriteBatch()
    socket = FakeSocket()
    batch.begin()
    batch.begin()
    batch.wrote(socket)
    batch.end()
    assert socket.sends == 0 and batch.active
    batch.end()
    assert socket.sends == 1 and not batch.active


def test_writes_outside_a_read_are_left_to_the_reactor():
    batch = WriteBatch()
    socket = FakeSocket()
    batch.wrote(socket)
    batch.begin()
    batch.end()
    assert socket.sends == 0


def test_other_transports_are_left_alone():
    batch = WriteBatch()
    batch.begin()
    batch.wrote(StringTransport())  # not a socket: no doWrite to call
    batch.end()
    assert not batch.active


def test_callbacks_run_before_the_sends_and_their_writes_join_the_batch():
    batch = WriteBatch()
    socket = FakeSocket()
    order = []

    def flush():
        order.append(("flush", socket.sends, batch.active))
        batch.wrote(socket)

    batch.begin()
    batch.before_send(flush)
    batch.end()
    assert order == [("flush", 0, True)]
    assert socket.sends == 1 and not batch.active


def test_a_failing_callback_is_logged_and_the_batch_still_sends(logged_errors):
    batch = WriteBatch()
    socket = FakeSocket()
    batch.begin()
    batch.wrote(socket)
    batch.before_send(lambda: 1 / 0)
    batch.end()
    assert socket.sends == 1
    assert len(logged_errors) == 1
    logged_errors.clear()


def test_a_closing_transport_is_left_to_the_reactor():
    socket = FakeSocket()
    socket.disconnecting = True
    send_now(socket)
    assert socket.sends == 0


def test_a_failed_send_stays_registered_so_the_reactor_closes_it():
    socket = FakeSocket(result=CONNECTION_LOST)
    send_now(socket)
    assert socket.sends == 1 and socket.writing == 1


def test_batched_data_received_sends_as_it_returns_even_when_it_raises():
    from grpcmux.writes import BATCH, batched

    class Reader:
        def __init__(self):
            self.socket = FakeSocket()

        @batched
        def dataReceived(self, data):
            BATCH.wrote(self.socket)
            assert self.socket.sends == 0 and BATCH.active
            if data == b"boom":
                raise ValueError(data)

    reader = Reader()
    reader.dataReceived(b"x")
    assert reader.socket.sends == 1 and not BATCH.active
    failing = Reader()
    try:
        failing.dataReceived(b"boom")
    except ValueError:
        pass
    assert failing.socket.sends == 1 and not BATCH.active
