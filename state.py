"""The SMTP protocol (RFC 5321) as data: the session, the transition table, the handlers.

No sockets and no disk here. A session is a plain dict; `dispatch(session, line)` looks the
verb up in TRANSITIONS[state], runs its handler, and moves to the state the table names for
the reply it got. A verb the table does not list for the current state is answered 503 by the
dispatcher itself. Every handler takes (session, argument) and returns one Reply, so each cell
of the table is tested without a network. What the protocol needs from the outside world
(the mailbox list, delivery) arrives in `session["server"]`, a `Server`.
"""
import base64
import binascii
import datetime
import email.utils
import ipaddress
import secrets
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import replies
from address import AddressError, parse_parameters, parse_path, split_path_and_parameters

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

# RFC 5321 4.1.1.4, 4.5.3.1.6: a text line is at most 1000 octets with its CRLF
MAX_TEXT_LINE = 1000
# RFC 5321 6.3: a message with this many Received: headers has looped
MAX_RECEIVED_HEADERS = 50
# Verbs a confused web client sends; the session ends at once (as Postfix does)
HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS"})


@dataclass
class Server:
    """What the protocol needs from outside: policy and two callables."""
    hostname: str
    local_domains: tuple
    has_mailbox: Callable[[str, str], bool]     # (local part, domain) -> exists?
    deliver: Callable[[dict, bytes], None]      # (envelope, message) -> durably stored
    relay_networks: tuple = ()
    max_message_size: int = 10485760
    max_recipients: int = 100
    max_errors: int = 10
    tls_available: bool = False                 # a certificate is configured (RFC 3207)
    check_password: Optional[Callable[[str, str], bool]] = None    # (login, password); AUTH
    auth_plaintext: bool = False                # offer AUTH without TLS to any client
    auth_required: bool = False                 # the submission port (RFC 6409 4.3)
    max_auth_failures: int = 3


class RawMessage(NamedTuple):
    """The message text as read from the wire: dot-stuffed, CRLF line ends, without the
    final `.` line. `oversize` means the reader stopped keeping it (text is then empty)."""
    text: bytes
    oversize: bool = False


def new_session(server, client_ip="127.0.0.1", client_port=0, session_id=None):
    session = {
        "id": session_id or secrets.token_hex(3),
        "server": server,
        "client_ip": client_ip,
        "client_port": client_port,
        "client_literal": address_literal(client_ip),     # for Received: lines
        "state": START,
        "helo": None,              # the name from HELO/EHLO
        "esmtp": False,            # EHLO rather than HELO
        "errors": 0,               # 5xx replies so far (the error budget)
        "transition": None,        # (verb, old state, new state) of the last command
        "tls": False,              # STARTTLS done (RFC 3207)
        "authenticated": None,     # the login after a successful AUTH (RFC 4954)
        "auth_failures": 0,
        "sasl": None,              # an AUTH exchange under way: {"mechanism", "login"}
    }
    reset_transaction(session)
    return session


def restart_after_tls(session):
    """RFC 3207 4.2: after the handshake the client starts over: nothing said before it
    (EHLO name, envelope, AUTH) is kept."""
    session.update(state=START, helo=None, esmtp=False, tls=True, authenticated=None,
                   sasl=None)
    reset_transaction(session)


def reset_transaction(session):
    """Forget the envelope (RFC 5321 4.1.1.5: RSET; 4.1.4: a new HELO/EHLO)."""
    session["reverse_path"] = None
    session["mail_parameters"] = {}
    session["forward_paths"] = []


def greeting(session):
    return replies.GREETING.format(hostname=session["server"].hostname)


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
    reset_transaction(session)          # RFC 5321 4.1.4: HELO/EHLO resets the transaction
    session["helo"], session["esmtp"] = name, esmtp
    hostname = session["server"].hostname
    if not esmtp:
        return replies.HELO_OK.format(hostname=hostname, name=name)
    return replies.EHLO_OK.format(hostname=hostname, name=name,
                                  extensions="\n".join(extensions(session)))


def extensions(session):
    """The EHLO keywords (RFC 5321 4.1.1.1), each from its own RFC."""
    server = session["server"]
    keywords = [
        f"SIZE {server.max_message_size}",              # RFC 1870
        "8BITMIME",                                     # RFC 6152
        "PIPELINING",                                   # RFC 2920
        "ENHANCEDSTATUSCODES",                          # RFC 2034
        "HELP",                                         # RFC 5321 4.1.1.8
    ]
    if server.tls_available and not session["tls"]:
        keywords.append("STARTTLS")                     # RFC 3207
    if auth_offered(session):
        keywords.append("AUTH PLAIN LOGIN")             # RFC 4954, RFC 4616
    return keywords


