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

TLS (tlspolicy.py): the TLS memory (tlsmemory.py) and, with `[relay] mta_sts = yes`, the
domain's MTA-STS policy (RFC 8461) say how much a connection must reach. STARTTLS is tried first
with the certificate checked for the MX name; when it does not check out, with unchecked TLS
on a new connection; when TLS does not work, in clear text on another: each step only while
the policy and the memory allow it, else that host fails with a 4xx and the next is tried.

DKIM (RFC 6376): with a `signer` (dkimsign.Signer), what relaysigning.py finds ours to sign
is signed as it goes: the DKIM-Signature header goes before the text (DATA) or at the start
of the first chunk (BDAT).

With a `connections` cache (connections.py), the connection is kept after a transaction
that reached the reply to its text, for the next message of the same domain through the same
hop, and reused with RSET first. To a host offering PIPELINING, (RSET,) MAIL and every RCPT
go in one write (RFC 2920 3.1); DATA follows only once a recipient was accepted.

The connection itself (replies bounded in lines, octets and time) is smtpclient.py.

    Transaction(config, resolver, log, message, domain, recipients, report,
                tls=TlsPolicy.for_config(...), signer=Signer(...),
                connections=ConnectionCache(log)).run()
"""
import dataclasses
import ssl
import time

import dsn
import racing
import relaysigning
import spool
import tlspolicy
from delivery import Outcome, Status
from connections import CachedSession, CacheKey, StaleConnection, reset, send_after_reset
from resolver import DeliveryError
from smtpclient import MAX_REPLY_LINES, Response, SmtpClient
from tlsmemory import PLAIN, TLS, VERIFIED
__all__ = ["Transaction", "SmtpClient", "Response", "MAX_REPLY_LINES", "BDAT_CHUNK"]
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


class TryNextHost(DeliveryError):
    """This host failed before the transaction began (RFC 5321 5.1: try the next one)."""


class TlsFailed(TryNextHost):
    """STARTTLS was offered but did not work (`unverified`: only because the certificate
    did not check out); less may be tried when the rules allow it."""

    def __init__(self, reply, unverified=False):
        super().__init__(reply)
        self.unverified = unverified


class Unsuitable(TryNextHost):
    """This host lacks an extension the message needs (SMTPUTF8, 8BITMIME): another host may
    have it; when none has, the recipients fail with `reply`."""

    def __init__(self, reply, hop):
        super().__init__(reply, permanent=True)
        self.hop = hop


class SessionBroken(DeliveryError):
    """The connection failed after MAIL was accepted: the rest waits for the next attempt."""


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


def with_prefix(prefix, pieces):
    """`pieces` with `prefix` at the start of the first (the DKIM-Signature header goes in
    the first BDAT chunk, not in a chunk of its own)."""
    pieces = iter(pieces)
    if not prefix:
        yield from pieces
        return
    yield prefix + next(pieces, b"")
    yield from pieces


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

    def __init__(self, config, resolver, log, message, domain, recipients, report, tls=None,
                 signer=None, connections=None):
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
        self.tls = tls or tlspolicy.TlsPolicy(config, log)
        self.signer = signer
        self._signature = None          # the DKIM-Signature header, once made (b"": none)
        self.rules = None               # tlspolicy.DomainTls, once run() looked it up
        self.connections = connections  # connections.ConnectionCache, or None: QUIT each
        self._reset_first = False       # RSET goes out with MAIL (a cached connection)

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
        self.rules = self.tls.for_domain(self.domain, self.tag)
        errors = []
        for hop, connected in self._in_order(hops, errors):
            try:
                self._deliver_via(hop, connected)
                return
            except TryNextHost as error:
                errors.append(error)
                self.log.info("%s %s: %s; trying the next host", self.tag, hop, error.reply)
            except SessionBroken as error:
                self._report_rest(Status.PENDING, error.reply, hop)
                return
        self._no_host_took_it(errors)

    def _in_order(self, hops, errors):
        """(hop, a socket already connected to it or None), in the order to try them: by
        preference (RFC 5321 5.1); among equal ones, a hop with a cached connection first,
        else the first to connect of a race (racing.py, RFC 8305). Hops that failed to
        connect in the race are added to `errors` and not tried again."""
        for group in _equal_preference(hops):
            cached = self._cached_hops()
            allowed = [hop for hop in group if self.rules.refusal(hop) is None]
            if len(allowed) < 2 or cached & set(group):
                yield from ((hop, None) for hop in sorted(group, key=lambda h: h not in cached))
                continue
            winner, sock, failures = self._race(allowed)
            for hop, error in failures:
                errors.append(TryNextHost(f"451 4.4.1 cannot connect to {hop}: {error}"))
                self.log.info("%s %s: cannot connect (%s); trying the next host", self.tag,
                              hop, error)
            if winner is not None:
                yield winner, sock
            failed = {hop for hop, _ in failures}
            yield from ((hop, None) for hop in group if hop != winner and hop not in failed)

    def _race(self, hops):
        """racing.first_to_connect over `hops`: (winner or None, socket, failures)."""
        try:
            winner, sock, failures = racing.first_to_connect(racing.interleaved(hops),
                                                             self.config.connect_timeout)
        except racing.NoneConnected as none:
            return None, None, none.failures
        self._trace(f"{winner} connected first of {len(hops)} equally preferred addresses "
                    "(RFC 8305)")
        return winner, sock, failures

    def _cached_hops(self):
        if self.connections is None:
            return set()
        return {key.hop for key in self.connections.idle_keys() if key.domain == self.domain}

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

    def _deliver_via(self, hop, connected=None):
        """At most three connections: verified TLS, unchecked TLS, clear text, each only
        when the one before failed at TLS and the rules accept less. `connected`: a socket
        to use for the first."""
        refusal = self.rules.refusal(hop)
        if refusal:
            raise TryNextHost(refusal)
        level = self.rules.first_attempt()
        while True:
            try:
                self._deliver_once(hop, level, connected)
                return
            except TlsFailed as error:
                connected = None
                level = self._fallback(hop, level, error)

    def _fallback(self, hop, level, error):
        """The level to try next after `error` at `level`, or TryNextHost."""
        lower = TLS if level == VERIFIED and error.unverified else PLAIN
        if lower == PLAIN and self.config.relay_tls == "require":
            raise TryNextHost(error.reply)
        reply = self.rules.shortfall(hop, lower) if not self.rules.accepts(hop, lower) else None
        if reply:
            raise TryNextHost(reply)
        self.log.info("%s %s; trying again %s", self.tag, error.reply,
                      "with unchecked TLS" if lower == TLS else "in clear text")
        return lower

    def _deliver_once(self, hop, level, connected=None):
        """One connection to `hop`: `connected`, else an idle one from the cache, else a new
        one."""
        key = CacheKey(self.domain, hop, level)
        session = self._cached(key, hop) if connected is None else None
        if session is not None:
            try:
                self._converse(session.client, key, hop, level, session)
                return
            except StaleConnection as error:
                self.log.info("%s the cached connection to %s is gone (%s); connecting again",
                              self.tag, hop, error.reply)
        self._reset_first = False
        try:
            client = SmtpClient(hop, self.config, self.log, self.tag, connected)
        except OSError as error:
            raise TryNextHost(f"451 4.4.1 cannot connect to {hop}: {error}") from None
        self._converse(client, key, hop, level)

    def _converse(self, client, key, hop, level, session=None):
        """The transaction on `client` (greeting, EHLO and TLS first unless `session` says
        what they gave); the connection goes back to the cache when it can be reused."""
        kept = False
        try:
            if session is None:
                opened = time.monotonic()
                extensions = self._open(client, hop)
                extensions, reached = self._secure(client, extensions, hop, level)
                session = CachedSession(client, extensions, reached, opened)
            kept = self._transact(client, session.extensions, hop, session.reached)
        except (TryNextHost, SessionBroken, StaleConnection):
            raise
        except DeliveryError as error:              # before MAIL: another host may do
            raise TryNextHost(error.reply) from None
        except OSError as error:
            raise TryNextHost(f"451 4.4.2 connection to {hop} failed: {error}") from None
        finally:
            if not kept:
                client.close()
        if kept:
            self.connections.give_back(key, session)

    def _cached(self, key, hop):
        """An idle connection of the cache for `key`, or None. RFC 5321 4.1.1.5: RSET
        first, alone or (PIPELINING) with MAIL; one that fails there is one the remote
        closed or timed out: nothing of this message went over it, and a new connection is
        made instead."""
        session = self.connections.take(key) if self.connections is not None else None
        if session is None:
            return None
        session.client.for_message(self.tag, hop)
        self._trace(f"reusing the open connection to {hop}: RSET first (RFC 5321 4.1.1.5)")
        why_not = self.rules.shortfall(hop, session.reached) or reset(session)
        if why_not is None:
            # RFC 2920 3.1: to a host offering PIPELINING, RSET and MAIL in one write
            self._reset_first = "PIPELINING" in session.extensions
            return session
        session.client.close()
        self.log.info("%s the cached connection to %s is not usable (%s); connecting again",
                      self.tag, hop, why_not)
        return None

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

    def _secure(self, client, extensions, hop, level):
        """STARTTLS at `level` when the remote offers it; (the extensions, the level
        reached). Raises TryNextHost when the rules refuse what this connection can give."""
        if level != PLAIN and "STARTTLS" in extensions:
            extensions = self._start_tls(client, hop, level)
            reached = VERIFIED if client.verified else TLS
        else:
            if self.config.relay_tls == "require":
                raise TryNextHost(f"451 4.7.10 {hop} offers no STARTTLS and "
                                  "[relay] tls = require")
            reached = PLAIN
        reply = self.rules.shortfall(hop, reached)
        if reply:
            self._quit(client)
            raise TryNextHost(reply)
        if reached == PLAIN:
            self.log.info("%s sending in clear text (%s)", self.tag,
                          "TLS off for this attempt" if level == PLAIN else "TLS not offered")
        return extensions, reached

    def _start_tls(self, client, hop, level):
        """RFC 3207 4: STARTTLS, the handshake (the certificate checked for the MX name at
        VERIFIED, RFC 8461 4.2), and EHLO again (RFC 3207 4.2)."""
        self._trace("the remote offers STARTTLS: upgrading before MAIL (RFC 3207 4)")
        answer = client.command("STARTTLS")
        if answer.code != 220:
            raise TlsFailed(f"454 4.7.0 STARTTLS refused by {hop}: {answer.text}")
        name = hop.host or hop.ip
        try:
            client.start_tls(self.tls.context(level), name if level == VERIFIED else None)
        except (ssl.SSLError, OSError) as error:
            unverified = tlspolicy.verification_failed(error)
            what = (f"certificate of {hop} not valid for {name}: {error.verify_message}"
                    if unverified else f"TLS handshake with {hop} failed: {error}")
            raise TlsFailed(f"454 4.7.0 {what}", unverified=unverified) from None
        hello = client.command(f"EHLO {self.config.hostname}")
        if hello.code != 250:
            raise TryNextHost(f"{hello.text} (EHLO after STARTTLS to {hop})")
        return hello.extensions()

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
        limit, size = size_limit(extensions), self._text_size()
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

    def _text_size(self):
        """The octets of text this delivery sends: the signature header and the spool's."""
        return len(self._dkim_header()) + self.message.text_size

    def _dkim_header(self):
        """The DKIM-Signature header for this message, made once (b"": not signed)."""
        if self._signature is None:
            self._signature = relaysigning.dkim_header(self.message, self.signer,
                                                       self.config.local_domains, self._trace)
        return self._signature

    def _transact(self, client, extensions, hop, reached=PLAIN):
        """One transaction; True when the connection may be kept for another."""
        refusal = self._unsuitable(extensions, hop)
        if refusal:
            self._quit(client)
            raise Unsuitable(refusal, hop)
        refusal = self._too_big(extensions, hop)
        if refusal:
            self._report_rest(Status.FAILED, refusal, hop)
            self._quit(client)
            return False
        if "PIPELINING" in extensions:
            return self._transact_pipelined(client, extensions, hop, reached)
        answer = client.command(self._mail_line(extensions))
        if answer.code != 250:
            self._report_rest(_refusal(answer), answer.text, hop)
            self._quit(client)
            return False
        try:
            accepted = self._recipients(client, extensions, hop)
            if accepted:
                self._send(client, accepted, extensions, hop, reached)
        except (DeliveryError, OSError) as error:
            raise SessionBroken(_broken(error, hop)) from None
        return self._end(client, reusable=bool(accepted))

    def _transact_pipelined(self, client, extensions, hop, reached):
        """RFC 2920 3.1: (RSET on a cached connection,) MAIL and every RCPT in one write,
        then their replies in order; DATA (or BDAT) only when a recipient was accepted, so
        a remote never waits for a text that will not come."""
        lines = ["RSET"] if self._reset_first else []
        lines += [self._mail_line(extensions)]
        lines += [self._rcpt_line(recipient, extensions) for recipient in self.recipients]
        if self._reset_first:
            self._reset_first = False
            send_after_reset(client, lines, self.config.command_timeout)
        else:
            client.send_lines(lines)
        answer = client.reply(self.config.command_timeout)
        if answer.code != 250:
            self._report_rest(_refusal(answer), answer.text, hop)
            read = self._read_replies(client, len(self.recipients))
            return self._end(client, reusable=False, broken=not read)
        try:
            accepted = self._recipients(client, extensions, hop, pipelined=True)
            if accepted:
                self._send(client, accepted, extensions, hop, reached)
        except (DeliveryError, OSError) as error:
            raise SessionBroken(_broken(error, hop)) from None
        return self._end(client, reusable=bool(accepted))

    def _read_replies(self, client, count):
        """Read (and drop) `count` replies; False when the connection failed meanwhile."""
        try:
            for _ in range(count):
                client.reply(self.config.command_timeout)
        except (DeliveryError, OSError):
            return False
        return True

    def _end(self, client, reusable, broken=False):
        """After the transaction: True to keep the connection for the next message (the
        reply to the text ended the transaction, RFC 5321 4.1.1.4), else QUIT (a broken
        connection is only closed)."""
        if reusable and self.connections is not None:
            return True
        if not broken:
            self._quit(client)
        return False

    def _mail_line(self, extensions):
        envelope = self.message.envelope
        parameters, dropped = offered_parameters(envelope.parameters, extensions)
        self._trace_dropped("MAIL", dropped)
        if "SMTPUTF8" in extensions and self._addresses_need_smtputf8():   # RFC 6531 3.4
            parameters.setdefault("SMTPUTF8", None)
        if "SIZE" in extensions:                                      # RFC 1870 6
            parameters["SIZE"] = str(self._text_size())
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

    def _recipients(self, client, extensions, hop, pipelined=False):
        """RCPT for each (or, `pipelined`, the replies to those already sent); the refused
        are reported before DATA. Returns the accepted."""
        accepted, refused = [], {}
        try:
            for recipient in self.recipients:
                answer = client.reply(self.config.command_timeout) if pipelined else \
                    client.command(self._rcpt_line(recipient, extensions))
                if answer.status is Status.DONE:
                    accepted.append(recipient)
                else:
                    refused[recipient.address.text] = Outcome(answer.status, answer.text,
                                                              str(hop))
        finally:
            self._report(refused)
        return accepted

    def _chunked(self, extensions):
        return "CHUNKING" in extensions and self.config.relay_chunking

    def _send(self, client, accepted, extensions, hop, reached):
        """The text, with DATA or BDAT; every accepted recipient gets the one outcome."""
        if self._chunked(extensions):
            self._trace(f"{hop} offers CHUNKING: the text goes unstuffed with BDAT, in "
                        f"chunks of at most {BDAT_CHUNK} octets (RFC 3030 2)")
            answer = self._bdat(client)
        else:
            if "CHUNKING" in extensions:
                self._trace(f"{hop} offers CHUNKING, but [relay] chunking = no: DATA "
                            "(RFC 5321 4.1.1.4)")
            answer = self._data(client)
        if answer.status is Status.DONE:
            self.rules.delivered(hop, reached)
        passed_on = "DSN" in extensions         # RFC 3461 5.2.1: its notices are the hop's
        self._report({recipient.address.text: Outcome(answer.status, answer.text, str(hop),
                                                       passed_on)
                      for recipient in accepted})

    def _data(self, client):
        answer = client.command("DATA")
        if answer.code != 354:
            return _as_refusal(answer)
        prefix = self._dkim_header()
        if not prefix:
            return client.send_text(self.message)
        return client.send_text(self.message, prefix=prefix)

    def _bdat(self, client):
        """RFC 3030 2: after a chunk is refused no other is sent; its reply is the outcome."""
        pieces = spool.unstuffed(self.message.text_chunks(BDAT_CHUNK))
        for chunk, last in with_last(with_prefix(self._dkim_header(), pieces)):
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


def _broken(error, hop):
    """The reply for the recipients left when the session broke after MAIL."""
    return getattr(error, "reply", "") or f"451 4.4.2 connection to {hop} failed: {error}"


def _refusal(answer):
    """A reply other than the expected one: 5xx fails, anything else is tried again."""
    return Status.FAILED if answer.status is Status.FAILED else Status.PENDING


def _as_refusal(answer):
    """`answer` where another was expected, as a reply that is not a success: a 2xx or 3xx
    out of place is a protocol error to be tried again later."""
    if answer.status is Status.DONE or answer.code < 400:
        return Response(451, (f"451 4.5.0 unexpected reply from remote: {answer.text}",))
    return answer


def _equal_preference(hops):
    """The hops in runs of one preference, in their order (an MX's; others share 0)."""
    groups = []
    for hop in hops:
        if groups and groups[-1][0].preference == hop.preference:
            groups[-1].append(hop)
        else:
            groups.append([hop])
    return groups
