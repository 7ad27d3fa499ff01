"""Issue 4: the attacks a server on port 25 meets, each tried over the wire."""
import base64
import os
import random
import select
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest

import passwords
import replies
import state
from tests.conftest import (config_sections, maildir_messages, make_config, stored_files,
                            write_config_file)
from tests.test_state import new_session
from tests.wire import Client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = "correct horse"


def users_with_password(tmp_path):
    (tmp_path / "users").write_text(f"alice@test.ru:{passwords.hash_password(PASSWORD)}\nbob\n")


@pytest.fixture
def tls_server(tmp_path, start_server, certificate):
    users_with_password(tmp_path)
    cert, key = certificate
    return start_server(make_config(tmp_path, **{"tls.cert": cert, "tls.key": key}))


@pytest.fixture
def auth_server(tmp_path, start_server):
    """AUTH on loopback without TLS; only 192.0.2.0/24 may relay without it."""
    users_with_password(tmp_path)
    return start_server(make_config(tmp_path, **{"relay.networks": "192.0.2.0/24"}))


def client_context():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --- STARTTLS (RFC 3207) ---------------------------------------------------------------

def test_starttls_is_advertised_and_the_session_starts_over(tls_server, tmp_path):
    with smtplib.SMTP(*tls_server.address, timeout=10) as client:
        client.ehlo("client.example")
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=client_context())
        assert code == 220
        assert client.sock.version().startswith("TLS")
        client.ehlo("client.example")
        assert not client.has_extn("starttls")
        assert client.has_extn("auth")
        client.sendmail("bob@test.ru", ["alice@test.ru"], b"Subject: secret\r\n\r\nbody\r\n")
    assert len(maildir_messages(tmp_path / "mail", "alice@test.ru")) == 1
    assert "TLS established" in (tmp_path / "logs" / "smtpd.log").read_text()


def test_no_starttls_without_a_certificate(smtp):
    assert not smtp.has_extn("starttls")
    assert smtp.docmd("STARTTLS") == (454, b"4.7.0 TLS not available")


def test_mail_before_ehlo_again_after_tls_is_refused(tls_server):
    with Client(tls_server.address) as client:
        client.command("EHLO client.example")
        assert client.code("STARTTLS") == 220
        client.sock = client_context().wrap_socket(client.sock)
        assert client.command("MAIL FROM:<bob@test.ru>")[1][0].startswith("503 5.5.1")


def test_commands_pipelined_after_starttls_are_discarded(tls_server, tmp_path):
    """CVE-2011-0411: what was sent in clear text after STARTTLS must never be executed."""
    with Client(tls_server.address) as client:
        client.command("EHLO client.example")
        client.send("STARTTLS\r\nRSET\r\nMAIL FROM:<evil@attacker.test>\r\n")
        assert client.reply()[0] == 220
        assert client.buffer == b""
        client.sock = client_context().wrap_socket(client.sock)
        # the first reply under TLS answers our EHLO, not the injected RSET
        code, lines = client.command("EHLO client.example")
        assert code == 250 and "greets client.example" in lines[0]
        assert client.command("RCPT TO:<alice@test.ru>")[0] == 503     # no injected MAIL
    log = (tmp_path / "logs" / "smtpd.log").read_text()
    assert "discarded" in log and "evil@attacker.test" not in log


# --- AUTH (RFC 4954) -------------------------------------------------------------------

def test_auth_plain_and_login_succeed(auth_server):
    for mechanism in ("PLAIN", "LOGIN"):
        with smtplib.SMTP(*auth_server.address, timeout=10) as client:
            client.ehlo("client.example")
            assert mechanism in client.esmtp_features["auth"].split()
            client.user, client.password = "alice@test.ru", PASSWORD
            code, text = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"),
                                     initial_response_ok=mechanism == "PLAIN")
            assert (code, text[:5]) == (235, b"2.7.0")


