"""The relay's side of one SMTP connection on a raw socket: commands out, whole replies in.

    client = SmtpClient(hop, config, log, tag)
    client.reply(timeout)               # the greeting
    client.command("EHLO mail.test.ru")  # -> Response(250, ("250-mx.remote.test", ...))
    client.start_tls(context, name)     # after "220" to STARTTLS (RFC 3207)

A remote is never trusted to be brief: a reply has at most MAX_REPLY_LINES lines and
MAX_REPLY_OCTETS octets, and must be complete within its timeout (a deadline for the whole
reply, not for each read), so an endless or dribbled reply is cut off.

Every step has its timeout (RFC 5321 4.5.3.2). The text goes out piece by piece from the
spool file (`send_text`, `send_chunk`); a DKIM-Signature header made for this delivery
goes before it (`prefix`).
"""
import socket
import ssl
import time
from typing import NamedTuple

from delivery import Status
from resolver import DeliveryError

MAX_REPLY_LINES = 100           # RFC 5321 4.2.1 sets no limit; a real EHLO has about 15
MAX_REPLY_OCTETS = 1 << 16      # RFC 5321 4.5.3.1.5: 512 octets a line
RECEIVE_SIZE = 4096


class Response(NamedTuple):
    """One reply of the remote (RFC 5321 4.2): its code and its lines, code included."""
    code: int
    lines: tuple

    @property
    def text(self):
        return " / ".join(self.lines)

    @property
    def status(self):
        """What the reply means for a recipient: 2xx done, 5xx failed, else try later."""
        if 200 <= self.code < 300:
            return Status.DONE
        if 500 <= self.code < 600:
            return Status.FAILED
        return Status.PENDING

    def extensions(self):
        """The EHLO keywords (RFC 5321 4.1.1.1): {"SIZE": "1000", "8BITMIME": "", ...}."""
        found = {}
        for line in self.lines[1:]:
            keyword, _, value = line[4:].strip().partition(" ")
            found[keyword.upper()] = value.strip()
        return found


