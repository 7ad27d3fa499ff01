"""state.py: every cell of the command table, and the checks around DATA (no network)."""
import datetime
import ipaddress
import re

import pytest

import replies
import state
import transaction
from address import Address
from envelope import Client
from replies import Next
from routing import Router
from state import CLOSED, DATA, GREETED, MAIL, RCPT, START
from text import received_header

HOSTNAME = "mail.test.ru"
LIMIT = 1000
MAX_RECIPIENTS = 3
MAX_ERRORS = 10


class Writer:
    """What the protocol writes the text to (a Draft, in the server): it records."""

    def __init__(self, envelope, prefix):
        self.envelope = envelope
        self.prefix = prefix
        self.text = b""
        self.discarded = False

    def write(self, text):
        self.text += text

    def discard(self):
        self.discarded = True


class FakeSystem:
    """A state.Policy with a fixed mailbox list, whose disk only records."""

    def __init__(self, **overrides):
        self.delivered = []             # the Writers submitted
        self.opened = []
        self.mailboxes = {("alice", "test.ru"), ("bob", "test.ru"), ("carol", "example.test")}
        router = Router(("test.ru", "example.test"),
                        lambda local_part, domain: (local_part, domain) in self.mailboxes)
        settings = dict(
            hostname=HOSTNAME,
            router=router,
            open_message=self.open_message,
            submit=lambda writer, headers: self.delivered.append(writer),
            relay_networks=(ipaddress.ip_network("127.0.0.0/8"),
                            ipaddress.ip_network("::1/128")),
            max_message_size=LIMIT,
            max_recipients=MAX_RECIPIENTS,
            max_errors=MAX_ERRORS,
        )
        settings.update(overrides)
        self.policy = state.Policy(**settings)

    def open_message(self, envelope, prefix):
        writer = Writer(envelope, prefix)
        self.opened.append(writer)
        return writer


def new_session(client_ip="127.0.0.1", **overrides):
    fake = FakeSystem(**overrides)
    session = state.Session(fake.policy, Client(client_ip, 51234), "abc123")
    return fake, session


def send(session, line):
    return state.dispatch(session, line.encode() if isinstance(line, str) else line)


def forward_paths(session):
    return [recipient.key for recipient in session.envelope.recipients] \
        if session.envelope else []


def reverse_path(session):
    return session.envelope.reverse_path.text if session.envelope else None


def send_text(session, wire):
    """The text after 354, as the socket layer feeds it, then the end-of-data cell."""
    assert session.text.feed(wire) == b""
    return state.receive_text(session)


# The commands that bring a fresh session into each state
SETUP = {
    START: [],
    GREETED: ["EHLO client.example"],
    MAIL: ["EHLO client.example", "MAIL FROM:<sender@example.org>"],
    RCPT: ["EHLO client.example", "MAIL FROM:<sender@example.org>", "RCPT TO:<alice@test.ru>"],
    DATA: ["EHLO client.example", "MAIL FROM:<sender@example.org>", "RCPT TO:<alice@test.ru>",
           "DATA"],
}


def session_in(state_name, **kwargs):
    fake, session = new_session(**kwargs)
    for line in SETUP[state_name]:
        assert send(session, line).code < 400, line
    assert session.state == state_name
    return fake, session


# --- the table ----------------------------------------------------------------------------

# The verbs of RFC 5321 this table covers (STARTTLS and AUTH have their own tests)
BASE_VERBS = ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN",
              "HELP")

# One valid command line per verb, and an unknown verb
COMMANDS = {
    "HELO": "HELO client.example",
    "EHLO": "EHLO client.example",
    "MAIL": "MAIL FROM:<other@example.org>",
    "RCPT": "RCPT TO:<bob@test.ru>",
    "DATA": "DATA",
    "RSET": "RSET",
    "NOOP": "NOOP",
    "QUIT": "QUIT",
    "VRFY": "VRFY alice",
    "EXPN": "EXPN staff",
    "HELP": "HELP",
    "XYZZY": "XYZZY plugh",
}

SEQ = replies.BAD_SEQUENCE
UNKNOWN = replies.UNKNOWN_COMMAND
_ = None      # stays in the state it was in