def auth_offered(session):
    """AUTH only where a password cannot be sniffed: under TLS or on loopback (or when the
    config says otherwise), and not twice (RFC 4954 4)."""
    server = session["server"]
    if server.check_password is None or session["authenticated"]:
        return False
    return session["tls"] or server.auth_plaintext or _is_loopback(session["client_ip"])


def _is_loopback(ip):
    address = ipaddress.ip_address(ip)
    return (address.ipv4_mapped or address).is_loopback if address.version == 6 \
        else address.is_loopback


def mail(session, argument):
    if session["server"].auth_required and not session["authenticated"]:
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
    session["reverse_path"] = reverse_path.address if reverse_path.domain else ""
    session["mail_parameters"] = parameters
    return replies.SENDER_OK.format(address=session["reverse_path"])


def _check_mail_parameters(session, parameters):
    for keyword, value in parameters.items():
        if keyword == "SIZE":               # RFC 1870 6: refuse at once what is too big
            if value is None or not value.isdigit():
                return replies.BAD_PARAMETER.format(parameter=f"SIZE={value}")
            limit = session["server"].max_message_size
            if int(value) > limit:
                return replies.MESSAGE_TOO_BIG.format(limit=limit)
        elif keyword == "BODY":             # RFC 6152 2
            if (value or "").upper() not in ("7BIT", "8BITMIME"):
                return replies.BAD_PARAMETER.format(parameter=f"BODY={value}")
        else:                               # RFC 5321 4.1.1.11: not one we offer
            return replies.BAD_PARAMETER.format(parameter=keyword)
    return None


def rcpt(session, argument):
    path_text = _after_keyword(argument, "TO:")
    if path_text is None:
        return replies.SYNTAX.format(syntax=VERBS["RCPT"].syntax)
    path_text, parameter_text = split_path_and_parameters(path_text)
    try:
        path = parse_path(path_text, allow_bare_postmaster=True)
        parameters = parse_parameters(parameter_text)
    except AddressError as problem:
        return replies.BAD_RECIPIENT.format(problem=problem)
    if parameters:                          # RFC 5321 4.1.1.11: we offer no RCPT parameters
        return replies.BAD_PARAMETER.format(parameter=" ".join(parameters))
    server = session["server"]
    if len(session["forward_paths"]) >= server.max_recipients:   # RFC 5321 4.5.3.1.8
        return replies.TOO_MANY_RECIPIENTS
    address, refusal = _accept_recipient(session, path)
    if refusal:
        return refusal
    if address not in session["forward_paths"]:     # the same mailbox twice gets one copy
        session["forward_paths"].append(address)
    return replies.RECIPIENT_OK.format(address=address)


def _accept_recipient(session, path):
    """Return (address, None) for a recipient we take, or (None, refusal)."""
    server = session["server"]
    if not path.domain:                     # RFC 5321 4.1.1.3: <Postmaster> is always local
        return f"postmaster@{server.local_domains[0]}", None
    if path.domain in server.local_domains:
        # RFC 5321 4.5.1: postmaster always exists. A local part is matched as a whole:
        # user%remote, "user@remote" and the like are just unknown local names.
        local_part = path.local_part.lower()
        if local_part != "postmaster" and not server.has_mailbox(local_part, path.domain):
            return None, replies.NO_SUCH_USER.format(address=path.address)
        return f"{local_part}@{path.domain}", None
    if not may_relay(session):              # RFC 5321 3.6.2: no open relay
        return None, replies.RELAY_DENIED.format(address=path.address)
    return path.address, None


def may_relay(session):
    if session["authenticated"]:            # RFC 4954 6: an authenticated client may relay
        return True
    client = ipaddress.ip_address(session["client_ip"])
    if getattr(client, "ipv4_mapped", None):
        client = client.ipv4_mapped
    return any(client in network for network in session["server"].relay_networks)


def data(session, argument):
    if argument.strip():
        return replies.SYNTAX.format(syntax=VERBS["DATA"].syntax)
    return replies.START_DATA