def test_auth_failure_then_too_many_failures_end_the_session(auth_server, tmp_path):
    bad = base64.b64encode(b"\0alice@test.ru\0wrong").decode()
    with Client(auth_server.address) as client:
        client.command("EHLO client.example")
        assert client.command(f"AUTH PLAIN {bad}")[1][0].startswith("535 5.7.8")
        # LOGIN, step by step
        assert client.command("AUTH LOGIN") == (334, ["334 VXNlcm5hbWU6"])
        assert client.code(base64.b64encode(b"alice@test.ru").decode()) == 334
        assert client.command(base64.b64encode(b"guess").decode())[1][0].startswith("535 5.7.8")
        assert client.command(f"AUTH PLAIN {bad}")[1][0].startswith("421 4.7.0")
        assert client.closed()
    log = (tmp_path / "logs" / "smtpd.log").read_text()
    assert bad not in log and "wrong" not in log and "guess" not in log
    assert base64.b64encode(b"guess").decode() not in log
    assert "AUTH PLAIN (credentials not logged)" in log


def test_auth_cancelled_and_unknown_user(auth_server):
    with Client(auth_server.address) as client:
        client.command("EHLO client.example")
        client.command("AUTH LOGIN")
        assert client.command("*")[1][0].startswith("501 5.7.0")
        unknown = base64.b64encode(f"\0mallory@test.ru\0{PASSWORD}".encode()).decode()
        assert client.command(f"AUTH PLAIN {unknown}")[0] == 535
        assert client.code("AUTH CRAM-MD5") == 504


def test_auth_not_offered_to_a_remote_client_without_tls():
    _fake, session = new_session(client_ip="203.0.113.9",
                                 check_password=lambda login, password: True)
    state.dispatch(session, b"EHLO client.example")
    assert "AUTH PLAIN LOGIN" not in state.extensions(session)
    assert state.dispatch(session, b"AUTH PLAIN AGFsaWNlAHg=") == replies.AUTH_NOT_AVAILABLE
    session.tls = True
    assert "AUTH PLAIN LOGIN" in state.extensions(session)


# --- relay control ---------------------------------------------------------------------

RELAY_TRICKS = [
    ("bob@remote.test", 554),
    ("BOB@REMOTE.TEST", 554),
    ("@test.ru:bob@remote.test", 554),            # a source route: ignored, still remote
    ("bob%remote.test@test.ru", 550),             # the % hack: an unknown local name
    ('"bob@remote.test"@test.ru', 550),           # a quoted @: an unknown local name
    ("bob@remote.test.", 501),                    # a trailing dot is not a domain
    ("bob@[127.0.0.9]", 554),                     # an address literal, not ours
]


@pytest.mark.parametrize("recipient, code", RELAY_TRICKS)
def test_relay_tricks_are_refused_without_auth(auth_server, tmp_path, recipient, code):
    with Client(auth_server.address) as client:
        client.command("EHLO client.example")
        assert client.code("MAIL FROM:<bob@test.ru>") == 250
        reply = client.command(f"RCPT TO:<{recipient}>")[1][0]
        assert reply.startswith(f"{code} 5.")
        if code == 554:
            assert reply.startswith("554 5.7.1")


def test_relay_allowed_after_auth(auth_server, tmp_path):
    with smtplib.SMTP(*auth_server.address, timeout=10) as client:
        client.ehlo("client.example")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("alice@test.ru", ["bob@remote.test"], b"Subject: x\r\n\r\nx\r\n")
        client.login("alice@test.ru", PASSWORD)
        client.sendmail("alice@test.ru", ["bob@remote.test"], b"Subject: x\r\n\r\nx\r\n")
    spooled = [name for name in os.listdir(tmp_path / "spool") if name.endswith(".smtp")]
    assert len(spooled) == 1


# --- hostile clients -------------------------------------------------------------------