# EXPECTED[state][verb] = (reply, state after it)
EXPECTED = {
    START: {
        "HELO": (replies.HELO_OK, GREETED), "EHLO": (replies.EHLO_OK, GREETED),
        "MAIL": (SEQ, _), "RCPT": (SEQ, _), "DATA": (SEQ, _),
        "RSET": (replies.RESET_OK, START), "NOOP": (replies.OK, _),
        "QUIT": (replies.CLOSING, CLOSED), "VRFY": (replies.CANNOT_VRFY, _),
        "EXPN": (replies.NO_EXPN, _), "HELP": (replies.HELP, _), "XYZZY": (UNKNOWN, _),
    },
    GREETED: {
        "HELO": (replies.HELO_OK, GREETED), "EHLO": (replies.EHLO_OK, GREETED),
        "MAIL": (replies.SENDER_OK, MAIL), "RCPT": (SEQ, _), "DATA": (SEQ, _),
        "RSET": (replies.RESET_OK, GREETED), "NOOP": (replies.OK, _),
        "QUIT": (replies.CLOSING, CLOSED), "VRFY": (replies.CANNOT_VRFY, _),
        "EXPN": (replies.NO_EXPN, _), "HELP": (replies.HELP, _), "XYZZY": (UNKNOWN, _),
    },
    MAIL: {
        "HELO": (replies.HELO_OK, GREETED), "EHLO": (replies.EHLO_OK, GREETED),
        "MAIL": (SEQ, _), "RCPT": (replies.RECIPIENT_OK, RCPT), "DATA": (SEQ, _),
        "RSET": (replies.RESET_OK, GREETED), "NOOP": (replies.OK, _),
        "QUIT": (replies.CLOSING, CLOSED), "VRFY": (replies.CANNOT_VRFY, _),
        "EXPN": (replies.NO_EXPN, _), "HELP": (replies.HELP, _), "XYZZY": (UNKNOWN, _),
    },
    RCPT: {
        "HELO": (replies.HELO_OK, GREETED), "EHLO": (replies.EHLO_OK, GREETED),
        "MAIL": (SEQ, _), "RCPT": (replies.RECIPIENT_OK, RCPT),
        "DATA": (replies.START_DATA, DATA),
        "RSET": (replies.RESET_OK, GREETED), "NOOP": (replies.OK, _),
        "QUIT": (replies.CLOSING, CLOSED), "VRFY": (replies.CANNOT_VRFY, _),
        "EXPN": (replies.NO_EXPN, _), "HELP": (replies.HELP, _), "XYZZY": (UNKNOWN, _),
    },
    # In DATA only the end of the text is expected; every command is out of sequence
    DATA: {verb: (SEQ, _) for verb in BASE_VERBS} | {"XYZZY": (UNKNOWN, _)},
}

CELLS = [(s, verb, *EXPECTED[s][verb]) for s in EXPECTED for verb in EXPECTED[s]]


def test_expected_table_covers_every_state_and_verb():
    assert set(EXPECTED) == {START, GREETED, MAIL, RCPT, DATA}
    assert set(EXPECTED) | {CLOSED} <= set(state.TRANSITIONS)
    assert set(COMMANDS) == set(BASE_VERBS) | {"XYZZY"}
    assert set(BASE_VERBS) <= set(state.VERBS)
    assert "XYZZY" not in state.VERBS
    for state_name, row in EXPECTED.items():
        assert set(row) == set(COMMANDS), state_name


def test_table_lists_exactly_the_allowed_verbs():
    """The verbs each state accepts are the table's keys (a 503 comes from the dispatcher)."""
    for state_name, row in EXPECTED.items():
        allowed = {verb for verb, (reply, _next) in row.items()
                   if reply not in (SEQ, UNKNOWN)}
        assert set(state.TRANSITIONS[state_name]) & set(BASE_VERBS) == allowed, state_name
    assert list(state.TRANSITIONS[DATA]) == [state.END_OF_DATA]
    assert state.TRANSITIONS[CLOSED] == {}


@pytest.mark.parametrize("state_name, verb, expected, next_state", CELLS,
                         ids=[f"{s}-{v}" for s, v, *_x in CELLS])
def test_cell(state_name, verb, expected, next_state):
    _fake, session = session_in(state_name)
    reply = send(session, COMMANDS[verb])
    assert (reply.code, reply.enhanced) == (expected.code, expected.enhanced)
    assert session.state == (next_state or state_name)
    if expected in (SEQ, UNKNOWN) or reply.code in state.BAD_COMMAND_CODES:
        assert session.bad_commands == 1
    else:
        assert session.bad_commands == 0
    if expected in (SEQ, UNKNOWN):          # refused by the dispatcher: no handler ran
        assert session.transition is None
    else:
        assert session.transition == (verb, state_name, next_state or state_name)


@pytest.mark.parametrize("verb", BASE_VERBS)
def test_closed_session_accepts_nothing(verb):
    _fake, session = session_in(GREETED)
    send(session, "QUIT")
    assert session.state == CLOSED
    reply = send(session, COMMANDS[verb])
    assert (reply.code, reply.enhanced) == (503, "5.5.1")
    assert session.state == CLOSED