def end_of_data(session, raw):
    """The message has arrived (RFC 5321 4.1.1.4): check it, stamp it, store it, answer."""
    server = session["server"]
    message, refusal = check_message(raw, server.max_message_size)
    if refusal:
        reset_transaction(session)
        return refusal
    queue_id = secrets.token_hex(8)
    recipients = session["forward_paths"]
    message = received_header(session, queue_id, recipients) + message
    envelope = {
        "queue_id": queue_id,
        "client_ip": session["client_ip"],
        "client_port": session["client_port"],
        "helo": session["helo"],
        "reverse_path": session["reverse_path"],
        "mail_parameters": dict(session["mail_parameters"]),
        "local": [a for a in recipients if _domain_of(a) in server.local_domains],
        "remote": [a for a in recipients if _domain_of(a) not in server.local_domains],
    }
    server.deliver(envelope, message)   # RFC 5321 6.1: durably stored before the 250
    reset_transaction(session)
    return replies.QUEUED.format(queue_id=queue_id)


def raw_text_limit(server):
    """How much dot-stuffed text the reader keeps before it only looks for the end: stuffing
    adds at most one octet per three (a line "." becomes ".."), so this never cuts a message
    that is within the limit once unstuffed."""
    return server.max_message_size * 4 // 3 + 3


def check_message(raw, max_size):
    """Undo dot-stuffing and check the text; return (message, None) or (None, refusal)."""
    if raw.oversize:
        return None, replies.MESSAGE_TOO_BIG.format(limit=max_size)
    text = raw.text
    # RFC 5321 2.3.8: lines end with CRLF; a bare CR or LF is refused (no SMTP smuggling)
    line_ends = text.count(b"\r\n")
    if text.count(b"\n") != line_ends or text.count(b"\r") != line_ends:
        return None, replies.BARE_LINE_ENDING
    # RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF
    if text and max(map(len, text.split(b"\r\n"))) > MAX_TEXT_LINE - 2:
        return None, replies.TEXT_LINE_TOO_LONG
    message = dot_unstuff(text)
    if len(message) > max_size:             # RFC 1870 6
        return None, replies.MESSAGE_TOO_BIG.format(limit=max_size)
    if count_received_headers(message) > MAX_RECEIVED_HEADERS:   # RFC 5321 6.3
        return None, replies.LOOP_DETECTED
    return message, None


def framing_notes(raw):
    """What the DATA reader did, in words, for --trace (RFC 5321 4.1.1.4, 4.5.2)."""
    if raw.oversize:
        return ["end of data found; the text was over the size limit and was not kept"]
    stuffed = raw.text.count(b"\r\n..") + raw.text.startswith(b"..")
    return [f"end of data: <CRLF>.<CRLF> after {len(raw.text)} octets (RFC 5321 4.1.1.4)",
            f"dot-stuffing removed from {stuffed} line(s) (RFC 5321 4.5.2)"]


def describe(session, reply):
    """One --trace line for a reply: the state change and the rule behind it."""
    outcome = "accepted" if reply.code < 300 else \
        "waiting for more" if reply.code < 400 else "refused"
    transition = session["transition"]
    if transition:
        verb, old, new = transition
        moves = f"[{old} -> {new}] {EDGE_NAMES.get(verb, verb)} {outcome}"
    else:
        moves = f"[{session['state']}] {outcome}"
    return f"{moves}: {reply.code} {reply.enhanced} ({reply.rfc})".replace("  ", " ")


def dot_unstuff(text):
    """RFC 5321 4.5.2: transparency. A line's leading period is removed."""
    if text.startswith(b"."):
        text = text[1:]
    return text.replace(b"\r\n.", b"\r\n")


def count_received_headers(message):
    header = message.split(b"\r\n\r\n", 1)[0]
    return sum(1 for line in header.split(b"\r\n") if line[:9].lower() == b"received:")


def received_header(session, queue_id, recipients, now=None):
    """RFC 5321 4.4: the trace line this server adds, with RFC 3848's protocol names."""
    protocol = "SMTP"
    if session["esmtp"]:        # RFC 3848 2: ESMTP, ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA
        protocol = "ESMTP" + ("S" if session["tls"] else "") + \
            ("A" if session["authenticated"] else "")
    for_clause = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    date = email.utils.format_datetime(now or _now())
    line = (f"Received: from {session['helo']} ({session['client_literal']})\r\n"
            f"\tby {session['server'].hostname} (smtpd) with {protocol} id {queue_id}"
            f"{for_clause};\r\n\t{date}\r\n")
    return line.encode("ascii", "replace")


def address_literal(ip):
    """RFC 5321 4.1.3: [192.0.2.1] or [IPv6:2001:db8::1]."""
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return f"[IPv6:{address.compressed}]" if address.version == 6 else f"[{address}]"


def _now():
    return datetime.datetime.now().astimezone()


