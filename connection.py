"""The socket side of one session: lines and message text in, replies out, and deadlines.

Reading is buffered: a packet may hold several commands (PIPELINING, RFC 2920) or part of
one. Replies are collected and sent together just before the next blocking read, so a
pipelined group gets its replies in one packet, and the dialogue log is written then too.
"""
import select
import socket
import struct
import time

import replies

RECEIVE_SIZE = 65536


class LineTooLong(Exception):
    """A line over the limit; its bytes were discarded up to the next line end."""


class ClientTooSlow(Exception):
    """A deadline passed while waiting for the client; `reply` is the 421 it gets."""

    def __init__(self, reply):
        super().__init__(reply.text)
        self.reply = reply


class Connection:
    """One client's socket. Three deadlines bound every wait: the idle timeout (counted from
    the start of each line, so a line dribbled a byte at a time is cut off too), the whole
    message text (`data_timeout`) and the whole session (`session_timeout`)."""

    def __init__(self, sock, config, wakeup, log):
        self.sock = sock
        self.timeout = config.timeout
        self.data_timeout = config.data_timeout
        self.session_deadline = time.monotonic() + config.session_timeout
        self.wakeup = wakeup                # readable once the server is stopping
        self.log = log
        self.buffer = b""
        self.pending = []
        self.waiting_for_command = False    # blocked between commands (shutdown may wake it)
        self.tls = False
        # The kernel keeps the timeouts (SO_RCVTIMEO/SO_SNDTIMEO) on a blocking socket, so a
        # recv or send is one system call; Python's own socket timeouts add a poll() to each.
        sock.settimeout(None)
        self.receive_timeout = None
        self._set_receive_timeout(self.timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.timeout))

    def _set_receive_timeout(self, seconds):
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        self.receive_timeout = seconds

    def send(self, data):
        self.pending.append(data)

    def flush(self):
        """Send the replies collected so far; the log has them first (a client that has
        read a reply finds it logged)."""
        self.log.flush()
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            self.sock.sendall(data)

    def start_tls(self, context):
        """RFC 3207 4.2: the handshake follows the 220 at once. Anything the client sent
        after STARTTLS in clear text is discarded unread (the CVE-2011-0411 injection).
        Returns how many octets were discarded."""
        self.flush()
        discarded, self.buffer = len(self.buffer), b""
        self.sock.settimeout(self.timeout)     # the ssl module needs Python's timeouts
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.tls = True
        self._poller = select.poll()
        self._poller.register(self.sock.fileno(), select.POLLIN)
        self._poller.register(self.wakeup, select.POLLIN)
        return discarded

    def close(self):
        """Close; under TLS, say so first (close_notify, RFC 8446 6.1)."""
        if self.tls:
            try:
                self.sock.settimeout(0)     # send close_notify; do not wait for the client's
                self.sock.unwrap()
            except (OSError, ValueError):
                pass
        try:
            self.sock.close()
        except OSError:
            pass

    def _receive(self, deadlines):
        """One recv that waits no later than the earliest of `deadlines` ((time, reply)
        pairs); past it, ClientTooSlow with that deadline's reply."""
        self.flush()
        deadline, reply = min(deadlines, key=lambda pair: pair[0])
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ClientTooSlow(reply)
        try:
            return self._receive_tls(remaining) if self.tls else self._receive_plain(remaining)
        except TimeoutError:
            raise ClientTooSlow(reply) from None

    def _receive_plain(self, remaining):
        # Usually the deadline is a whole idle timeout away and the option is already right;
        # it changes only while a partial line waits for its end (a slow or stalling client).
        if abs(remaining - self.receive_timeout) > 0.05:
            self._set_receive_timeout(remaining)
        try:
            return self.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:             # SO_RCVTIMEO expired
            raise TimeoutError from None

    def _receive_tls(self, remaining):
        """Under TLS the socket cannot be woken from outside (a shutdown would break the TLS
        layer the 421 must travel through), so the wait watches the server's wakeup pipe
        beside the socket: one poll, no polling loop."""
        if not self.sock.pending():
            ready = {fd for fd, _ in self._poller.poll(remaining * 1000)}
            if not ready:
                raise TimeoutError
            if self.sock.fileno() not in ready and self.waiting_for_command:
                return b""                      # only the wakeup: the server is stopping
        self.sock.settimeout(max(remaining, 0.001))
        return self.sock.recv(RECEIVE_SIZE)

    def _idle(self):
        return time.monotonic() + self.timeout, replies.TIMEOUT

    def _whole_session(self):
        return self.session_deadline, replies.SESSION_TIMEOUT

    def read_line(self, limit):
        """The next line without its line end; None when the client has gone.
        Raises LineTooLong (the buffer never holds more than `limit`) or ClientTooSlow."""
        deadlines = (self._idle(), self._whole_session())
        too_long = False
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end + 1], self.buffer[end + 1:]
                if too_long or len(line) > limit:
                    raise LineTooLong
                return line[:-2] if line.endswith(b"\r\n") else line[:-1]
            if len(self.buffer) > limit:
                too_long, self.buffer = True, self.buffer[-1:]
            data = self._receive(deadlines)
            if not data:
                return None
            self.buffer += data

    def read_text(self, text, progress=None):
        """Feed the message text after 354 to `text` (a text.MessageText) until it has found
        the end; True when it has, False when the client has gone. Raises ClientTooSlow.
        `progress(octets)` (--trace) hears about every 64 KiB."""
        data_deadline = (time.monotonic() + self.data_timeout, replies.DATA_TIMEOUT)
        data, self.buffer = self.buffer, b""
        received = reported = 0
        while True:
            rest = text.feed(data)
            if rest is not None:
                self.buffer = rest
                return True
            data = self._receive((self._idle(), data_deadline, self._whole_session()))
            if not data:
                return False
            received += len(data)
            if progress and received - reported >= 65536:
                progress(received)
                reported = received


    def read_chunk(self, octets, text):
        """Exactly `octets` octets of a BDAT chunk (RFC 3030 2) into `text` (a ChunkedText),
        or dropped when `text` is None; True when they have come, False when the client has
        gone. Raises ClientTooSlow."""
        data_deadline = (time.monotonic() + self.data_timeout, replies.DATA_TIMEOUT)
        while octets:
            if not self.buffer:
                self.buffer = self._receive((self._idle(), data_deadline,
                                             self._whole_session()))
                if not self.buffer:
                    return False
            piece, self.buffer = self.buffer[:octets], self.buffer[octets:]
            octets -= len(piece)
            if text is not None:
                text.feed(piece)
        return True


def _timeval(seconds):
    """A struct timeval for SO_RCVTIMEO / SO_SNDTIMEO."""
    seconds = max(seconds, 0.001)           # zero would mean "wait forever"
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))
