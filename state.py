"""The SMTP protocol (RFC 5321) as data: the session, the transition table, the handlers.

No sockets and no disk here. `dispatch(session, line)` looks the verb up in
TRANSITIONS[session.state], runs its handler, and moves to the state the table names for the
reply it got; a verb the table does not list for the current state is answered 503 by the
dispatcher itself. Every handler takes (session, argument) and returns one Reply, and the
reply says what the connection does next (`Reply.then`: read a command, read the message
text, read a SASL line, start TLS, close), so the socket layer only does what it is told.
What the protocol needs from outside (routing, the disk, passwords) is in `session.policy`.
"""
import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import replies
import sasl
from sasl import Exchange
from address import AddressError, parse_parameters, parse_path, split_path_and_parameters
from envelope import Client, Envelope, Recipient
from replies import Next
from routing import Destination, Router
from storage import StorageError
from text import MAX_RECEIVED_HEADERS, MessageText, received_header

# The states of a session (RFC 5321 3.3 and 4.1.4 describe the order of commands)
START = "START"          # connected and greeted; waiting for HELO/EHLO
GREETED = "GREETED"      # HELO/EHLO done; no mail transaction
MAIL = "MAIL"            # MAIL FROM accepted; waiting for RCPT TO
RCPT = "RCPT"            # at least one recipient accepted; RCPT TO or DATA may follow
DATA = "DATA"            # 354 sent; the message text is being read
AUTH = "AUTH"            # 334 sent; waiting for the client's SASL response (RFC 4954 4)
CLOSED = "CLOSED"        # QUIT, or the server ended the session

# Input that is not a command: the pseudo-verbs the table lists it under
END_OF_DATA = "<CRLF>.<CRLF>"
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


class Transition(NamedTuple):
    verb: str
    old: str
    new: str


@dataclass
class Session:
    policy: Policy
    client: Client
    id: str = field(default_factory=lambda: secrets.token_hex(3))
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
    text: Optional[MessageText] = None  # after 354: the socket layer feeds it the text
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
    _drop_transaction(session)


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
    _drop_transaction(session)      # RFC 5321 4.1.4: HELO/EHLO resets the transaction
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
        "HELP",                                         # RFC 5321 4.1.1.8
    ]
    if policy.tls_available and not session.tls:
        keywords.append("STARTTLS")                     # RFC 3207
    if sasl.offered(session):
        keywords.append("AUTH PLAIN LOGIN")             # RFC 4954, RFC 4616
    return keywords


def mail(session, argument):
    if session.policy.auth_required and not session.authenticated:
        return replies.AUTH_REQUIRED        # RFC 6409 4.3: submission needs AUTH
    path_text = _after_keyword(argument, "FROM:")
    if path_text is None:
        return replies.SYNTAX.format(syntax=VERBS["MAIL"].syntax)
    path_text, parameter_text = split_path_and_parameters(path_text)
    try:
        reverse_path = parse_path(path_text, allow_null=True)
        parameters = parse_parameters(parameter_text)
    except AddressError as problem:
        return replies.BAD_SENDER.format(problem=problem)
    refusal = _check_mail_parameters(session, parameters)
    if refusal:
        return refusal
    parameters.pop("AUTH", None)            # RFC 4954 5: accepted, and not passed on
    session.envelope = Envelope(reverse_path, session.helo, session.client, parameters)
    return replies.SENDER_OK.format(address=reverse_path.text)


def _check_mail_parameters(session, parameters):
    for keyword, value in parameters.items():
        if keyword == "SIZE":               # RFC 1870 6: refuse at once what is too big
            if value is None or not value.isdigit():
                return replies.BAD_PARAMETER.format(parameter=f"SIZE={value}")
            limit = session.policy.max_message_size
            if int(value) > limit:
                return replies.MESSAGE_TOO_BIG.format(limit=limit)
        elif keyword == "BODY":             # RFC 6152 2
            if (value or "").upper() not in ("7BIT", "8BITMIME"):
                return replies.BAD_PARAMETER.format(parameter=f"BODY={value}")
        elif keyword == "AUTH":             # RFC 4954 5: AUTH=<mailbox> or AUTH=<>
            if value is None:
                return replies.BAD_PARAMETER.format(parameter="AUTH")
        else:                               # RFC 5321 4.1.1.11: not one we offer
            return replies.BAD_PARAMETER.format(parameter=keyword)
    return None


