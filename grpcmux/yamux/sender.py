"""The send side of a yamux session: control frames first, then DATA round-robin.

A ``Sender`` owns what a session has to write: control frames (SYN/ACK window
updates, RST, PING, GO_AWAY, credit) and the queue of streams with DATA or a FIN
to send.  Control frames go out before any DATA; DATA goes one bounded frame
per stream per turn, so one busy stream cannot starve the others.  Frames of one
flush are collected and written to the transport joined, and the flush stops
while the transport has paused the session (its registered producer).
"""

from collections import deque

from grpcmux.writes import BATCH

# DATA bytes sent in one flush before yielding to the reactor (fairness with
# everything else the reactor runs; transports that never pause, too).
FLUSH_BUDGET = 1024 * 1024
# Collected frames are handed to the transport at least this often in a flush.
WRITE_SIZE = 256 * 1024


class Sender:
    """Writes one session's frames to its transport.

    ``receiving`` is set by the session while it parses a read: control frames
    raised then wait for the flush at the end of the read, and so does DATA.
    Outside a read, control frames are written at once and DATA from a
    ``callLater(0)`` flush, so writes made in one reactor turn are coalesced.
    ``control_written`` is called after control frames went to the transport
    (the session counts unacknowledged SYNs until then).
    """

    def __init__(self, session, control_written):
        self._session = session
        self._control_written_hook = control_written
        self.receiving = False
        self.writing_paused = False
        self._reading_paused = False
        self._paused_control_bytes = 0
        self._control = []
        self._ready = deque()
        self._queued = set()
        self._flushing = False
        self._flush_call = None
        self._flush_batched = False  # a flush waits for the end of the write batch
        self._out = None  # while flushing: the pieces of the next transport write
        self._out_len = 0
        self._out_control = 0  # control bytes among them

    def queued_control_bytes(self):
        """Bytes of control frames raised but not yet handed to the transport."""
        return sum(map(len, self._control))

    # -- what the session and its streams call -----------------------------

    def send_control(self, frame):
        """Queue a control frame; written at once unless a read or a flush is running."""
        if self._session.closed:
            return
        self._control.append(frame)
        if not self.receiving and not self._flushing:
            self.write_control()

    def schedule(self, stream):
        """Put ``stream`` in the round-robin queue and make sure a flush comes."""
        queued = self._queued
        if stream not in queued and not self._session.closed:
            queued.add(stream)
            self._ready.append(stream)
            if (self._flush_call is None and not self._flush_batched and not self.receiving
                    and not self._flushing):
                if BATCH.active:  # another connection's read: flush as it ends
                    self._flush_batched = True
                    BATCH.before_send(self._batched_flush)
                else:
                    self._flush_call = self._session.clock.callLater(0, self.flush)

    def write_control(self):
        """Write the queued control frames (into the flush's write while one runs)."""
        control = self._control
        if not control:
            return
        self._control = []
        data = control[0] if len(control) == 1 else b"".join(control)
        session = self._session
        session.bytes_sent += len(data)
        if self._out is not None:
            self._out.append(data)
            self._out_len += len(data)
            self._out_control += len(data)
        else:
            session.transport.write(data)
            BATCH.wrote(session.transport)
            self._count_control(len(data))
        self._control_written_hook()

    def flush(self):
        """Write control frames, then DATA round-robin while the transport takes it.

        The frames are collected (headers, and bodies as views into the streams'
        buffers) and handed to the transport joined, one write per WRITE_SIZE
        or less: a Twisted transport joins whatever is pending into one bytes
        before send(), so a single pending bytes is sent as it is, with no copy
        besides our join.  Past WRITE_SIZE the transport gets what is collected,
        so a full transport still pauses the flush.
        """
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        session = self._session
        if self._flushing or session.closed:
            return
        self._flushing = True
        self._out = out = []
        self._out_len = 0
        try:
            if self._control:
                self.write_control()
            ready = self._ready
            queued = self._queued
            limit = session.config.max_frame_size
            budget = FLUSH_BUDGET
            while ready and not session.closed:
                if self._out_len >= WRITE_SIZE:
                    self._write_out()
                if self.writing_paused or session.closed:
                    break
                if budget <= 0:
                    self._flush_call = session.clock.callLater(0, self.flush)
                    break
                stream = ready.popleft()
                queued.discard(stream)
                if stream.disconnected:
                    continue
                written, body, more = stream.send_turn(limit, out)
                budget -= body + 1
                self._out_len += written
                session.bytes_sent += written
                if self._control and not session.closed:
                    self.write_control()
                if more and stream not in queued:
                    queued.add(stream)
                    ready.append(stream)
        finally:
            self._flushing = False
            self._write_out()
            self._out = None

    def _batched_flush(self):
        self._flush_batched = False
        self.flush()

    # -- the transport's producer signals (relayed by the session) ----------

    def pause(self):
        self.writing_paused = True

    def resume(self):
        self.writing_paused = False
        self._paused_control_bytes = 0
        session = self._session
        if self._reading_paused and not session.closed:
            self._reading_paused = False
            session.transport.resumeProducing()
        self.flush()

    # -- shutdown ------------------------------------------------------------

    def stop(self, write):
        """The session ends: write (``write``) or drop what is pending; no more flushes."""
        if write and self._control:
            self.write_control()
        if self._out:
            # Shut down during a flush: what it collected goes before the close.
            if write:
                self._write_out()
            else:
                self._out.clear()
        self._control = []
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._ready.clear()
        self._queued.clear()

    # -- internals -----------------------------------------------------------

    def _write_out(self):
        """Hand what the flush collected to the transport as one bytes."""
        out = self._out
        if out:
            data = b"".join(out)
            out.clear()
            self._out_len = 0
            control, self._out_control = self._out_control, 0
            transport = self._session.transport
            transport.write(data)
            BATCH.wrote(transport)
            if control:
                self._count_control(control)

    def _count_control(self, count):
        """Count control bytes that went into a full transport (this write may have
        filled it); past max_control_buffer, stop reading: a peer that is not reading
        cannot keep making us answer (pings, window updates) into its buffer."""
        if self.writing_paused:
            self._paused_control_bytes += count
            session = self._session
            if (self._paused_control_bytes > session.config.max_control_buffer
                    and not self._reading_paused):
                self._reading_paused = True
                session.transport.pauseProducing()