def test_connections_per_ip_are_capped(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **{"server.max_clients_per_ip": "2"}))
    first, second = Client(server.address), Client(server.address)
    try:
        with Client(server.address) as third:
            assert third.greeting[1][0].startswith("421 4.7.0")
            assert third.closed()
        assert first.greeting[0] == 220 and second.greeting[0] == 220
    finally:
        first.close()
        second.close()


def test_a_client_dribbling_bytes_is_dropped(tmp_path, start_server):
    """The idle timeout covers a partial line: one byte every 0.3 s never completes one."""
    server = start_server(make_config(tmp_path, **{"server.timeout": "1"}))
    with Client(server.address) as client:
        started = time.monotonic()
        for byte in b"NOOP" * 5:                # a line that would take 6 s to arrive
            if select.select([client.sock], [], [], 0.3)[0]:
                break                           # the server has spoken
            client.send(bytes([byte]))
        assert client.reply()[1][0].startswith("421 4.4.2")
        assert time.monotonic() - started < 3
        assert client.closed()


def test_a_line_without_crlf_is_cut_off_and_the_session_goes_on(client):
    client.command("EHLO client.example")
    client.send(b"X" * 1_000_000 + b"\r\nNOOP\r\n")
    assert client.reply()[1][0].startswith("500 5.5.2")
    assert client.reply()[1][0].startswith("250 2.0.0")     # the NOOP after it


@pytest.mark.parametrize("request_line", ["GET / HTTP/1.1", "POST /form HTTP/1.0",
                                          "CONNECT mail.test.ru:25 HTTP/1.1"])
def test_http_verbs_close_the_connection(client, request_line):
    code, lines = client.command(request_line)
    assert code == 421
    assert client.closed()


def test_garbage_spends_the_error_budget(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **{"server.max_errors": "3"}))
    with Client(server.address) as client:
        codes = [client.code(f"XYZZY{n}") for n in range(4)]
        assert codes == [500, 500, 500, 421]
        assert client.closed()


# --- fuzzing ---------------------------------------------------------------------------

FUZZ_WORDS = ["HELO", "EHLO", "MAIL FROM:", "RCPT TO:", "DATA", "RSET", "NOOP", "QUIT", "VRFY",
              "EXPN", "HELP", "AUTH", "STARTTLS", "<", ">", "<>", "@", ":", "\"", "\\", ".",
              "alice@test.ru", "bob@remote.test", "SIZE=", "BODY=8BITMIME", " ", "\t", "\0",
              "\xff", "[127.0.0.1]", "postmaster", "%", "*", "=" * 10]


def random_line(rng):
    text = "".join(rng.choice(FUZZ_WORDS) for _ in range(rng.randint(0, 6)))
    return text.encode("latin-1")[:600]


def test_fuzz_the_command_parser_without_a_network():
    """Thousands of seeded random lines through dispatch: one well-formed reply each."""
    rng = random.Random(5321)
    for _ in range(300):
        _fake, session = new_session(check_password=lambda login, password: False)
        for _ in range(20):
            line = random_line(rng)
            if session.state == state.AUTH:
                reply = state.receive_auth_response(session, line)
            elif session.state == state.DATA:
                assert session.text.feed(line + b"\r\n.\r\n") == b""
                reply = state.receive_text(session)
            else:
                reply = state.dispatch(session, line)
            assert 200 <= reply.code < 600 and reply.wire().endswith(b"\r\n")
            assert session.state in state.TRANSITIONS
            if session.state == state.CLOSED:
                break


