"""Outbound SMTP on a raw socket: one `Transaction` delivers one message to one domain.

The transaction replays what the spool file recorded (RFC 5321 3.3). It sends its own EHLO
(`[server] hostname`; HELO when EHLO is refused), STARTTLS when offered (RFC 3207), then the
recorded MAIL and RCPT lines with their parameters, leaving out only those whose extension the
next hop did not advertise, adds its own SIZE= (RFC 1870), and streams the text from the spool
file: after DATA as it is stored (dot-stuffed), or with BDAT, unstuffed, to a next hop that
offers CHUNKING (RFC 3030). Each recipient's outcome is handed to `report` as soon as it is
known (RCPT refusals, then the reply to the end of the text), before QUIT: a remote that stalls
on QUIT delays nothing.

The relay never sends what the next hop did not offer. A message that needs SMTPUTF8 (RFC 6531
3.2) or has 8-bit text (RFC 6152 3) goes only to a host offering that extension: another MX
is tried, and when every host was reached and none offers it, the recipients fail (5.6.7,
5.6.3). 8-bit text is never converted to quoted-printable: a conversion would change a
message that may be signed (DKIM), and a bounce says plainly what happened.

A remote is never trusted to be brief: a reply has at most MAX_REPLY_LINES lines and
MAX_REPLY_OCTETS octets, and must be complete within its timeout (a deadline for the whole
reply, not for each read), so an endless or dribbled reply is cut off.
"""
import dataclasses
import socket
import ssl
import time
from typing import NamedTuple

import dsn
import spool
from delivery import Outcome, Status
from resolver import DeliveryError

MAX_REPLY_LINES = 100           # RFC 5321 4.2.1 sets no limit; a real EHLO has about 15
MAX_REPLY_OCTETS = 1 << 16      # RFC 5321 4.5.3.1.5: 512 octets a line
RECEIVE_SIZE = 4096
BDAT_CHUNK = spool.TEXT_CHUNK   # octets of text read, unstuffed and sent per BDAT (64 KiB)

# RFC 5321 2.2.1: a parameter is sent only to a server that advertised the extension which
# defines it. A keyword not listed here is taken to be defined by an extension of its name.
EXTENSION_OF_PARAMETER = {
    "BODY": "8BITMIME",         # RFC 6152 2
    "SMTPUTF8": "SMTPUTF8",     # RFC 6531 3.4
    "RET": "DSN",               # RFC 3461 4.3
    "ENVID": "DSN",             # RFC 3461 4.4
    "NOTIFY": "DSN",            # RFC 3461 4.1
    "ORCPT": "DSN",             # RFC 3461 4.2
}
# Why a parameter is left out, when more can be said than that its extension is missing
WHY_LEFT_OUT = {
    "SMTPUTF8": "the message is all ASCII, so it goes without (RFC 6531 3.2)",
    "BODY": "the text is 7-bit after all, so it goes without BODY (RFC 6152 3)",
    **dict.fromkeys(("RET", "ENVID", "NOTIFY", "ORCPT"),
                    "its notices stop here (RFC 3461 5.2.2)"),
}


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


class TryNextHost(DeliveryError):
    """This host failed before the transaction began (RFC 5321 5.1: try the next one)."""


class TlsFailed(TryNextHost):
    """STARTTLS was offered but did not work; clear text may be tried unless TLS is required."""


class Unsuitable(TryNextHost):
    """This host lacks an extension the message needs (SMTPUTF8, 8BITMIME): another host may
    have it; when none has, the recipients fail with `reply`."""

    def __init__(self, reply, hop):
        super().__init__(reply, permanent=True)
        self.hop = hop


class SessionBroken(DeliveryError):
    """The connection failed after MAIL was accepted: the rest waits for the next attempt."""


# ---------------------------------------------------------------------------------------
# The client: commands out, whole replies in


