"""A raw SMTP client for tests and benchmarks: send exact bytes, read whole replies
(RFC 5321 4.2.1). The one reply parser the tests and bench/ use."""
import socket


def is_last_line(line):
    """RFC 5321 4.2.1: `250-` goes on, `250 ` (or a bare code) ends the reply."""
    return len(line) < 4 or line[3:4] != b"-"


def read_reply(sock, timeout):
    """One whole reply straight off a socket, as bytes (b"" if the peer closed). For callers
    that send one command and wait for its answer, so nothing after the reply is lost."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and any(is_last_line(line) for line in lines[:-1]):
            return data


class Client:
    def __init__(self, address, timeout=10, greet=True):
        host, port = address[:2]
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""
        self.greeting = self.reply() if greet else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def line(self):
        """One line without CRLF; b"" when the server has closed."""
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                rest, self.buffer = self.buffer, b""
                return rest
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self):
        """(code, [text lines]) of the next whole reply; (None, []) if the server closed."""
        lines = []
        while True:
            line = self.line()
            if not line:
                return None, lines
            lines.append(line.decode("utf-8", "replace"))
            if is_last_line(line):
                return int(line[:3]), lines

    def command(self, text):
        """Send one command line and return (code, lines)."""
        self.send(text + "\r\n")
        return self.reply()

    def code(self, text):
        return self.command(text)[0]

    def closed(self):
        """True once the server has closed the connection (reads EOF)."""
        try:
            return self.sock.recv(1) == b"" and not self.buffer
        except socket.timeout:
            return False                # still open: the server said nothing and kept it
        except OSError:
            return True                 # reset by the server

    def send_message(self, sender, recipients, body, helo="client.example"):
        """A whole transaction; returns the final reply's (code, lines)."""
        self.command(f"EHLO {helo}")
        assert self.code(f"MAIL FROM:<{sender}>") == 250
        for recipient in recipients:
            assert self.code(f"RCPT TO:<{recipient}>") == 250
        assert self.code("DATA") == 354
        self.send(body)
        return self.reply()