def opportunistic_context():
    """TLS that encrypts without checking who is at the other end (RFC 7435 3: better than
    clear text; used when no policy asks for more and the certificate did not check out)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def verifying_context(ca_file=""):
    """TLS that checks the certificate chains to a trusted root (`ca_file`, or the system's
    store when "") and names the host (RFC 8461 4.2, RFC 6125 6)."""
    return ssl.create_default_context(cafile=ca_file or None)


class SmtpClient:
    """One outbound connection. Every step has its timeout (RFC 5321 4.5.3.2)."""

    def __init__(self, hop, config, log, tag, connected=None):
        """Connect to `hop`, or take the socket `connected` to it (racing.py)."""
        self.config = config
        self.log = log
        self.tag = f"{tag} {hop}"
        self.buffer = b""
        self.verified = False           # TLS with a certificate checked for the host name
        self.sock = connected or socket.create_connection((hop.ip, hop.port),
                                                          timeout=config.connect_timeout)
        # Each command waits for its reply, so Nagle's algorithm only holds back the last
        # piece of a write (the final dot after the text) until the remote's delayed ACK
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def for_message(self, tag, hop):
        """Log under another message's tag (a cached connection, reused)."""
        self.tag = f"{tag} {hop}"

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def start_tls(self, context, name=None):
        """RFC 3207: TLS on this connection. With `name`, `context` checks the certificate
        against it (ssl.SSLCertVerificationError when it does not hold); without, nothing is
        checked and the point is only that nobody on the path can read the mail."""
        self.buffer = b""                   # RFC 3207 4.2: nothing read before TLS counts
        self.sock.settimeout(self.config.command_timeout)
        self.sock = context.wrap_socket(self.sock, server_hostname=name)
        self.verified = name is not None and context.verify_mode == ssl.CERT_REQUIRED
        checked = f"certificate valid for {name}" if self.verified else "certificate not checked"
        self.log.info("%s TLS established: %s, %s, %s", self.tag, self.sock.version(),
                      self.sock.cipher()[0], checked)

    def command(self, line, timeout=None):
        """Send one command line and return the reply."""
        self.log.info("%s -> %s", self.tag, line)
        self.sock.settimeout(self.config.command_timeout)
        # UTF-8: an address goes out non-ASCII only to a next hop offering SMTPUTF8
        self.sock.sendall(line.encode("utf-8") + b"\r\n")
        return self.reply(timeout or self.config.command_timeout)

    def send_lines(self, lines):
        """RFC 2920 3.1: several commands in one write; the caller reads their replies
        with `reply`, one for each, in order."""
        for line in lines:
            self.log.info("%s -> %s", self.tag, line)
        self.sock.settimeout(self.config.command_timeout)
        self.sock.sendall("".join(line + "\r\n" for line in lines).encode("utf-8"))

    def send_text(self, message, prefix=b""):
        """`prefix` (header lines made for this delivery: no line of it starts with ".")
        and the dot-stuffed text from the spool file, piece by piece, then the final dot
        (RFC 5321 4.1.1.4). Returns the reply to the dot."""
        self.log.info("%s -> (message text, %d octets)", self.tag,
                      len(prefix) + message.text_size)
        # One piece is held back so that the prefix goes with the first and the final dot
        # with the last: a small message is one write (and one segment)
        held, first = prefix, True
        for chunk in message.text_chunks():
            if first:
                held, first = held + chunk, False
                continue
            self.sock.settimeout(self.config.command_timeout)       # RFC 5321 4.5.3.2.5
            self.sock.sendall(held)
            held = chunk
        self.log.info("%s -> .", self.tag)
        self.sock.settimeout(self.config.command_timeout)
        self.sock.sendall(held + b".\r\n")
        return self.reply(self.config.relay_data_timeout)           # RFC 5321 4.5.3.2.6

    def send_chunk(self, chunk, last):
        """RFC 3030 2: `BDAT <size> [LAST]` and exactly that many octets; returns its reply
        (the last one's is awaited as long as the reply to DATA's final dot)."""
        line = f"BDAT {len(chunk)}{' LAST' if last else ''}"
        self.log.info("%s -> %s", self.tag, line)
        self.sock.settimeout(self.config.command_timeout)
        self.sock.sendall(line.encode("ascii") + b"\r\n" + chunk)
        return self.reply(self.config.relay_data_timeout if last
                          else self.config.command_timeout)

    def reply(self, timeout):
        """The next whole reply, within `timeout` seconds from now."""
        deadline = time.monotonic() + timeout
        lines, size = [], 0
        while True:
            line = self._line(deadline)
            self.log.info("%s <- %s", self.tag, line)
            code = line[:3]
            if not (code.isascii() and code.isdigit()) or line[3:4] not in ("", " ", "-"):
                raise DeliveryError(f"451 4.5.0 protocol error from remote: {line[:80]!r}")
            lines.append(line)
            size += len(line) + 2
            if line[3:4] != "-":
                return Response(int(code), tuple(lines))
            if len(lines) >= MAX_REPLY_LINES or size > MAX_REPLY_OCTETS:
                raise DeliveryError(f"451 4.5.0 reply from remote longer than "
                                    f"{MAX_REPLY_LINES} lines or {MAX_REPLY_OCTETS} octets")

    def _line(self, deadline):
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_REPLY_OCTETS:
                raise DeliveryError("451 4.5.0 remote reply line too long")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeliveryError("451 4.4.2 remote reply too slow")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(RECEIVE_SIZE)
            except socket.timeout:
                raise DeliveryError("451 4.4.2 remote reply too slow") from None
            if not data:
                raise DeliveryError("451 4.4.2 remote closed the connection")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return printable(line.rstrip(b"\r"))


def printable(data):
    """Remote bytes as ASCII text for the log, the record and a DSN (never raw control
    characters or 8-bit bytes)."""
    text = data.decode("ascii", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in text)