def test_contract_codes():
    """The constants carry the codes of the contract's reply table."""
    codes = {
        "GREETING": (220, ""), "CLOSING": (221, "2.0.0"), "OK": (250, "2.0.0"),
        "RESET_OK": (250, "2.0.0"), "HELO_NEEDS_DOMAIN": (501, "5.5.4"),
        "BAD_SEQUENCE": (503, "5.5.1"), "BAD_SENDER": (501, "5.1.7"),
        "BAD_RECIPIENT": (501, "5.1.3"), "NO_SUCH_USER": (550, "5.1.1"),
        "RELAY_DENIED": (554, "5.7.1"), "TOO_MANY_RECIPIENTS": (452, "4.5.3"),
        "MESSAGE_TOO_BIG": (552, "5.3.4"), "LINE_TOO_LONG": (500, "5.5.2"),
        "TEXT_LINE_TOO_LONG": (500, "5.5.2"), "UNKNOWN_COMMAND": (500, "5.5.2"),
        "NO_EXPN": (502, "5.5.1"), "CANNOT_VRFY": (252, "2.5.2"), "START_DATA": (354, ""),
        "QUEUED": (250, "2.0.0"), "TIMEOUT": (421, "4.4.2"), "TOO_MANY_CLIENTS": (421, "4.7.0"),
        "SHUTTING_DOWN": (421, "4.3.2"), "BAD_PARAMETER": (555, "5.5.4"),
        "LOOP_DETECTED": (554, "5.4.6"), "LOCAL_ERROR": (451, "4.3.0"),
    }
    for name, code in codes.items():
        reply = getattr(replies, name)
        assert (reply.code, reply.enhanced) == code, name
        assert reply.rfc, name


def test_greeting():
    _fake, session = new_session()
    reply = state.greeting(session)
    assert reply.lines() == [f"220 {HOSTNAME} ESMTP smtpd ready"]


def test_verbs_are_case_insensitive():
    _fake, session = new_session()
    assert send(session, "ehlo client.example").code == 250
    assert send(session, "Mail FROM:<a@example.org>").code == 250
    assert send(session, "rcpt to:<alice@test.ru>").code == 250
    assert send(session, "data").code == 354
    assert session.state == DATA


# --- HELO / EHLO ----------------------------------------------------------------------------


def test_ehlo_advertises_extensions():
    _fake, session = new_session()
    reply = send(session, "EHLO client.example")
    assert reply.code == 250
    lines = reply.lines()
    assert lines[0] == f"250-{HOSTNAME} greets client.example"
    assert lines[1:] == [f"250-SIZE {LIMIT}", "250-8BITMIME", "250-PIPELINING",
                         "250-ENHANCEDSTATUSCODES", "250-SMTPUTF8", "250-DSN", "250-CHUNKING",
                         f"250-LIMITS RCPTMAX={MAX_RECIPIENTS}", "250 HELP"]
    assert session.esmtp is True and session.helo == "client.example"


def test_helo_is_one_line_without_extensions():
    _fake, session = new_session()
    reply = send(session, "HELO client.example")
    assert reply.lines() == [f"250 {HOSTNAME} greets client.example"]
    assert session.esmtp is False


@pytest.mark.parametrize("line", ["HELO", "EHLO", "EHLO ", "HELO   ", "EHLO two words",
                                  "EHLO tab\there"])
def test_helo_ehlo_need_one_domain(line):
    _fake, session = new_session()
    reply = send(session, line)
    assert (reply.code, reply.enhanced) == (501, "5.5.4")
    assert session.state == START and session.helo is None


def test_ehlo_address_literal():
    _fake, session = new_session()
    assert send(session, "EHLO [127.0.0.1]").code == 250
    assert session.helo == "[127.0.0.1]"


@pytest.mark.parametrize("verb", ["HELO", "EHLO"])
@pytest.mark.parametrize("from_state", [MAIL, RCPT])
def test_helo_again_resets_the_transaction(verb, from_state):
    _fake, session = session_in(from_state)
    reply = send(session, f"{verb} other.example")
    assert reply.code == 250
    assert session.state == GREETED
    assert session.envelope is None
    assert session.helo == "other.example"
    assert send(session, "RCPT TO:<alice@test.ru>").code == 503


def test_failed_helo_keeps_the_transaction():
    _fake, session = session_in(RCPT)
    assert send(session, "EHLO").code == 501
    assert session.state == RCPT
    assert forward_paths(session) == ["alice@test.ru"]


# --- RSET, NOOP, VRFY, EXPN, HELP, QUIT ----------------------------------------------------


@pytest.mark.parametrize("from_state", [MAIL, RCPT])
def test_rset_clears_the_envelope_and_keeps_the_greeting(from_state):
    _fake, session = session_in(from_state)
    assert send(session, "RSET") == replies.RESET_OK
    assert session.state == GREETED
    assert reverse_path(session) is None and forward_paths(session) == []
    assert session.helo == "client.example"
    assert send(session, "MAIL FROM:<x@example.org>").code == 250