def rcpt(session, argument):
    path_text = _after_keyword(argument, "TO:")
    if path_text is None:
        return replies.SYNTAX.format(syntax=VERBS["RCPT"].syntax)
    path_text, parameter_text = split_path_and_parameters(path_text)
    try:
        address = parse_path(path_text, allow_bare_postmaster=True)
        parameters = parse_parameters(parameter_text)
    except AddressError as problem:
        return replies.BAD_RECIPIENT.format(problem=problem)
    if parameters:                          # RFC 5321 4.1.1.11: we offer no RCPT parameters
        return replies.BAD_PARAMETER.format(parameter=" ".join(parameters))
    policy, envelope = session.policy, session.envelope
    if len(envelope.recipients) >= policy.max_recipients:      # RFC 5321 4.5.3.1.8
        return replies.TOO_MANY_RECIPIENTS
    if not address.domain:                  # RFC 5321 4.1.1.3: <Postmaster> is always local
        address = policy.router.postmaster()
    route = policy.router.route(address)
    if route.destination is Destination.UNKNOWN:
        return _reject(session, replies.NO_SUCH_USER.format(address=address.text))
    if route.destination is Destination.REMOTE and not may_relay(session):
        return _reject(session, replies.RELAY_DENIED.format(address=address.text))   # 3.6.2
    recipient = Recipient(address, parameters, route.mailbox)
    envelope.add(recipient)                 # the same mailbox twice gets one copy
    return replies.RECIPIENT_OK.format(address=recipient.key)


def _reject(session, reply):
    session.rejected_recipients += 1
    return reply


def may_relay(session):
    if session.authenticated:               # RFC 4954 6: an authenticated client may relay
        return True
    client = ipaddress.ip_address(session.client.ip)
    if getattr(client, "ipv4_mapped", None):
        client = client.ipv4_mapped
    return any(client in network for network in session.policy.relay_networks)


def data(session, argument):
    """RFC 5321 4.1.1.4: 354, and the text goes straight to its files as it arrives."""
    if argument.strip():
        return replies.SYNTAX.format(syntax=VERBS["DATA"].syntax)
    policy, envelope = session.policy, session.envelope
    envelope.queue_id = secrets.token_hex(8)
    trace_line = received_header(
        session.helo, session.client_literal, policy.hostname, received_protocol(session),
        envelope.queue_id, [recipient.address for recipient in envelope.recipients])
    try:
        writer = policy.open_message(envelope, trace_line)
    except StorageError as problem:
        return _storage_refusal(problem)
    session.text = MessageText(writer, policy.max_message_size)
    return replies.START_DATA


def end_of_data(session, argument=None):
    """The text has arrived (RFC 5321 4.1.1.4): check it, then store it and answer."""
    text, session.text = session.text, None
    session.envelope = None                 # the next transaction starts from nothing
    refusal = check_text(text, session.policy.max_message_size)
    if refusal:
        text.writer.discard()
        return refusal
    try:
        session.policy.submit(text.writer)  # RFC 5321 6.1: durably stored before the 250
    except StorageError as problem:
        return _storage_refusal(problem)
    return replies.QUEUED.format(queue_id=text.writer.envelope.queue_id)


def check_text(text, max_size):
    """The refusal a finished text earns, or None."""
    if text.oversize:                       # RFC 1870 6
        return replies.MESSAGE_TOO_BIG.format(limit=max_size)
    if text.bare_line_ending:               # RFC 5321 2.3.8: no SMTP smuggling
        return replies.BARE_LINE_ENDING
    if text.line_too_long:                  # RFC 5321 4.5.3.1.6
        return replies.TEXT_LINE_TOO_LONG
    if text.received_headers() > MAX_RECEIVED_HEADERS:      # RFC 5321 6.3
        return replies.LOOP_DETECTED
    return None


def _storage_refusal(problem):
    return replies.STORAGE_FULL if problem.full else replies.LOCAL_ERROR


def received_protocol(session):
    """RFC 3848 2: SMTP, ESMTP, and ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA."""
    if not session.esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if session.tls else "") + ("A" if session.authenticated else "")