def starttls(session, argument):
    """RFC 3207 4: the reply 220 tells smtpd.py to start the handshake."""
    if argument.strip():
        return replies.SYNTAX.format(syntax=VERBS["STARTTLS"].syntax)
    if session["tls"]:
        return replies.ALREADY_TLS
    if not session["server"].tls_available:
        return replies.TLS_NOT_AVAILABLE
    return replies.READY_FOR_TLS


# SASL prompts of the LOGIN mechanism, base64 of "Username:" and "Password:"
LOGIN_PROMPTS = {"username": "VXNlcm5hbWU6", "password": "UGFzc3dvcmQ6"}


def auth(session, argument):
    """RFC 4954 4: AUTH <mechanism> [initial response]; PLAIN (RFC 4616) and LOGIN."""
    if session["authenticated"]:
        return replies.ALREADY_AUTHENTICATED
    if not auth_offered(session):
        return replies.AUTH_NOT_AVAILABLE
    mechanism, _, initial = argument.strip().partition(" ")
    mechanism = mechanism.upper()
    if mechanism not in ("PLAIN", "LOGIN"):
        return replies.AUTH_UNKNOWN_MECHANISM.format(mechanism=_printable(mechanism))
    session["sasl"] = {"mechanism": mechanism, "login": None}
    if not initial.strip():
        challenge = "" if mechanism == "PLAIN" else LOGIN_PROMPTS["username"]
        return replies.AUTH_CHALLENGE.format(challenge=challenge)
    return auth_response(session, initial.strip().encode("ascii", "replace"))


def auth_response(session, line):
    """One base64 line from the client in the AUTH state."""
    sasl = session["sasl"]
    if line.strip() == b"*":                # RFC 4954 4: the client cancels
        session["sasl"] = None
        return replies.AUTH_CANCELLED
    try:
        decoded = base64.b64decode(line.strip(), validate=True)
    except (binascii.Error, ValueError):
        session["sasl"] = None
        return replies.AUTH_BAD_BASE64
    if sasl["mechanism"] == "PLAIN":
        # RFC 4616 2: [authzid] NUL authcid NUL passwd
        parts = decoded.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            return _auth_result(session, None, None)
        return _auth_result(session, parts[1], parts[2])
    if sasl["login"] is None:
        sasl["login"] = decoded
        return replies.AUTH_CHALLENGE.format(challenge=LOGIN_PROMPTS["password"])
    return _auth_result(session, sasl["login"], decoded)


def _auth_result(session, login, password):
    session["sasl"] = None
    server = session["server"]
    try:
        login, password = login.decode("utf-8"), password.decode("utf-8")
    except (AttributeError, UnicodeDecodeError):
        login = None
    if login and server.check_password(login, password):
        session["authenticated"] = login.lower()
        return replies.AUTH_OK
    session["auth_failures"] += 1
    if session["auth_failures"] >= server.max_auth_failures:
        return replies.TOO_MANY_AUTH_FAILURES.format(hostname=server.hostname)
    return replies.AUTH_FAILED


def rset(session, argument):
    reset_transaction(session)
    return replies.RESET_OK


def noop(session, argument):
    return replies.OK


def quit_(session, argument):
    return replies.CLOSING.format(hostname=session["server"].hostname)


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
        return replies.HELP.format(text=f"No help for {topic[:16]!r}; try HELP alone")
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


def _domain_of(address):
    return address.rpartition("@")[2].lower()


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
    waiting: Optional[str] = STAY   # after 3xx: the server waits for more input (354)
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
        "AUTH": Rule(auth, GREETED, waiting=AUTH),
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
        AUTH_RESPONSE: Rule(auth_response, GREETED, waiting=AUTH, failure=GREETED),
    },
    CLOSED: {},
}


def states_allowing(verb):
    return [state for state, rules in TRANSITIONS.items() if verb in rules]


# The reply each cell gives when it goes well (2xx) or asks for more (3xx), for --fsm
SUCCESS_REPLIES = {
    "HELO": replies.HELO_OK, "EHLO": replies.EHLO_OK, "MAIL": replies.SENDER_OK,
    "RCPT": replies.RECIPIENT_OK, "RSET": replies.RESET_OK, "NOOP": replies.OK,
    "VRFY": replies.CANNOT_VRFY, "HELP": replies.HELP, "QUIT": replies.CLOSING,
    "STARTTLS": replies.READY_FOR_TLS, "AUTH": replies.AUTH_OK, END_OF_DATA: replies.QUEUED,
    AUTH_RESPONSE: replies.AUTH_OK, "EXPN": replies.NO_EXPN,
}
WAITING_REPLIES = {"DATA": replies.START_DATA, "AUTH": replies.AUTH_CHALLENGE,
                   AUTH_RESPONSE: replies.AUTH_CHALLENGE}