def test_noop_with_argument():
    _fake, session = new_session()
    assert send(session, "NOOP anything at all") == replies.OK


def test_vrfy_never_confirms():
    _fake, session = session_in(GREETED)
    for user in ("alice", "nobody", "<alice@test.ru>"):
        assert send(session, f"VRFY {user}") == replies.CANNOT_VRFY


def test_vrfy_without_argument():
    _fake, session = session_in(GREETED)
    reply = send(session, "VRFY")
    assert (reply.code, reply.enhanced) == (501, "5.5.4")


def test_expn():
    _fake, session = session_in(GREETED)
    assert send(session, "EXPN") == replies.NO_EXPN


def test_help_lists_the_commands():
    _fake, session = new_session()
    reply = send(session, "HELP")
    assert (reply.code, reply.enhanced) == (214, "2.0.0")
    for verb in BASE_VERBS:
        assert verb in reply.text


@pytest.mark.parametrize("verb", BASE_VERBS)
def test_help_for_a_verb_cites_its_rfc_section(verb):
    _fake, session = new_session()
    reply = send(session, f"HELP {verb.lower()}")
    assert reply.code == 214
    assert state.VERBS[verb].rfc in reply.text
    assert re.search(r"RFC 5321 \d+(\.\d+)+", reply.text)
    assert state.VERBS[verb].syntax in reply.text


def test_help_for_unknown_topic():
    _fake, session = new_session()
    reply = send(session, "HELP FROBNICATE")
    assert reply.code == 214
    assert "FROBNICATE" in reply.text


def test_quit_reply():
    _fake, session = session_in(RCPT)
    reply = send(session, "QUIT")
    assert reply.lines() == [f"221 2.0.0 {HOSTNAME} closing connection"]
    assert session.state == CLOSED


# --- MAIL -----------------------------------------------------------------------------------


def test_mail_from_records_the_sender():
    _fake, session = session_in(GREETED)
    reply = send(session, "MAIL FROM:<Sender@Example.ORG>")
    assert (reply.code, reply.enhanced) == (250, "2.1.0")
    assert reverse_path(session) == "Sender@example.org"


def test_mail_from_null_path():
    _fake, session = session_in(GREETED)
    assert send(session, "MAIL FROM:<>").code == 250
    assert reverse_path(session) == ""
    assert session.state == MAIL


def test_mail_from_with_space_after_colon_is_tolerated():
    _fake, session = session_in(GREETED)
    assert send(session, "MAIL FROM: <a@example.org>").code == 250


@pytest.mark.parametrize("line", ["MAIL", "MAIL <a@example.org>", "MAIL TO:<a@example.org>"])
def test_mail_syntax(line):
    _fake, session = session_in(GREETED)
    reply = send(session, line)
    assert (reply.code, reply.enhanced) == (501, "5.5.4")
    assert session.state == GREETED


@pytest.mark.parametrize("path", ["a@example.org", "<a@example.org", "<a>", "<a@@b>",
                                  "<a@example.org> BAD_PARAM"])
def test_bad_sender(path):
    _fake, session = session_in(GREETED)
    reply = send(session, f"MAIL FROM:{path}")
    assert (reply.code, reply.enhanced) == (501, "5.1.7")
    assert session.state == GREETED and reverse_path(session) is None


def test_size_within_limit():
    _fake, session = session_in(GREETED)
    assert send(session, f"MAIL FROM:<a@example.org> SIZE={LIMIT}").code == 250
    assert session.envelope.parameters == {"SIZE": str(LIMIT)}


def test_size_over_limit():
    _fake, session = session_in(GREETED)
    reply = send(session, f"MAIL FROM:<a@example.org> SIZE={LIMIT + 1}")
    assert (reply.code, reply.enhanced) == (552, "5.3.4")
    assert session.state == GREETED and reverse_path(session) is None


@pytest.mark.parametrize("value", ["abc", "-1", "1e3"])
def test_size_not_a_number(value):
    _fake, session = session_in(GREETED)
    reply = send(session, f"MAIL FROM:<a@example.org> SIZE={value}")
    assert (reply.code, reply.enhanced) == (555, "5.5.4")


@pytest.mark.parametrize("value", ["7BIT", "8BITMIME", "8bitmime", "7bit"])
def test_body_parameter(value):
    _fake, session = session_in(GREETED)
    assert send(session, f"MAIL FROM:<a@example.org> BODY={value} SIZE=10").code == 250
    assert session.envelope.parameters == {"BODY": value, "SIZE": "10"}


@pytest.mark.parametrize("parameters", ["BODY=BINARYMIME", "BODY", "FOO=bar", "SMTPUTF8=yes",
                                        "AUTH", "SIZE=10 MTRK=1"])
