"""The SMTP protocol (RFC 5321) as data: the session, the transition table, the dispatcher,
and the handlers of the session's own commands (those of the mail transaction, MAIL, RCPT,
DATA and BDAT, are in transaction.py).

No sockets and no disk here. `dispatch(session, line)` looks the verb up in
TRANSITIONS[session.state], runs its handler, and moves to the state the table names for the
reply it got; a verb the table does not list for the current state is answered 503 by the
dispatcher itself. Every handler takes (session, argument) and returns one Reply, and the
reply says what the connection does next (`Reply.then`: read a command, read the message
text, read a SASL line, start TLS, close), so the socket layer only does what it is told.
What the protocol needs from outside (routing, the disk, passwords) is in `session.policy`.
"""
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import ids
import replies
import sasl
from envelope import Client, Envelope
from replies import Next, ReadChunk
from routing import Router
from sasl import Exchange
from transaction import (Chunk, address_literal, bdat, data, drop_transaction, end_of_chunk,
                         end_of_data, end_of_last_chunk, mail, parse_chunk, rcpt)
from verbs import VERBS

# The states of a session (RFC 5321 3.3 and 4.1.4 describe the order of commands)
START = "START"          # connected and greeted; waiting for HELO/EHLO
GREETED = "GREETED"      # HELO/EHLO done; no mail transaction
MAIL = "MAIL"            # MAIL FROM accepted; waiting for RCPT TO
RCPT = "RCPT"            # at least one recipient accepted; RCPT TO or DATA may follow
DATA = "DATA"            # 354 sent; the message text is being read
BDAT = "BDAT"            # a BDAT chunk's octets are being read (RFC 3030 2)
CHUNKED = "CHUNKED"      # one or more chunks received; BDAT (or RSET) goes on
AUTH = "AUTH"            # 334 sent; waiting for the client's SASL response (RFC 4954 4)
CLOSED = "CLOSED"        # QUIT, or the server ended the session

# Input that is not a command: the pseudo-verbs the table lists it under
END_OF_DATA = "<CRLF>.<CRLF>"
END_OF_CHUNK = "<BDAT chunk>"
END_OF_LAST_CHUNK = "<BDAT LAST chunk>"
AUTH_RESPONSE = "<SASL response>"

# The longest line the socket layer reads, by what it is reading
LINE_LIMITS = {
    Next.COMMAND: 512,      # RFC 5321 4.5.3.1.4: a command line, CRLF included
    Next.SASL: 12288,       # RFC 4954 4: a SASL response line
}
# Verbs a confused web client sends; the session ends at once (as Postfix does)
HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS"})
# Replies that say the command itself was wrong: they count against max_errors
BAD_COMMAND_CODES = frozenset({500, 501, 503, 504, 555})


@dataclass
class Policy:
    """What the protocol needs from outside: the limits, and a few callables."""
    hostname: str
    router: Router
    open_message: Callable          # (envelope, Received line) -> a writer for the text
    submit: Callable                # (that writer) -> stored durably (RFC 5321 6.1)
    relay_networks: tuple = ()
    max_message_size: int = 10485760
    max_recipients: int = 100
    max_errors: int = 10
    max_rejected_recipients: int = 20
    tls_available: bool = False                 # a certificate is configured (RFC 3207)
    check_password: Optional[Callable] = None   # (login, password) -> bool; AUTH
    auth_plaintext: bool = False                # offer AUTH without TLS to any client
    auth_required: bool = False                 # the submission port (RFC 6409 4.3)
    max_auth_failures: int = 3
    auth_failure_delay: float = 1.0
    may_send_as: Optional[Callable] = None      # (login, address) -> bool; None: anyone
    checks: Optional[object] = None             # checks.Checks ([checks]); None: none


class Transition(NamedTuple):
    verb: str
    old: str
    new: str


