"""sasl.py: AUTH PLAIN and LOGIN (RFC 4954, RFC 4616) through the table, no network."""
import base64

import pytest

import replies
import state
from replies import Next
from state import AUTH, CLOSED, GREETED
from tests.test_state import new_session, send

PASSWORD = "correct horse"


def authenticating(**overrides):
    overrides.setdefault("check_password", lambda login, password:
                         login == "alice@test.ru" and password == PASSWORD)
    overrides.setdefault("auth_failure_delay", 0.5)
    fake, session = new_session(**overrides)
    assert send(session, "EHLO client.example").code == 250
    return session


def plain(login="alice@test.ru", password=PASSWORD):
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def test_auth_is_offered_on_loopback_and_not_elsewhere():
    assert "AUTH PLAIN LOGIN" in send(authenticating(), "EHLO again.example").text
    remote = authenticating(client_ip="192.0.2.7")
    assert "AUTH" not in send(remote, "EHLO again.example").text
    assert send(remote, f"AUTH PLAIN {plain()}") == replies.AUTH_NOT_AVAILABLE


def test_plain_with_an_initial_response():
    session = authenticating()
    assert send(session, f"AUTH PLAIN {plain()}") == replies.AUTH_OK
    assert session.authenticated == "alice@test.ru" and session.state == GREETED
    assert send(session, f"AUTH PLAIN {plain()}") == replies.ALREADY_AUTHENTICATED


def test_plain_in_two_steps_and_the_reply_says_read_a_sasl_line():
    session = authenticating()
    challenge = send(session, "AUTH PLAIN")
    assert challenge.code == 334 and challenge.then is Next.SASL
    assert session.state == AUTH
    assert state.receive_auth_response(session, plain().encode()) == replies.AUTH_OK


def test_login_mechanism():
    session = authenticating()
    assert send(session, "AUTH LOGIN").lines() == ["334 VXNlcm5hbWU6"]
    step = state.receive_auth_response(session, base64.b64encode(b"alice@test.ru"))
    assert step.lines() == ["334 UGFzc3dvcmQ6"]
    assert state.receive_auth_response(session, base64.b64encode(PASSWORD.encode())) == \
        replies.AUTH_OK


def test_a_failure_is_delayed_by_the_reply_and_the_last_one_closes():
    session = authenticating(max_auth_failures=2)
    first = send(session, f"AUTH PLAIN {plain(password='wrong')}")
    assert (first.code, first.enhanced, first.delay) == (535, "5.7.8", 0.5)
    assert session.bad_commands == 0
    last = send(session, f"AUTH PLAIN {plain(password='wrong')}")
    assert last.code == 421 and last.then is Next.CLOSE and last.delay == 0.5
    assert session.state == CLOSED


def test_equals_is_a_zero_length_initial_response():
    session = authenticating()
    reply = send(session, "AUTH PLAIN =")
    assert (reply.code, reply.enhanced) == (535, "5.7.8")     # empty: not valid PLAIN


@pytest.mark.parametrize("response", ["AGFsaWNl===", "YWJj=", "not base64!", "YQ==YQ=="])
def test_bad_base64_is_501_5_5_2(response):
    session = authenticating()
    reply = send(session, f"AUTH PLAIN {response}")
    assert (reply.code, reply.enhanced) == (501, "5.5.2")
    assert session.state == GREETED and session.sasl is None


def test_the_client_may_cancel():
    session = authenticating()
    send(session, "AUTH LOGIN")
    assert state.receive_auth_response(session, b"*") == replies.AUTH_CANCELLED
    assert session.state == GREETED


def test_an_unknown_mechanism_is_quoted_as_sent():
    reply = send(authenticating(), "AUTH CRAM-MD5")
    assert (reply.code, reply.enhanced) == (504, "5.5.4")
    assert reply.text.endswith("CRAM-MD5")


def test_a_sasl_line_over_the_limit_ends_the_exchange():
    session = authenticating()
    send(session, "AUTH PLAIN")
    reply = state.refuse_long_line(session)
    assert (reply.code, reply.enhanced) == (500, "5.5.6")
    assert session.state == GREETED and session.sasl is None
    assert send(session, "NOOP").code == 250            # a command again, not a password
    assert state.LINE_LIMITS[Next.SASL] == 12288       # RFC 4954 4


def test_starttls_reply_says_start_tls():
    _fake, session = new_session(tls_available=True)
    send(session, "EHLO client.example")
    reply = send(session, "STARTTLS")
    assert reply.code == 220 and reply.then is Next.TLS
    state.restart_after_tls(session)
    assert session.state == state.START and session.tls
    assert "STARTTLS" not in send(session, "EHLO client.example").text