def test_unknown_mail_parameter(parameters):
    _fake, session = session_in(GREETED)
    reply = send(session, f"MAIL FROM:<a@example.org> {parameters}")
    assert (reply.code, reply.enhanced) == (555, "5.5.4")
    assert session.state == GREETED


# --- RCPT -----------------------------------------------------------------------------------


def test_rcpt_local_user_lower_cased():
    _fake, session = session_in(MAIL)
    reply = send(session, "RCPT TO:<Alice@TEST.RU>")
    assert (reply.code, reply.enhanced) == (250, "2.1.5")
    assert forward_paths(session) == ["alice@test.ru"]


def test_rcpt_in_second_local_domain():
    _fake, session = session_in(MAIL)
    assert send(session, "RCPT TO:<carol@example.test>").code == 250
    assert send(session, "RCPT TO:<carol@test.ru>").code == 550


def test_unknown_local_user():
    _fake, session = session_in(MAIL)
    reply = send(session, "RCPT TO:<nobody@test.ru>")
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    assert session.state == MAIL and forward_paths(session) == []


@pytest.mark.parametrize("path", ["<postmaster@test.ru>", "<Postmaster@Test.Ru>",
                                  "<POSTMASTER@example.test>", "<Postmaster>", "<postmaster>"])
def test_postmaster_always_accepted(path):
    _fake, session = session_in(MAIL, client_ip="192.0.2.7")
    reply = send(session, f"RCPT TO:{path}")
    assert reply.code == 250
    [address] = forward_paths(session)
    assert address.startswith("postmaster@")
    assert address.split("@")[1] in ("test.ru", "example.test")


def test_bare_postmaster_goes_to_the_first_local_domain():
    _fake, session = session_in(MAIL)
    send(session, "RCPT TO:<Postmaster>")
    assert forward_paths(session) == ["postmaster@test.ru"]


@pytest.mark.parametrize("path", ["alice@test.ru", "<alice>", "<alice@test.ru",
                                  "<>", "<a@b@test.ru>"])
def test_bad_recipient(path):
    _fake, session = session_in(MAIL)
    reply = send(session, f"RCPT TO:{path}")
    assert (reply.code, reply.enhanced) == (501, "5.1.3")


def test_rcpt_syntax():
    _fake, session = session_in(MAIL)
    reply = send(session, "RCPT FROM:<alice@test.ru>")
    assert (reply.code, reply.enhanced) == (501, "5.5.4")


def test_rcpt_parameters_not_offered():
    _fake, session = session_in(MAIL)
    reply = send(session, "RCPT TO:<alice@test.ru> FOO=1")
    assert (reply.code, reply.enhanced) == (555, "5.5.4")
    assert forward_paths(session) == []


def test_too_many_recipients():
    _fake, session = session_in(MAIL)
    for i, user in enumerate(["alice@test.ru", "bob@test.ru", "postmaster@test.ru"]):
        assert send(session, f"RCPT TO:<{user}>").code == 250, i
    reply = send(session, "RCPT TO:<carol@example.test>")
    assert (reply.code, reply.enhanced) == (452, "4.5.3")
    assert session.state == RCPT
    assert len(forward_paths(session)) == MAX_RECIPIENTS
    assert session.bad_commands == 0          # a 4xx is not a client error
    assert send(session, "DATA").code == 354


def test_same_recipient_twice_is_kept_once():
    _fake, session = session_in(MAIL)
    assert send(session, "RCPT TO:<alice@test.ru>").code == 250
    assert send(session, "RCPT TO:<ALICE@test.ru>").code == 250
    assert forward_paths(session) == ["alice@test.ru"]


@pytest.mark.parametrize("client_ip", ["192.0.2.7", "10.0.0.1", "2001:db8::1",
                                       "::ffff:192.0.2.7"])
def test_remote_recipient_from_non_relay_client(client_ip):
    _fake, session = session_in(MAIL, client_ip=client_ip)
    reply = send(session, "RCPT TO:<dave@example.org>")
    assert (reply.code, reply.enhanced) == (554, "5.7.1")
    assert forward_paths(session) == []
    # local mail from the same client is still welcome
    assert send(session, "RCPT TO:<alice@test.ru>").code == 250


@pytest.mark.parametrize("client_ip", ["127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1"])
def test_remote_recipient_from_relay_client(client_ip):
    _fake, session = session_in(MAIL, client_ip=client_ip)
    reply = send(session, "RCPT TO:<Dave@Example.ORG>")
    assert (reply.code, reply.enhanced) == (250, "2.1.5")
    assert forward_paths(session) == ["Dave@example.org"]


def test_recipient_at_address_literal_is_remote():
    _fake, session = session_in(MAIL, client_ip="192.0.2.7")
    assert send(session, "RCPT TO:<alice@[127.0.0.1]>").code == 554


# --- the dispatcher: errors, HTTP, bytes ----------------------------------------------------