class SmtpClient:
    """One outbound connection. Every step has its timeout (RFC 5321 4.5.3.2)."""

    def __init__(self, hop, config, log, tag):
        self.config = config
        self.log = log
        self.tag = f"{tag} {hop}"
        self.buffer = b""
        self.sock = socket.create_connection(tuple(hop), timeout=config.connect_timeout)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def start_tls(self):
        """RFC 3207: opportunistic TLS. The certificate is not checked (there is no way to
        know the right name for an MX without DANE or MTA-STS); the point is that nobody on
        the path can read the mail."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.buffer = b""                   # RFC 3207 4.2: nothing read before TLS counts
        self.sock.settimeout(self.config.command_timeout)
        self.sock = context.wrap_socket(self.sock)
        self.log.info("%s TLS established: %s, %s", self.tag, self.sock.version(),
                      self.sock.cipher()[0])

    def command(self, line, timeout=None):
        """Send one command line and return the reply."""
        self.log.info("%s -> %s", self.tag, line)
        self.sock.settimeout(self.config.command_timeout)
        # UTF-8: an address goes out non-ASCII only to a next hop offering SMTPUTF8
        self.sock.sendall(line.encode("utf-8") + b"\r\n")
        return self.reply(timeout or self.config.command_timeout)

    def send_text(self, message):
        """The dot-stuffed text from the spool file, piece by piece, and the final dot
        (RFC 5321 4.1.1.4). Returns the reply to the dot."""
        self.log.info("%s -> (message text, %d octets)", self.tag, message.text_size)
        for chunk in message.text_chunks():
            self.sock.settimeout(self.config.command_timeout)   # RFC 5321 4.5.3.2.5
            self.sock.sendall(chunk)
        self.log.info("%s -> .", self.tag)
        self.sock.sendall(b".\r\n")
        return self.reply(self.config.relay_data_timeout)       # RFC 5321 4.5.3.2.6

    def send_chunk(self, chunk, last):
        """RFC 3030 2: `BDAT <size> [LAST]` and exactly that many octets; returns its reply
        (the last one's is awaited as long as the reply to DATA's final dot)."""
        line = f"BDAT {len(chunk)}{' LAST' if last else ''}"
        self.log.info("%s -> %s", self.tag, line)
        self.sock.settimeout(self.config.command_timeout)
        self.sock.sendall(line.encode("ascii") + b"\r\n")
        self.sock.sendall(chunk)
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
    return "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in text)


def offered_parameters(parameters, extensions):
    """The recorded parameters the next hop can take, and those it cannot:
    ({keyword: value}, [(keyword, the extension it lacks)])."""
    kept, dropped = {}, []
    for keyword, value in spool.recorded_parameters(parameters).items():
        extension = EXTENSION_OF_PARAMETER.get(keyword, keyword)
        if extension in extensions:
            kept[keyword] = value
        else:
            dropped.append((keyword, extension))
    return kept, dropped


def size_limit(extensions):
    """The SIZE the remote advertised (RFC 1870 4), 0 for none or no limit."""
    try:
        return int(extensions.get("SIZE") or 0)
    except ValueError:
        return 0


# ---------------------------------------------------------------------------------------
# The text: what it holds, and the text itself as BDAT sends it


def with_last(pieces):
    """(piece, is it the last) for each piece; for none, one empty last piece (RFC 3030 2:
    `BDAT 0 LAST`)."""
    pieces = iter(pieces)
    previous = next(pieces, None)
    if previous is None:
        yield b"", True
        return
    for piece in pieces:
        yield previous, False
        previous = piece
    yield previous, True


# ---------------------------------------------------------------------------------------
# One SMTP transaction for the recipients of one domain


class Transaction:
    """Deliver `recipients` (envelope.Recipient) of `message` (spool.SpooledMessage) to the
    next hops of `domain`. `report({address text: Outcome})` is called as outcomes become
    known; every recipient gets exactly one."""

    def __init__(self, config, resolver, log, message, domain, recipients, report):
        self.config = config
        self.resolver = resolver
        self.log = log
        self.message = message
        self.domain = domain
        self.recipients = recipients
        self.report = report
        self.tag = f"[{message.queue_id}]"
        self.reported = set()
        self._shape = None              # the TextShape, once a host made it matter

    def run(self):
        try:
            hops = self.resolver.next_hops(self.domain, self.tag)
        except DeliveryError as error:
            kind = "permanent" if error.permanent else "temporary"
            self._trace(f"no next hop for {self.domain}: {error.reply} ({kind}; RFC 5321 5.1)")
            self._report_rest(Status.FAILED if error.permanent else Status.PENDING, error.reply)
            return
        self._trace(f"next hops for {self.domain}, in order: "
                    f"{', '.join(str(hop) for hop in hops)} (RFC 5321 5.1)")
        errors = []
        for hop in hops:
            try:
                self._deliver_via(hop)
                return
            except TryNextHost as error:
                errors.append(error)
                self.log.info("%s %s: %s; trying the next host", self.tag, hop, error.reply)
            except SessionBroken as error:
                self._report_rest(Status.PENDING, error.reply, hop)
                return
        self._no_host_took_it(errors)

    def _no_host_took_it(self, errors):
        """RFC 5321 5.1: every host was tried. When each was reached and lacks what the
        message needs, the recipients fail; when one could not be asked, they wait."""
        if errors and all(isinstance(error, Unsuitable) for error in errors):
            self._trace(f"no next hop of {self.domain} offers what this message needs: "
                        "its recipients fail (RFC 6531 3.2, RFC 6152 3)")
            self._report_rest(Status.FAILED, errors[0].reply, errors[0].hop)
            return
        temporary = [error for error in errors if not isinstance(error, Unsuitable)]
        reply = temporary[-1].reply if temporary else \
            f"451 4.4.1 no mail exchanger of {self.domain} answered"
        self._report_rest(Status.PENDING, reply)

    # outcomes

    def _trace(self, text):
        if self.config.trace:
            self.log.info("%s    %s", self.tag, text)

    def _report(self, outcomes):
        fresh = {key: outcome for key, outcome in outcomes.items() if key not in self.reported}
        if fresh:
            self.reported.update(fresh)
            self.report(fresh)

    def _report_rest(self, status, reply, hop=""):
        self._report({recipient.address.text: Outcome(status, reply, str(hop))
                      for recipient in self.recipients})

    # one host

    def _deliver_via(self, hop):
        try:
            self._deliver_once(hop, use_tls=self.config.relay_tls != "no")
        except TlsFailed as error:
            if self.config.relay_tls == "require":
                raise TryNextHost(error.reply) from None
            self.log.info("%s %s; trying again in clear text", self.tag, error.reply)
            self._deliver_once(hop, use_tls=False)

    def _deliver_once(self, hop, use_tls):
        try:
            client = SmtpClient(hop, self.config, self.log, self.tag)
        except OSError as error:
            raise TryNextHost(f"451 4.4.1 cannot connect to {hop}: {error}") from None
        try:
            extensions = self._open(client, hop)
            extensions = self._secure(client, extensions, hop, use_tls)
            self._transact(client, extensions, hop)
        except (TryNextHost, SessionBroken):
            raise
        except DeliveryError as error:              # before MAIL: another host may do
            raise TryNextHost(error.reply) from None
        except OSError as error:
            raise TryNextHost(f"451 4.4.2 connection to {hop} failed: {error}") from None
        finally:
            client.close()

    def _open(self, client, hop):
        """Greeting and EHLO (HELO if EHLO is refused). Any failure here: the next host."""
        greeting = client.reply(self.config.command_timeout)       # RFC 5321 4.5.3.2.1
        if greeting.code != 220:
            raise TryNextHost(f"{greeting.text} (greeting from {hop})")
        hello = client.command(f"EHLO {self.config.hostname}")
        if hello.code == 250:
            return hello.extensions()
        if hello.status is Status.FAILED:           # RFC 5321 3.2: fall back to HELO
            self._trace("EHLO refused: falling back to HELO, no extensions (RFC 5321 3.2)")
            hello = client.command(f"HELO {self.config.hostname}")
            if hello.code == 250:
                return {}
        raise TryNextHost(f"{hello.text} (EHLO to {hop})")

    def _secure(self, client, extensions, hop, use_tls):
        """STARTTLS when the remote offers it; `[relay] tls = require` sends nothing in clear."""
        if use_tls and "STARTTLS" in extensions:
            self._trace("the remote offers STARTTLS: upgrading before MAIL (RFC 3207 4)")
            answer = client.command("STARTTLS")
            if answer.code != 220:
                raise TlsFailed(f"454 4.7.0 STARTTLS refused by {hop}: {answer.text}")
            try:
                client.start_tls()
            except (ssl.SSLError, OSError) as error:
                raise TlsFailed(f"454 4.7.0 TLS handshake with {hop} failed: {error}") from None
            hello = client.command(f"EHLO {self.config.hostname}")     # RFC 3207 4.2
            if hello.code != 250:
                raise TryNextHost(f"{hello.text} (EHLO after STARTTLS to {hop})")
            return hello.extensions()
        if self.config.relay_tls == "require":
            raise TryNextHost(f"451 4.7.10 {hop} offers no STARTTLS and [relay] tls = require")
        self.log.info("%s sending in clear text (%s)", self.tag,
                      "TLS not offered" if use_tls else "TLS off for this attempt")
        return extensions

    # what the message needs of a host

    def _text_shape(self):
        if self._shape is None:
            self._shape = spool.text_shape(self.message.text_chunks())
        return self._shape

    def _addresses_need_smtputf8(self):
        """RFC 6531 3.2: an address of this transaction's own envelope is not ASCII."""
        return dataclasses.replace(self.message.envelope,
                                   recipients=self.recipients).needs_smtputf8

    def _needs_smtputf8(self):
        """Why this transaction needs SMTPUTF8 (RFC 6531 3.2), or None: a non-ASCII address,
        or UTF-8 header text in a message sent with SMTPUTF8 (the 8-bit header of one sent
        without it is legacy 8-bit text, RFC 6152's business)."""
        if self._addresses_need_smtputf8():
            return "a non-ASCII address"
        if "SMTPUTF8" in self.message.envelope.parameters and \
                self._text_shape().eight_bit_headers:
            return "UTF-8 in its header"
        return None

    def _unsuitable(self, extensions, hop):
        """The reply for every recipient when `hop` cannot take this message, or None."""
        return self._smtputf8_refusal(extensions, hop) or self._8bit_refusal(extensions, hop)

    def _smtputf8_refusal(self, extensions, hop):
        if "SMTPUTF8" in extensions:
            if "SMTPUTF8" in self.message.envelope.parameters or \
                    self._addresses_need_smtputf8():
                self._trace(f"{hop} offers SMTPUTF8: MAIL says SMTPUTF8 (RFC 6531 3.4)")
            return None
        need = self._needs_smtputf8()
        if need is None:
            return None
        self._trace(f"the message needs SMTPUTF8 ({need}) and {hop} does not offer it: not "
                    "sent there (RFC 6531 3.2)")
        return f"550 5.6.7 {hop} does not offer SMTPUTF8, which this message needs ({need})"

    def _8bit_refusal(self, extensions, hop):
        if "8BITMIME" in extensions or not self._text_shape().eight_bit:
            return None
        self._trace(f"the text has 8-bit octets and {hop} does not offer 8BITMIME: not sent "
                    "there, and not converted to quoted-printable (RFC 6152 3)")
        return f"554 5.6.3 {hop} does not offer 8BITMIME, and the text has 8-bit octets"

    def _too_big(self, extensions, hop):
        """The reply for every recipient when the text exceeds `hop`'s SIZE, or None."""
        limit, size = size_limit(extensions), self.message.text_size
        if not limit:
            return None
        if size > limit:
            self._trace(f"the message ({size} octets) exceeds the SIZE {limit} of {hop}: its "
                        "recipients fail (RFC 1870 6)")
            return f"552 5.3.4 message too big for {hop} (its limit is {limit} octets)"
        self._trace(f"the message ({size} octets) is within the SIZE {limit} of {hop} "
                    "(RFC 1870 6)")
        return None

    # the transaction itself

    def _transact(self, client, extensions, hop):
        refusal = self._unsuitable(extensions, hop)
        if refusal:
            self._quit(client)
            raise Unsuitable(refusal, hop)
        refusal = self._too_big(extensions, hop)
        if refusal:
            self._report_rest(Status.FAILED, refusal, hop)
            self._quit(client)
            return
        answer = client.command(self._mail_line(extensions))
        if answer.code != 250:
            self._report_rest(_refusal(answer), answer.text, hop)
            self._quit(client)
            return
        try:
            accepted = self._recipients(client, extensions, hop)
            if accepted:
                self._send(client, accepted, extensions, hop)
        except (DeliveryError, OSError) as error:
            reply = getattr(error, "reply", "") or f"451 4.4.2 connection to {hop} failed: {error}"
            raise SessionBroken(reply) from None
        self._quit(client)

    def _mail_line(self, extensions):
        envelope = self.message.envelope
        parameters, dropped = offered_parameters(envelope.parameters, extensions)
        self._trace_dropped("MAIL", dropped)
        if "SMTPUTF8" in extensions and self._addresses_need_smtputf8():   # RFC 6531 3.4
            parameters.setdefault("SMTPUTF8", None)
        if "SIZE" in extensions:                                      # RFC 1870 6
            parameters["SIZE"] = str(self.message.text_size)
        return spool.mail_command(envelope.reverse_path, parameters)

    def _rcpt_line(self, recipient, extensions):
        parameters, dropped = offered_parameters(recipient.parameters, extensions)
        self._trace_dropped(f"RCPT <{recipient.address.text}>", dropped)
        if "DSN" not in extensions and dsn.wants(recipient, dsn.RELAYED):
            self._trace(f"RCPT <{recipient.address.text}>: NOTIFY=SUCCESS cannot be passed on: "
                        "a 'relayed' notice goes to the sender once the next hop takes it "
                        "(RFC 3461 5.2.2)")
        return spool.rcpt_command(dataclasses.replace(recipient, parameters=parameters))

    def _trace_dropped(self, command, dropped):
        for keyword, extension in dropped:
            why = WHY_LEFT_OUT.get(keyword)
            self._trace(f"{command}: {keyword} left out: the next hop does not offer "
                        f"{extension}" + (f"; {why}" if why else " (RFC 5321 2.2.1)"))

    def _recipients(self, client, extensions, hop):
        """RCPT for each; the refused are reported before DATA. Returns the accepted."""
        accepted, refused = [], {}
        try:
            for recipient in self.recipients:
                answer = client.command(self._rcpt_line(recipient, extensions))
                if answer.status is Status.DONE:
                    accepted.append(recipient)
                else:
                    refused[recipient.address.text] = Outcome(answer.status, answer.text,
                                                              str(hop))
        finally:
            self._report(refused)
        return accepted

    def _send(self, client, accepted, extensions, hop):
        """The text, with DATA or BDAT; every accepted recipient gets the one outcome."""
        if "CHUNKING" in extensions and self.config.relay_chunking:
            self._trace(f"{hop} offers CHUNKING: the text goes unstuffed with BDAT, in "
                        f"chunks of at most {BDAT_CHUNK} octets (RFC 3030 2)")
            answer = self._bdat(client)
        else:
            if "CHUNKING" in extensions:
                self._trace(f"{hop} offers CHUNKING, but [relay] chunking = no: DATA "
                            "(RFC 5321 4.1.1.4)")
            answer = self._data(client)
        passed_on = "DSN" in extensions         # RFC 3461 5.2.1: its notices are the hop's
        self._report({recipient.address.text: Outcome(answer.status, answer.text, str(hop),
                                                       passed_on)
                      for recipient in accepted})

    def _data(self, client):
        answer = client.command("DATA")
        if answer.code != 354:
            return _as_refusal(answer)
        return client.send_text(self.message)

    def _bdat(self, client):
        """RFC 3030 2: after a chunk is refused no other is sent; its reply is the outcome."""
        for chunk, last in with_last(spool.unstuffed(self.message.text_chunks(BDAT_CHUNK))):
            answer = client.send_chunk(chunk, last)
            if answer.code != 250:
                return _as_refusal(answer)
        return answer

    def _quit(self, client):
        """RFC 5321 4.1.1.10. Every outcome is reported by now; a stall here costs nothing."""
        try:
            client.command("QUIT")
        except (DeliveryError, OSError):
            pass


def _refusal(answer):
    """A reply other than the expected one: 5xx fails, anything else is tried again."""
    return Status.FAILED if answer.status is Status.FAILED else Status.PENDING


def _as_refusal(answer):
    """`answer` where another was expected, as a reply that is not a success: a 2xx or 3xx
    out of place is a protocol error to be tried again later."""
    if answer.status is Status.DONE or answer.code < 400:
        return Response(451, (f"451 4.5.0 unexpected reply from remote: {answer.text}",))
    return answer