@dataclass
class Session:
    policy: Policy
    client: Client
    id: str = field(default_factory=ids.session_id)
    state: str = START
    helo: Optional[str] = None          # the name from HELO/EHLO
    esmtp: bool = False                 # EHLO rather than HELO
    tls: bool = False                   # STARTTLS done (RFC 3207)
    authenticated: Optional[str] = None     # the login after a successful AUTH (RFC 4954)
    auth_failures: int = 0
    bad_commands: int = 0               # the error budget (max_errors)
    rejected_recipients: int = 0        # their own budget (max_rejected_recipients)
    sasl: Optional[Exchange] = None     # an AUTH exchange under way
    envelope: Optional[Envelope] = None     # from MAIL until RSET, HELO or the end of data
    findings: Optional[object] = None   # checks.Findings of this envelope; None: unchecked
    text: Optional[object] = None       # a MessageText (after 354) or ChunkedText (BDAT):
                                        # the socket layer feeds it the text
    chunk: Optional["Chunk"] = None     # the BDAT chunk announced and being read
    transition: Optional[Transition] = None     # the move the last command made

    @property
    def client_literal(self):
        return address_literal(self.client.ip)


def greeting(session):
    return replies.GREETING.format(hostname=session.policy.hostname)


def restart_after_tls(session):
    """RFC 3207 4.2: after the handshake the client starts over: nothing said before it
    (EHLO name, envelope, AUTH) is kept."""
    session.state, session.helo, session.esmtp, session.tls = START, None, False, True
    session.authenticated, session.sasl = None, None
    drop_transaction(session)


# ---------------------------------------------------------------------------------------
# Handlers: (session, argument) -> Reply. They change the envelope, never the state.


def helo(session, argument):
    return _greet(session, argument, esmtp=False)


def ehlo(session, argument):
    return _greet(session, argument, esmtp=True)


def _greet(session, argument, esmtp):
    name = argument.strip()
    verb = "EHLO" if esmtp else "HELO"
    # RFC 5321 4.1.1.1: the argument is the client's domain or address literal
    if not name or " " in name or not name.isprintable() or not name.isascii():
        return replies.HELO_NEEDS_DOMAIN.format(verb=verb)
    drop_transaction(session)      # RFC 5321 4.1.4: HELO/EHLO resets the transaction
    session.helo, session.esmtp = name, esmtp
    hostname = session.policy.hostname
    if not esmtp:
        return replies.HELO_OK.format(hostname=hostname, name=name)
    return replies.EHLO_OK.format(hostname=hostname, name=name,
                                  extensions="\n".join(extensions(session)))


def extensions(session):
    """The EHLO keywords (RFC 5321 4.1.1.1), each from its own RFC."""
    policy = session.policy
    keywords = [
        f"SIZE {policy.max_message_size}",              # RFC 1870
        "8BITMIME",                                     # RFC 6152
        "PIPELINING",                                   # RFC 2920
        "ENHANCEDSTATUSCODES",                          # RFC 2034
        "SMTPUTF8",                                     # RFC 6531
        "DSN",                                          # RFC 3461
        "CHUNKING",                                     # RFC 3030
        f"LIMITS RCPTMAX={policy.max_recipients}",      # RFC 9422
        "HELP",                                         # RFC 5321 4.1.1.8
    ]
    if policy.tls_available and not session.tls:
        keywords.append("STARTTLS")                     # RFC 3207
    if sasl.offered(session):
        keywords.append("AUTH PLAIN LOGIN")             # RFC 4954, RFC 4616
    return keywords

def starttls(session, argument):
    """RFC 3207 4: the reply 220 tells the socket layer to start the handshake."""
    if argument.strip():
        return replies.SYNTAX.format(syntax=VERBS["STARTTLS"].syntax)
    if session.tls:
        return replies.ALREADY_TLS
    if not session.policy.tls_available:
        return replies.TLS_NOT_AVAILABLE
    return replies.READY_FOR_TLS


def rset(session, argument):
    drop_transaction(session)
    return replies.RESET_OK


def noop(session, argument):
    return replies.OK


def quit_(session, argument):
    return replies.CLOSING.format(hostname=session.policy.hostname)


def vrfy(session, argument):
    # RFC 5321 3.5.3: 252 says "cannot verify"; confirming users helps only spammers
    if not argument.strip():
        return replies.SYNTAX.format(syntax=VERBS["VRFY"].syntax)
    return replies.CANNOT_VRFY


def expn(session, argument):
    return replies.NO_EXPN


def help_(session, argument):
    topic = argument.strip().upper()
    if not topic:
        return replies.HELP.format(text="\n".join(help_overview(session.policy)))
    if topic not in VERBS:
        return replies.HELP.format(
            text=f"No help for {replies.quoted(topic)!r}; try HELP alone")
    return replies.HELP.format(text="\n".join(help_for(topic, session.policy)))