def test_error_budget_then_421():
    _fake, session = new_session()
    for _i in range(MAX_ERRORS):
        assert send(session, "BOGUS").code == 500
    assert session.state == START
    reply = send(session, "NOOP")
    assert (reply.code, reply.enhanced) == (421, "4.7.0")
    assert session.state == CLOSED


def test_error_budget_counts_bad_commands_only():
    _fake, session = session_in(GREETED)
    bad = ["RCPT TO:<alice@test.ru>", "MAIL FROM:bad", "HELO", "DATA",
           "MAIL FROM:<a@b.org> FOO=1", "VRFY", "XX", "AUTH CRAM-MD5", "NOT\xff".encode("latin-1")]
    for line in bad:
        assert send(session, line).code in state.BAD_COMMAND_CODES, line
    assert session.bad_commands == len(bad) == MAX_ERRORS - 1
    # not the client's fault: an unoffered command, a message too big
    assert send(session, "EXPN x").code == 502
    assert send(session, "MAIL FROM:<a@b.org> SIZE=99999").code == 552
    assert send(session, "NOOP").code == 250       # good commands do not reset the budget
    assert session.bad_commands == MAX_ERRORS - 1
    assert send(session, "RCPT TO:<alice@test.ru>").code == 503
    reply = send(session, "NOOP")
    assert (reply.code, reply.enhanced) == (421, "4.7.0") and reply.then is Next.CLOSE
    assert session.state == CLOSED


def test_quit_is_answered_221_after_the_budget_is_spent():
    _fake, session = new_session()
    for _ in range(MAX_ERRORS):
        send(session, "BOGUS")
    reply = send(session, "QUIT")
    assert reply.code == 221 and session.state == CLOSED


def test_refused_recipients_have_a_budget_of_their_own():
    _fake, session = session_in(MAIL, max_rejected_recipients=20)
    for number in range(20):
        assert send(session, f"RCPT TO:<nobody{number}@test.ru>").code == 550
    assert session.bad_commands == 0
    reply = send(session, "RCPT TO:<alice@test.ru>")
    assert (reply.code, reply.enhanced) == (421, "4.7.0") and session.state == CLOSED


def test_eleven_refused_recipients_do_not_end_the_session():
    _fake, session = session_in(MAIL)
    for number in range(11):
        assert send(session, f"RCPT TO:<nobody{number}@test.ru>").code == 550
    assert send(session, "RCPT TO:<alice@test.ru>").code == 250
    assert send(session, "DATA").code == 354


def test_auth_parameter_of_mail_is_accepted_and_dropped():
    _fake, session = session_in(GREETED)
    assert send(session, "MAIL FROM:<a@example.org> AUTH=<> BODY=8BITMIME").code == 250
    assert session.envelope.parameters == {"BODY": "8BITMIME"}


@pytest.mark.parametrize("line", ["GET / HTTP/1.1", "POST /form HTTP/1.0", "HEAD / HTTP/1.1",
                                  "PUT /x HTTP/1.1", "CONNECT host:443 HTTP/1.1",
                                  "OPTIONS * HTTP/1.1", "get / HTTP/1.1"])
def test_http_verbs_close_the_session(line):
    _fake, session = new_session()
    reply = send(session, line)
    assert reply.code == 421
    assert session.state == CLOSED


def test_not_ascii_command():
    _fake, session = new_session()
    reply = send(session, b"EHLO caf\xe9.example")           # Latin-1, not UTF-8
    assert (reply.code, reply.enhanced) == (500, "5.5.2")
    assert session.state == START and session.bad_commands == 1


@pytest.mark.parametrize("line", [b"", b" ", b"\x00", b"MAIL\x00FROM:<a@b.org>"])
def test_garbage_is_an_unknown_command(line):
    _fake, session = new_session()
    reply = send(session, line)
    assert (reply.code, reply.enhanced) == (500, "5.5.2")
    assert "\x00" not in reply.text


def test_refuse_long_line_counts_as_an_error():
    _fake, session = new_session()
    reply = state.refuse_long_line(session)
    assert reply == replies.LINE_TOO_LONG and session.bad_commands == 1


def test_abort_transaction():
    _fake, session = session_in(RCPT)
    assert state.abort_transaction(session) == replies.LOCAL_ERROR
    assert session.state == GREETED and forward_paths(session) == []


# --- DATA: the checks at the end of the text ---------------------------------------------


def check(wire, limit=LIMIT):
    """The reply to a whole DATA for alice, and the text the writer was given."""
    fake, session = session_in(DATA, max_message_size=limit)
    reply = send_text(session, wire + b".\r\n")
    [writer] = fake.opened
    return reply, writer


def test_plain_message_passes():
    reply, writer = check(b"Subject: hi\r\n\r\nhello\r\n")
    assert reply.code == 250
    assert writer.text == b"Subject: hi\r\n\r\nhello\r\n"