def address_literal(ip):
    """RFC 5321 4.1.3: [192.0.2.1] or [IPv6:2001:db8::1]."""
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return f"[IPv6:{address.compressed}]" if address.version == 6 else f"[{address}]"


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
    _drop_transaction(session)
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
        return replies.HELP.format(text="\n".join(help_overview()))
    if topic not in VERBS:
        return replies.HELP.format(
            text=f"No help for {replies.quoted(topic)!r}; try HELP alone")
    return replies.HELP.format(text="\n".join(help_for(topic)))


def help_overview():
    return ["Commands: " + " ".join(VERBS),
            "HELP <command> shows its syntax, where it is allowed, and its RFC section"]


def help_for(verb):
    info = VERBS[verb]
    allowed = states_allowing(verb)
    return [f"{verb}: {info.summary}",
            f"Syntax: {info.syntax}",
            f"Allowed in: {', '.join(allowed) if allowed else 'no state'}",
            f"See {info.rfc}"]


def _after_keyword(argument, keyword):
    """`FROM:<a@b>` -> `<a@b>`; also tolerates `FROM: <a@b>` as most servers do."""
    if argument[:len(keyword)].upper() != keyword:
        return None
    return argument[len(keyword):].strip()


def _drop_transaction(session):
    """Forget the envelope (RFC 5321 4.1.1.5: RSET; 4.1.4: a new HELO/EHLO), and any text
    being written for it."""
    session.envelope = None
    if session.text:
        session.text.writer.discard()
        session.text = None


# ---------------------------------------------------------------------------------------
# The protocol as data


class Verb(NamedTuple):
    syntax: str
    rfc: str
    summary: str


VERBS = {
    "HELO": Verb("HELO <domain>", "RFC 5321 4.1.1.1", "identify yourself (plain SMTP)"),
    "EHLO": Verb("EHLO <domain>", "RFC 5321 4.1.1.1",
                 "identify yourself and list the server's extensions (ESMTP)"),
    "MAIL": Verb("MAIL FROM:<reverse-path> [SIZE=n] [BODY=7BIT|8BITMIME]", "RFC 5321 4.1.1.2",
                 "start a mail transaction with the sender's address (<> for bounces)"),
    "RCPT": Verb("RCPT TO:<forward-path>", "RFC 5321 4.1.1.3", "add one recipient"),
    "DATA": Verb("DATA", "RFC 5321 4.1.1.4",
                 "send the message; end it with a line holding only a period"),
    "RSET": Verb("RSET", "RFC 5321 4.1.1.5", "abort the current mail transaction"),
    "VRFY": Verb("VRFY <user>", "RFC 5321 4.1.1.6",
                 "ask whether a user exists (this server never confirms: 252)"),
    "EXPN": Verb("EXPN <list>", "RFC 5321 4.1.1.7", "expand a mailing list (not offered)"),
    "HELP": Verb("HELP [command]", "RFC 5321 4.1.1.8", "this help"),
    "NOOP": Verb("NOOP", "RFC 5321 4.1.1.9", "do nothing; the server answers 250"),
    "QUIT": Verb("QUIT", "RFC 5321 4.1.1.10", "end the session"),
    "STARTTLS": Verb("STARTTLS", "RFC 3207 4",
                     "switch the connection to TLS; then start over with EHLO"),
    "AUTH": Verb("AUTH PLAIN|LOGIN [initial-response]", "RFC 4954 4",
                 "log in with a user name and password (after STARTTLS)"),
}


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
        **_anytime(GREETED),
    },
    DATA: {
        END_OF_DATA: Rule(end_of_data, GREETED, failure=GREETED),
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
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return _over_budget(session) or _bad_command(session, replies.NOT_ASCII)
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
        return _bad_command(session, replies.BAD_SEQUENCE.format(
            verb=verb, state=f"{session.state} (allowed in {allowed})"))
    return _run(session, verb, rule, argument)


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
    _drop_transaction(session)
    session.sasl = None
    if session.state in (MAIL, RCPT, DATA, AUTH):
        session.state = GREETED
    return replies.LOCAL_ERROR


def end_session(session):
    """The connection is gone (QUIT, a timeout, the client left): drop any unfinished text."""
    _drop_transaction(session)
    session.state = CLOSED


def _run(session, verb, rule, argument):
    return _move(session, verb, rule, rule.handler(session, argument))


def _move(session, verb, rule, reply):
    old = session.state
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