def help_overview(policy=None):
    """The commands this server takes; STARTTLS only when a certificate is configured
    (RFC 3207 4: without one it could only answer 454)."""
    verbs = [verb for verb in VERBS if verb != "STARTTLS" or policy is None
             or policy.tls_available]
    return ["Commands: " + " ".join(verbs),
            "HELP <command> shows its syntax, where it is allowed, and its RFC section"]


def help_for(verb, policy=None):
    info = VERBS[verb]
    allowed = states_allowing(verb)
    lines = [f"{verb}: {info.summary}",
             f"Syntax: {info.syntax}",
             f"Allowed in: {', '.join(allowed) if allowed else 'no state'}",
             f"See {info.rfc}"]
    if verb == "STARTTLS" and policy is not None and not policy.tls_available:
        lines.insert(1, "Not offered here: no certificate is configured ([tls] cert, key)")
    return lines


# ---------------------------------------------------------------------------------------
# The protocol as data


STAY = None     # a Rule's next state that means "where the session already is"


class Rule(NamedTuple):
    """One cell of the table: the handler, and the state after each kind of reply."""
    handler: Callable
    success: Optional[str]          # after 2xx
    waiting: Optional[str] = STAY   # after 3xx: the server waits for more input (354, 334)
    failure: Optional[str] = STAY   # after 4xx/5xx

    def next_state(self, current, reply):
        if reply.code < 300:
            return self.success or current
        if reply.code < 400:
            return self.waiting or current
        return self.failure or current


def _anytime(state_after_rset):
    """The verbs RFC 5321 4.1.4 allows at any point between commands."""
    return {
        "RSET": Rule(rset, state_after_rset),
        "NOOP": Rule(noop, STAY),
        "VRFY": Rule(vrfy, STAY),
        "EXPN": Rule(expn, STAY),
        "HELP": Rule(help_, STAY),
        "QUIT": Rule(quit_, CLOSED),
    }


# {state: {verb: Rule}}: the whole protocol. `python smtpd.py --fsm` draws it.
TRANSITIONS = {
    START: {
        "HELO": Rule(helo, GREETED),
        "EHLO": Rule(ehlo, GREETED),
        **_anytime(START),
    },
    GREETED: {
        "HELO": Rule(helo, GREETED),
        "EHLO": Rule(ehlo, GREETED),
        "STARTTLS": Rule(starttls, START),
        "AUTH": Rule(sasl.start, GREETED, waiting=AUTH),
        "MAIL": Rule(mail, MAIL),
        **_anytime(GREETED),
    },
    MAIL: {
        "HELO": Rule(helo, GREETED),
        "EHLO": Rule(ehlo, GREETED),
        "RCPT": Rule(rcpt, RCPT),
        **_anytime(GREETED),
    },
    RCPT: {
        "HELO": Rule(helo, GREETED),
        "EHLO": Rule(ehlo, GREETED),
        "RCPT": Rule(rcpt, RCPT),
        "DATA": Rule(data, STAY, waiting=DATA),
        "BDAT": Rule(bdat, STAY, waiting=BDAT),
        **_anytime(GREETED),
    },
    DATA: {
        END_OF_DATA: Rule(end_of_data, GREETED, failure=GREETED),
    },
    BDAT: {
        END_OF_CHUNK: Rule(end_of_chunk, CHUNKED, failure=GREETED),
        END_OF_LAST_CHUNK: Rule(end_of_last_chunk, GREETED, failure=GREETED),
    },
    CHUNKED: {
        "HELO": Rule(helo, GREETED),
        "EHLO": Rule(ehlo, GREETED),
        "BDAT": Rule(bdat, STAY, waiting=BDAT),
        **_anytime(GREETED),
    },
    AUTH: {
        AUTH_RESPONSE: Rule(sasl.respond, GREETED, waiting=AUTH, failure=GREETED),
    },
    CLOSED: {},
}


def states_allowing(verb):
    return [state for state, rules in TRANSITIONS.items() if verb in rules]


# ---------------------------------------------------------------------------------------
# The dispatcher