def test_empty_message_passes():
    reply, writer = check(b"")
    assert reply.code == 250 and writer.text == b""


@pytest.mark.parametrize("text", [
    b"Subject: x\r\n\r\nline one\nline two\r\n",        # bare LF
    b"Subject: x\r\n\r\nline one\rline two\r\n",        # bare CR
    b"Subject: x\r\n\r\nsmuggled\n.\r\nMAIL FROM:<x@y.org>\r\n",
    b"Subject: x\r\n\r\nsmuggled\r\n.\nMAIL FROM:<x@y.org>\r\n",
    b"Subject: x\r\n\r\n\n\r\n",
    b"Subject: x\r\n\r\n\r\r\n",
])
def test_bare_line_endings_refused(text):
    reply, writer = check(text)
    assert reply == replies.BARE_LINE_ENDING and reply.code == 554
    assert writer.discarded


def test_text_line_of_1000_octets_with_crlf_is_accepted():
    reply, _ = check(b"Subject: x\r\n\r\n" + b"a" * 998 + b"\r\n", limit=10000)
    assert reply.code == 250


def test_text_line_over_1000_octets_is_refused():
    reply, writer = check(b"Subject: x\r\n\r\n" + b"a" * 999 + b"\r\n", limit=10000)
    assert reply == replies.TEXT_LINE_TOO_LONG and (reply.code, reply.enhanced) == (500, "5.5.2")
    assert writer.discarded


def test_dot_unstuffing():
    reply, writer = check(b"..leading dot\r\nmiddle . dot\r\n..\r\n...two\r\n.x\r\n")
    assert reply.code == 250
    assert writer.text == b".leading dot\r\nmiddle . dot\r\n.\r\n..two\r\nx\r\n"


def _received(n):
    return b"".join(b"Received: from h%d by h%d; Sat, 21 Nov 2026 10:00:00 +0300\r\n" % (i, i)
                    for i in range(n))


def test_fifty_received_headers_pass():
    assert check(_received(50) + b"Subject: x\r\n\r\nbody\r\n", limit=100000)[0].code == 250


def test_more_than_fifty_received_headers_is_a_loop():
    reply, writer = check(_received(51) + b"Subject: x\r\n\r\nbody\r\n", limit=100000)
    assert (reply.code, reply.enhanced) == (554, "5.4.6") and writer.discarded


def test_received_headers_are_counted_case_insensitively():
    text = _received(51).replace(b"Received:", b"RECEIVED:") + b"\r\nbody\r\n"
    assert check(text, limit=100000)[0] == replies.LOOP_DETECTED


def test_received_lines_in_the_body_do_not_count():
    assert check(b"Subject: x\r\n\r\n" + _received(60), limit=100000)[0].code == 250