def test_fuzz_over_the_wire_then_a_normal_message(server, tmp_path):
    rng = random.Random(2920)
    for _ in range(10):
        with Client(server.address) as client:
            junk = b"\r\n".join(random_line(rng) for _ in range(200))
            # random DATA framing: stray dots, bare LF/CR, partial terminators
            framing = b"".join(rng.choice([b".", b"\r", b"\n", b"\r\n", b"..", b"x", b"\r\n.\n"])
                               for _ in range(300))
            client.send(b"EHLO fuzz\r\nMAIL FROM:<bob@test.ru>\r\nRCPT TO:<alice@test.ru>\r\n"
                        b"DATA\r\n" + framing + b"\r\n" + junk + b"\r\n")
            client.sock.shutdown(socket.SHUT_WR)
            for _ in range(10_000):             # read every reply until the server closes
                if not client.sock.recv(65536):
                    break
    assert maildir_messages(tmp_path / "mail", "alice@test.ru") == []
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.sendmail("bob@test.ru", ["alice@test.ru"], b"Subject: after\r\n\r\nstill here\r\n")
    stored = maildir_messages(tmp_path / "mail", "alice@test.ru")
    assert len(stored) == 1 and stored[0].endswith(b"still here\n")
    partial = [path for path in stored_files(tmp_path / "mail")
               if os.path.basename(os.path.dirname(path)) == "tmp"]
    assert partial == []


# --- --add-user and privileges ---------------------------------------------------------

def test_add_user_stores_a_scrypt_hash_that_auth_accepts(tmp_path, start_server):
    sections = config_sections(tmp_path)
    config_file = write_config_file(tmp_path / "smtpd.conf", sections)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "smtpd.py"), "--config",
                             config_file, "--add-user", "carol@test.ru"],
                            input="s3cret pass\n", capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    line = [l for l in (tmp_path / "users").read_text().splitlines() if l.startswith("carol")]
    assert line and line[0].startswith("carol@test.ru:scrypt$") and "s3cret" not in line[0]
    server = start_server(make_config(tmp_path))
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.example")
        assert client.login("carol@test.ru", "s3cret pass")[0] == 235


def test_add_user_rejects_a_domain_that_is_not_local(tmp_path):
    config_file = write_config_file(tmp_path / "smtpd.conf", config_sections(tmp_path))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "smtpd.py"), "--config",
                             config_file, "--add-user", "carol@elsewhere.test"],
                            input="x\n", capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "local domain" in result.stderr


# --- the submission port (RFC 6409) ----------------------------------------------------

def test_submission_port_requires_auth_before_mail(tmp_path, start_server):
    from tests.fake_mx import free_port
    users_with_password(tmp_path)
    port = free_port(["127.0.0.1"])
    server = start_server(make_config(tmp_path, **{"tls.submission_port": port}))
    with Client(("127.0.0.1", port)) as client:
        client.command("EHLO client.example")
        assert client.command("MAIL FROM:<alice@test.ru>")[1][0].startswith("530 5.7.0")
        plain = base64.b64encode(f"\0alice@test.ru\0{PASSWORD}".encode()).decode()
        assert client.code(f"AUTH PLAIN {plain}") == 235
        client.send_message("alice@test.ru", ["bob@test.ru", "carol@remote.test"],
                            b"Subject: submitted\r\n\r\nhi\r\n.\r\n", helo="client.example")
    assert len(maildir_messages(tmp_path / "mail", "bob@test.ru")) == 1
    assert [n for n in os.listdir(tmp_path / "spool") if n.endswith(".smtp")]
    with Client(server.address) as client:              # port 25 still takes mail without AUTH
        client.command("EHLO client.example")
        assert client.code("MAIL FROM:<alice@test.ru>") == 250


def test_shutdown_sends_421_inside_tls(tmp_path, start_server, certificate):
    cert, key = certificate
    server = start_server(make_config(tmp_path, **{"tls.cert": cert, "tls.key": key}))
    with Client(server.address) as client:
        client.command("EHLO client.example")
        assert client.code("STARTTLS") == 220
        client.sock = client_context().wrap_socket(client.sock)
        assert client.code("EHLO client.example") == 250
        server.stop(grace=2)
        assert client.reply()[1][0].startswith("421 4.3.2")