# Mermaid and Graphviz labels cannot hold "<"; the pseudo-verbs get plain names
EDGE_NAMES = {END_OF_DATA: "CRLF.CRLF", AUTH_RESPONSE: "SASL response"}


def edges():
    """The table as a list of (from, to, label), verbs with the same move and reply merged:
    every allowed verb, and where each kind of reply takes the session."""
    merged = {}
    for state, rules in TRANSITIONS.items():
        for verb, rule in rules.items():
            for code, target in _moves(verb, rule):
                key = (state, target or state, code)
                merged.setdefault(key, []).append(EDGE_NAMES.get(verb, verb))
    return [(source, target, f"{', '.join(verbs)} / {code}")
            for (source, target, code), verbs in merged.items()]


def _moves(verb, rule):
    if verb in SUCCESS_REPLIES:
        yield str(SUCCESS_REPLIES[verb].code), rule.success
    if verb in WAITING_REPLIES:
        yield str(WAITING_REPLIES[verb].code), rule.waiting
    if rule.failure is not STAY:
        yield "4xx/5xx", rule.failure


def draw(kind="mermaid"):
    """The state machine as Mermaid (README) or Graphviz dot (`python smtpd.py --fsm dot`)."""
    if kind == "dot":
        lines = ["digraph smtp {", "    rankdir=LR;", '    connect [shape=point];',
                 f'    connect -> {START} [label="connect / {replies.GREETING.code}"];']
        lines += [f'    {source} -> {target} [label="{label}"];'
                  for source, target, label in edges()]
        return "\n".join(lines + ["}"])
    lines = ["stateDiagram-v2", f"    [*] --> {START} : connect / {replies.GREETING.code}"]
    lines += [f"    {source} --> {target} : {label}"
              for source, target, label in edges()]
    lines.append(f"    {CLOSED} --> [*]")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The dispatcher


def dispatch(session, line):
    """One command line (bytes, without CRLF) in, one Reply out; the state moves per the table."""
    server = session["server"]
    session["transition"] = None
    if session["errors"] >= server.max_errors:
        return _close(session, replies.TOO_MANY_ERRORS.format(hostname=server.hostname))
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return _count_error(session, replies.NOT_ASCII)
    verb, _, argument = text.partition(" ")
    verb = verb.upper()
    if verb in HTTP_VERBS:
        return _close(session, replies.NOT_HTTP.format(hostname=server.hostname))
    if verb not in VERBS:
        return _count_error(session, replies.UNKNOWN_COMMAND.format(verb=_printable(verb)))
    rule = TRANSITIONS[session["state"]].get(verb)
    if rule is None:
        allowed = ", ".join(states_allowing(verb))
        return _count_error(session, replies.BAD_SEQUENCE.format(
            verb=verb, state=f"{session['state']} (allowed in {allowed})"))
    return _run(session, verb, rule, argument)


def receive_message(session, raw):
    """The text after DATA has arrived: run the END_OF_DATA cell of the table."""
    return _run(session, END_OF_DATA, TRANSITIONS[DATA][END_OF_DATA], raw)


def receive_auth_response(session, line):
    """A line in the AUTH state is a SASL response, not a command: the AUTH cell of the table."""
    return _run(session, AUTH_RESPONSE, TRANSITIONS[AUTH][AUTH_RESPONSE], line)


def refuse_long_line(session):
    """A command line over 512 octets (RFC 5321 4.5.3.1.4); it counts as an error."""
    return _count_error(session, replies.LINE_TOO_LONG)


def abort_transaction(session):
    """After an unexpected error: discard the envelope and answer 451 (RFC 5321 4.2.3)."""
    reset_transaction(session)
    session["sasl"] = None
    if session["state"] in (MAIL, RCPT, DATA, AUTH):
        session["state"] = GREETED
    return replies.LOCAL_ERROR


def _run(session, verb, rule, argument):
    reply = rule.handler(session, argument)
    old = session["state"]
    session["state"] = rule.next_state(old, reply)
    if reply.code == 421:                   # RFC 5321 3.8: 421 closes the session
        session["state"] = CLOSED
    session["transition"] = (verb, old, session["state"])
    return _count_error(session, reply) if reply.code >= 500 else reply


def _count_error(session, reply):
    session["errors"] += 1
    return reply


def _close(session, reply):
    session["state"] = CLOSED
    return reply


def _printable(text):
    return "".join(c for c in text if c.isalnum())[:16] or "?"