def test_size_limit_is_on_the_unstuffed_message():
    exact = (b"a" * 98 + b"\r\n") * (LIMIT // 100)
    assert len(exact) == LIMIT
    assert check(exact)[0].code == 250
    reply, writer = check(exact + b"\r\n")
    assert (reply.code, reply.enhanced) == (552, "5.3.4") and writer.discarded
    # 300 lines "..": 1200 octets on the wire, 900 once unstuffed
    stuffed = b"..\r\n" * 300
    assert len(stuffed) > LIMIT
    assert check(stuffed)[0].code == 250


# --- DATA: the end of the message -----------------------------------------------------------


def test_data_opens_the_message_with_its_received_line():
    fake, session = session_in(RCPT)
    send(session, "RCPT TO:<dave@example.org>")
    reply = send(session, "DATA")
    assert reply == replies.START_DATA and reply.then is Next.TEXT
    assert session.state == DATA
    [writer] = fake.opened
    envelope = writer.envelope
    assert len(envelope.queue_id) == 16
    assert [r.key for r in envelope.local_recipients] == ["alice@test.ru"]
    assert [r.key for r in envelope.remote_recipients] == ["dave@example.org"]
    assert envelope.reverse_path == Address("sender", "example.org")
    assert envelope.helo == "client.example"
    assert envelope.client == Client("127.0.0.1", 51234)
    assert writer.prefix.startswith(b"Received: from client.example ([127.0.0.1])\r\n")
    assert envelope.queue_id.encode() in writer.prefix


def test_message_is_submitted_at_the_final_dot():
    fake, session = session_in(RCPT)
    send(session, "DATA")
    reply = send_text(session, b"Subject: hi\r\n\r\n..dot\r\n.\r\n")
    assert (reply.code, reply.enhanced) == (250, "2.0.0")
    [writer] = fake.delivered
    assert writer.envelope.queue_id in reply.text
    assert writer.text == b"Subject: hi\r\n\r\n.dot\r\n"
    assert session.state == GREETED
    assert session.transition == (state.END_OF_DATA, DATA, GREETED)
    assert session.envelope is None and session.text is None
    assert send(session, "MAIL FROM:<>").code == 250      # a new transaction can start


@pytest.mark.parametrize("wire, expected", [
    (b"a\nb\r\n.\r\n", replies.BARE_LINE_ENDING),
    (b"x" * 200 + b"\r\n.\r\n", replies.MESSAGE_TOO_BIG),
    (_received(51) + b"\r\n.\r\n", replies.LOOP_DETECTED),
    (b"x" * 1200 + b"\r\n.\r\n", replies.TEXT_LINE_TOO_LONG),
])
def test_refused_message_is_not_submitted(wire, expected):
    limit = 100 if expected == replies.MESSAGE_TOO_BIG else 100000
    fake, session = session_in(DATA, max_message_size=limit)
    reply = send_text(session, wire)
    assert (reply.code, reply.enhanced) == (expected.code, expected.enhanced)
    assert fake.delivered == [] and fake.opened[0].discarded
    assert session.state == GREETED and session.envelope is None


def test_a_storage_failure_at_data_or_at_the_dot():
    from storage import StorageError

    def full(envelope, prefix):
        raise StorageError("no space", full=True)

    _fake, session = session_in(RCPT, open_message=full)
    reply = send(session, "DATA")
    assert (reply.code, reply.enhanced) == (452, "4.3.1")
    assert session.state == RCPT                        # the client may try DATA again

    def broken(writer, headers):
        raise StorageError("disk gone")

    _fake, session = session_in(DATA, submit=broken)
    reply = send_text(session, b"hi\r\n.\r\n")
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert session.state == GREETED


def test_rset_or_the_end_of_the_session_discards_the_text():
    fake, session = session_in(DATA)
    state.end_session(session)
    assert fake.opened[0].discarded and session.state == CLOSED


def test_data_with_argument():
    _fake, session = session_in(RCPT)
    reply = send(session, "DATA now")
    assert (reply.code, reply.enhanced) == (501, "5.5.4")
    assert session.state == RCPT


def test_data_after_refused_recipients_only():
    _fake, session = session_in(MAIL)
    send(session, "RCPT TO:<nobody@test.ru>")
    assert send(session, "DATA").code == 503


# --- the Received: line ---------------------------------------------------------------------

NOW = datetime.datetime(2026, 11, 21, 10, 0, 0,
                        tzinfo=datetime.timezone(datetime.timedelta(hours=3)))
ALICE, BOB = Address("alice", "test.ru"), Address("bob", "test.ru")


def received(session, queue_id, recipients, now=NOW):
    return received_header(session.helo, session.client_literal, HOSTNAME,
                           transaction.received_protocol(session), queue_id, recipients, now)


def test_received_header_one_recipient():
    _fake, session = session_in(RCPT)
    assert received(session, "0123abcd", [ALICE]) == (
        b"Received: from client.example ([127.0.0.1])\r\n"
        b"\tby mail.test.ru (smtpd) with ESMTP id 0123abcd\r\n"
        b"\tfor <alice@test.ru>;\r\n"
        b"\tSat, 21 Nov 2026 10:00:00 +0300\r\n")


def test_received_header_several_recipients_has_no_for():
    _fake, session = session_in(RCPT)
    line = received(session, "id1", [ALICE, BOB])
    assert b"for " not in line
    assert b"with ESMTP id id1;\r\n\tSat, 21 Nov 2026 10:00:00 +0300\r\n" in line


def test_received_header_after_helo_says_smtp():
    _fake, session = new_session()
    send(session, "HELO old.example")
    line = received(session, "id1", [ALICE])
    assert line.startswith(b"Received: from old.example ([127.0.0.1])\r\n")
    assert b" with SMTP id id1" in line


@pytest.mark.parametrize("ip, literal", [("::1", b"[IPv6:::1]"),
                                         ("::ffff:127.0.0.1", b"[127.0.0.1]"),
                                         ("2001:DB8::5", b"[IPv6:2001:db8::5]")])
def test_received_header_client_literal(ip, literal):
    _fake, session = session_in(GREETED, client_ip=ip)
    line = received(session, "id1", [])
    assert line.startswith(b"Received: from client.example (" + literal + b")\r\n")


def test_received_header_date_has_a_numeric_offset():
    _fake, session = session_in(RCPT)
    line = received(session, "id1", [ALICE], now=None).decode()
    assert line.endswith("\r\n")
    date = line.rstrip("\r\n").rpartition(";\r\n\t")[2]
    assert re.fullmatch(r"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}", date)
    assert not date.endswith("-0000")
    # every continuation line is folded with white space (RFC 5322 2.2.3)
    for continuation in line.split("\r\n")[1:-1]:
        assert continuation.startswith("\t")