def dispatch(session, line):
    """One command line (bytes, without CRLF) in, one Reply out; the state moves per the table."""
    session.transition = None
    try:
        text = line.decode("utf-8")         # RFC 6531 3.3: UTF-8 only in SMTPUTF8 paths
    except UnicodeDecodeError:
        return _over_budget(session) or _bad_command(session, replies.NOT_UTF8)
    verb, _, argument = text.partition(" ")
    verb = verb.upper()
    if verb != "QUIT":                      # QUIT is always answered 221
        spent = _over_budget(session)
        if spent:
            return spent
    if verb in HTTP_VERBS:
        return _close(session, replies.NOT_HTTP.format(hostname=session.policy.hostname))
    if verb not in VERBS:
        unknown = replies.UNKNOWN_COMMAND.format(verb=replies.quoted(verb))
        return _bad_command(session, unknown)
    rule = TRANSITIONS[session.state].get(verb)
    if rule is None:
        allowed = ", ".join(states_allowing(verb))
        refusal = replies.BAD_SEQUENCE.format(
            verb=verb, state=f"{session.state} (allowed in {allowed})")
        return _out_of_sequence(session, verb, argument, refusal)
    return _run(session, verb, rule, argument)


def _out_of_sequence(session, verb, argument, refusal):
    """503 (RFC 5321 4.1.4); a BDAT out of sequence is still followed by its octets, which
    are read and dropped first to stay in step (RFC 3030 2)."""
    chunk = parse_chunk(argument) if verb == "BDAT" else None
    if chunk is None:
        return _bad_command(session, refusal)
    session.chunk = chunk._replace(refusal=refusal)
    return ReadChunk(chunk.octets)


def receive_chunk(session):
    """A BDAT chunk's octets have been read (into session.text, or dropped): its reply, by
    the BDAT cells of the table."""
    chunk, session.chunk = session.chunk, None
    if session.state != BDAT:               # out of sequence: nothing was opened
        return _bad_command(session, chunk.refusal)
    verb = END_OF_LAST_CHUNK if chunk.last else END_OF_CHUNK
    return _run(session, verb, TRANSITIONS[BDAT][verb], chunk)


def receive_text(session):
    """The text after DATA has arrived (session.text was fed): the END_OF_DATA cell."""
    return _run(session, END_OF_DATA, TRANSITIONS[DATA][END_OF_DATA], None)


def receive_auth_response(session, line):
    """A line in the AUTH state is a SASL response, not a command: the AUTH cell."""
    return _run(session, AUTH_RESPONSE, TRANSITIONS[AUTH][AUTH_RESPONSE], line)


def refuse_long_line(session):
    """A line over the limit: a command (RFC 5321 4.5.3.1.4, a bad command) or a SASL
    response, which ends the AUTH exchange (RFC 4954 4)."""
    if session.state == AUTH:
        session.sasl = None
        rule = TRANSITIONS[AUTH][AUTH_RESPONSE]
        return _move(session, AUTH_RESPONSE, rule, replies.AUTH_LINE_TOO_LONG)
    return _bad_command(session, replies.LINE_TOO_LONG)


def abort_transaction(session):
    """After an unexpected error: discard the envelope and answer 451 (RFC 5321 4.2.3)."""
    drop_transaction(session)
    session.sasl = None
    if session.state in (MAIL, RCPT, DATA, BDAT, CHUNKED, AUTH):
        session.state = GREETED
    return replies.LOCAL_ERROR


def end_session(session):
    """The connection is gone (QUIT, a timeout, the client left): drop any unfinished text."""
    drop_transaction(session)
    session.state = CLOSED


def _run(session, verb, rule, argument):
    return _move(session, verb, rule, rule.handler(session, argument))


def _move(session, verb, rule, reply):
    old = session.state
    if reply.then is Next.CHUNK:            # no reply yet: the chunk's octets come first
        session.state = rule.waiting
        session.transition = Transition(verb, old, session.state)
        return reply
    session.state = CLOSED if reply.then is Next.CLOSE else rule.next_state(old, reply)
    session.transition = Transition(verb, old, session.state)
    if reply.code in BAD_COMMAND_CODES:
        session.bad_commands += 1
    return reply


def _over_budget(session):
    """The 421 for a session that has spent its error budget, or None."""
    policy = session.policy
    if session.bad_commands >= policy.max_errors:
        return _close(session, replies.TOO_MANY_ERRORS.format(hostname=policy.hostname))
    if session.rejected_recipients >= policy.max_rejected_recipients:
        return _close(session, replies.TOO_MANY_REJECTED.format(hostname=policy.hostname))
    return None


def _bad_command(session, reply):
    session.bad_commands += 1
    return reply


def _close(session, reply):
    session.state = CLOSED
    return reply
