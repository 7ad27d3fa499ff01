"""The extensions of issue 13 over the wire, receiving side: SMTPUTF8 (RFC 6531), DSN
parameters (RFC 3461), CHUNKING (RFC 3030), implicit TLS (RFC 8314) and LIMITS (RFC 9422)."""
import base64
import os
import socket
import ssl

import pytest

import passwords
from tests.conftest import maildir_messages, make_config, stored_files
from tests.fake_mx import free_port
from tests.test_wire import assert_reply, expect, split_stored
from tests.wire import Client

LOOPBACK_RELAY = {"relay.routes": "remote.test=127.0.0.1:9"}   # spooled mail stays queued


def users(tmp_path, *names):
    (tmp_path / "users").write_text("".join(f"{name}\n" for name in names))


def spool_texts(config):
    return [open(path, "rb").read() for path in stored_files(config.spool)
            if path.endswith(".smtp") and os.path.dirname(path) == config.spool]


@pytest.fixture
def utf8_server(tmp_path, start_server):
    users(tmp_path, "alice", "zoë", "jürgen@bücher.test")
    return start_server(make_config(tmp_path, **{"domains.local": "test.ru, bücher.test"},
                                    **LOOPBACK_RELAY))


def ehlo_keywords(client):
    _, lines = client.command("EHLO client.example")
    return [line[4:] for line in lines[1:]]


def test_ehlo_lists_the_extensions(server, client):
    keywords = ehlo_keywords(client)
    for keyword in ("SMTPUTF8", "DSN", "CHUNKING", "LIMITS RCPTMAX=100", "8BITMIME"):
        assert keyword in keywords, keywords


# --- SMTPUTF8 ----------------------------------------------------------------------------


def test_a_non_ascii_address_without_smtputf8_is_553_5_6_7(utf8_server):
    with Client(utf8_server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, "MAIL FROM:<jöhn@example.org>", "553 5.6.7")
        expect(client, "MAIL FROM:<john@example.org>", "250")
        expect(client, "RCPT TO:<zoë@test.ru>", "553 5.6.7")
        client.send(b"RCPT TO:<z\xe9@test.ru>\r\n")             # Latin-1: not UTF-8 at all
        assert_reply(client.reply(), "500 5.5.2")


def test_utf8_sender_user_and_headers_with_smtputf8(utf8_server):
    config = utf8_server.config
    with Client(utf8_server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, "MAIL FROM:<jöhn@example.org> SMTPUTF8", "250 2.1.0")
        expect(client, "RCPT TO:<ZOË@test.ru>", "250 2.1.5 Recipient <zoë@test.ru>")
        expect(client, "RCPT TO:<zoe\u0308@test.ru>", "250")          # NFC: the same user
        expect(client, "DATA", "354")
        client.send("Subject: Grüße\r\nFrom: Jöhn <jöhn@example.org>\r\n\r\nHallo\r\n.\r\n"
                    .encode())
        assert_reply(client.reply(), "250 2.0.0")
    [stored] = maildir_messages(config.maildir, "zoë@test.ru")
    reverse_path, received, text = split_stored(stored)
    assert reverse_path == "jöhn@example.org".encode()
    assert b" with UTF8SMTP id " in received                        # RFC 6531 4.3
    assert text == "Subject: Grüße\r\nFrom: Jöhn <jöhn@example.org>\r\n\r\nHallo\r\n".encode()


def test_u_labels_and_a_labels_are_one_local_domain(utf8_server):
    config = utf8_server.config
    with Client(utf8_server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, "MAIL FROM:<a@example.org> SMTPUTF8", "250")
        expect(client, "RCPT TO:<jürgen@BÜCHER.test>", "250")
        expect(client, "RSET", "250")
        expect(client, "MAIL FROM:<a@example.org>", "250")
        expect(client, "RCPT TO:<alice@xn--bcher-kva.test>", "250")  # alice: every domain
        expect(client, "RCPT TO:<nobody@xn--bcher-kva.test>", "550 5.1.1")
        expect(client, "DATA", "354")
        client.send(b"Subject: idn\r\n\r\nx\r\n.\r\n")
        assert_reply(client.reply(), "250")
    assert len(maildir_messages(config.maildir, "alice@xn--bcher-kva.test")) == 1


def test_received_says_utf8smtpsa_after_tls_and_auth(tmp_path, start_server, certificate):
    cert, key = certificate
    (tmp_path / "users").write_text(f"alice@test.ru:{passwords.hash_password('pw')}\nzoë\n")
    server = start_server(make_config(tmp_path, **{"tls.cert": cert, "tls.key": key}))
    with Client(server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, "STARTTLS", "220")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        client.sock = context.wrap_socket(client.sock)
        expect(client, "EHLO client.example", "250")
        login = base64.b64encode(b"\0alice@test.ru\0pw").decode()
        expect(client, f"AUTH PLAIN {login}", "235")
        expect(client, "MAIL FROM:<alice@test.ru> SMTPUTF8", "250")
        expect(client, "RCPT TO:<zoë@test.ru>", "250")
        expect(client, "DATA", "354")
        client.send(b"Subject: s\r\n\r\nx\r\n.\r\n")
        assert_reply(client.reply(), "250")
    [stored] = maildir_messages(server.config.maildir, "zoë@test.ru")
    assert b" with UTF8SMTPSA id " in split_stored(stored)[1]


def test_an_smtputf8_transaction_is_spooled_as_utf8_commands(utf8_server):
    with Client(utf8_server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, "MAIL FROM:<jöhn@example.org> SMTPUTF8", "250")
        expect(client, "RCPT TO:<zoë@remote.test>", "250")
        expect(client, "DATA", "354")
        client.send(b"Subject: s\r\n\r\nx\r\n.\r\n")
        assert_reply(client.reply(), "250")
    [spooled] = spool_texts(utf8_server.config)
    assert spooled.startswith("EHLO client.example\r\nMAIL FROM:<jöhn@example.org> SMTPUTF8\r\n"
                              "RCPT TO:<zoë@remote.test>\r\nDATA\r\n".encode())


# --- DSN parameters ----------------------------------------------------------------------


@pytest.mark.parametrize("line, expected", [
    ("MAIL FROM:<a@example.org> RET=HDRS ENVID=QQ314159", "250"),
    ("MAIL FROM:<a@example.org> RET=full ENVID=a+2Bb", "250"),
    ("MAIL FROM:<a@example.org> RET=BODY", "501 5.5.4"),
    ("MAIL FROM:<a@example.org> ENVID=" + "x" * 101, "501 5.5.4"),
    ("MAIL FROM:<a@example.org> ENVID=a+zz", "501 5.5.4"),           # not xtext
    ("MAIL FROM:<a@example.org> ENVID", "501 5.5.4"),
])
def test_mail_dsn_parameters(client, line, expected):
    expect(client, "EHLO client.example", "250")
    expect(client, line, expected)


@pytest.mark.parametrize("parameters, expected", [
    ("NOTIFY=SUCCESS,FAILURE,DELAY", "250"),
    ("NOTIFY=never", "250"),
    ("NOTIFY=SUCCESS ORCPT=rfc822;alice+40test.ru", "250"),
    ("NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
    ("NOTIFY=SUCCESS,SUCCESS", "501 5.5.4"),
    ("NOTIFY=SOMETIMES", "501 5.5.4"),
    ("NOTIFY", "501 5.5.4"),
    ("ORCPT=alice@test.ru", "501 5.5.4"),                          # no addr-type
    ("ORCPT=rfc822;", "501 5.5.4"),
    ("XYZ=1", "555 5.5.4"),
])
def test_rcpt_dsn_parameters(client, parameters, expected):
    expect(client, "EHLO client.example", "250")
    expect(client, "MAIL FROM:<a@example.org>", "250")
    expect(client, f"RCPT TO:<alice@test.ru> {parameters}", expected)


def test_dsn_parameters_are_recorded_in_the_spool_for_the_relay(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **LOOPBACK_RELAY))
    with Client(server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, "MAIL FROM:<alice@test.ru> RET=HDRS ENVID=QQ314159 SIZE=100", "250")
        expect(client, "RCPT TO:<bob@remote.test> NOTIFY=SUCCESS,FAILURE "
                       "ORCPT=rfc822;Bob+40remote.test", "250")
        expect(client, "RCPT TO:<carol@remote.test>", "250")
        expect(client, "DATA", "354")
        client.send(b"Subject: dsn\r\n\r\nx\r\n.\r\n")
        assert_reply(client.reply(), "250")
    [spooled] = spool_texts(server.config)
    assert spooled.startswith(
        b"EHLO client.example\r\nMAIL FROM:<alice@test.ru> RET=HDRS ENVID=QQ314159\r\n"
        b"RCPT TO:<bob@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+40remote.test\r\n"
        b"RCPT TO:<carol@remote.test>\r\nDATA\r\n")


# --- CHUNKING ----------------------------------------------------------------------------


def bdat_transaction(client, recipients=("alice@test.ru",)):
    expect(client, "EHLO client.example", "250")
    expect(client, "MAIL FROM:<carol@example.org>", "250")
    for recipient in recipients:
        expect(client, f"RCPT TO:<{recipient}>", "250")


def stored_text(server, address="alice@test.ru"):
    [stored] = maildir_messages(server.config.maildir, address)
    return split_stored(stored)[2]


def test_bdat_last_stores_exactly_the_octets(server, client):
    bdat_transaction(client)
    text = b"Subject: chunked\r\n\r\nin one chunk\r\n"
    client.send(b"BDAT %d LAST\r\n" % len(text) + text)
    assert_reply(client.reply(), "250 2.0.0")
    assert stored_text(server) == text


def test_pipelined_chunks_in_one_packet_and_bdat_0_last(server, client):
    bdat_transaction(client)
    parts = [b"Subject: three\r\n\r\n", b"first part, ", b"second part\r\n"]
    client.send(b"".join(b"BDAT %d\r\n" % len(part) + part for part in parts) +
                b"BDAT 0 LAST\r\nNOOP\r\n")
    for part in parts:
        assert_reply(client.reply(), f"250 2.0.0 {len(part)} octets")
    assert_reply(client.reply(), "250 2.0.0 Ok: queued")
    assert_reply(client.reply(), "250 2.0.0 Ok")                   # NOOP: still in step
    assert stored_text(server) == b"".join(parts)


def test_a_chunk_split_across_packets_with_a_bare_lf_and_a_lone_dot_line(server, client):
    """BDAT has no dot-stuffing and no end marker: a line "." and a bare LF are text. The
    bare LF is stored as a line end, CRLF as every other (CONTRACT.md)."""
    bdat_transaction(client)
    text = b"Subject: raw\r\n\r\nline one\n.\r\n..two dots\r\nend\r\n"
    client.send(b"BDAT %d LAST\r\n" % len(text) + text[:7])
    client.send(text[7:20])
    client.send(text[20:])
    assert_reply(client.reply(), "250 2.0.0")
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    assert stored.endswith(b"Subject: raw\n\nline one\n.\n..two dots\nend\n")


def test_data_after_bdat_and_bdat_after_data_are_503(server, client):
    bdat_transaction(client)
    client.send(b"BDAT 5\r\nHello")
    assert_reply(client.reply(), "250")
    expect(client, "DATA", "503 5.5.1")
    client.send(b"BDAT 3 LAST\r\n!\r\n")
    assert_reply(client.reply(), "250 2.0.0")
    assert stored_text(server) == b"Hello!\r\n"
    expect(client, "MAIL FROM:<carol@example.org>", "250")
    expect(client, "RCPT TO:<alice@test.ru>", "250")
    expect(client, "DATA", "354")
    client.send(b"Subject: data\r\n\r\nx\r\n.\r\n")
    assert_reply(client.reply(), "250")
    client.send(b"BDAT 4 LAST\r\nNOOP")             # no transaction: refused, octets dropped
    assert_reply(client.reply(), "503 5.5.1")
    expect(client, "NOOP", "250")                   # the 4 octets were not read as a command


def test_a_chunk_over_the_size_limit_is_read_to_its_end_and_refused(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **{"server.max_message_size": "100"}))
    with Client(server.address) as client:
        bdat_transaction(client)
        client.send(b"BDAT 200\r\n" + b"x" * 198 + b"\r\n")
        assert_reply(client.reply(), "552 5.3.4")
        client.send(b"BDAT 10 LAST\r\n0123456789")  # pipelined on: dropped, still in step
        assert_reply(client.reply(), "503 5.5.1")
        expect(client, "NOOP", "250")
    assert maildir_messages(server.config.maildir, "alice@test.ru") == []
    assert [path for path in stored_files(server.config.maildir) if "/tmp/" in path] == []


def test_rset_discards_the_chunks_so_far(server, client):
    bdat_transaction(client)
    client.send(b"BDAT 6\r\npart1\n")
    assert_reply(client.reply(), "250")
    expect(client, "RSET", "250")
    client.send(b"BDAT 1 LAST\r\nx")              # the transaction is gone
    assert_reply(client.reply(), "503 5.5.1")
    bdat_transaction(client)
    client.send(b"BDAT 4 LAST\r\nnew\n")
    assert_reply(client.reply(), "250 2.0.0")
    assert stored_text(server) == b"new\r\n"


@pytest.mark.parametrize("argument", ["", "x", "-1", "10 MORE", "10 LAST extra"])
def test_bdat_syntax(client, argument):
    bdat_transaction(client)
    expect(client, f"BDAT {argument}".strip(), "501 5.5.4")


def test_the_client_leaving_mid_chunk_stores_nothing(server):
    with Client(server.address) as client:
        bdat_transaction(client)
        client.send(b"BDAT 100 LAST\r\nonly part of it")
    with Client(server.address) as other:           # the server is fine, and stored nothing
        expect(other, "NOOP", "250")
    assert maildir_messages(server.config.maildir, "alice@test.ru") == []


# --- implicit TLS (RFC 8314) ---------------------------------------------------------------


def test_the_submissions_port_speaks_tls_from_the_first_byte(tmp_path, start_server,
                                                             certificate):
    cert, key = certificate
    (tmp_path / "users").write_text(f"alice@test.ru:{passwords.hash_password('pw')}\nbob\n")
    port = free_port(["127.0.0.1"])
    server = start_server(make_config(tmp_path, **{"tls.cert": cert, "tls.key": key,
                                                   "tls.submissions_port": port}))
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    client = Client.__new__(Client)
    client.sock, client.buffer = context.wrap_socket(raw), b""
    try:
        assert_reply(client.reply(), "220")
        keywords = ehlo_keywords(client)
        assert "STARTTLS" not in keywords and "AUTH PLAIN LOGIN" in keywords
        expect(client, "MAIL FROM:<alice@test.ru>", "530 5.7.0")   # AUTH first (RFC 6409)
        login = base64.b64encode(b"\0alice@test.ru\0pw").decode()
        expect(client, f"AUTH PLAIN {login}", "235")
        expect(client, "MAIL FROM:<alice@test.ru>", "250")
        expect(client, "RCPT TO:<bob@test.ru>", "250")
        expect(client, "DATA", "354")
        client.send(b"Subject: 465\r\n\r\nx\r\n.\r\n")
        assert_reply(client.reply(), "250")
        expect(client, "QUIT", "221")
    finally:
        client.close()
    [stored] = maildir_messages(server.config.maildir, "bob@test.ru")
    assert b" with ESMTPSA id " in split_stored(stored)[1]


def test_the_trace_follows_each_reply_and_explains_bdat(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **{"log.trace": "yes"}))
    with Client(server.address) as client:
        bdat_transaction(client)
        client.send(b"BDAT 5 LAST\r\nhi\r\n.")
        assert_reply(client.reply(), "250 2.0.0")
        expect(client, "QUIT", "221")
    lines = (tmp_path / "logs" / "smtpd.log").read_text().splitlines()
    sender = next(n for n, line in enumerate(lines) if "-> 250 2.1.0 Sender" in line)
    assert "[GREETED -> MAIL] MAIL accepted: 250 2.1.0 (RFC 5321 4.1.1.2)" in lines[sender + 1]
    assert any("[RCPT -> BDAT] BDAT: reading 5 octets before the reply (RFC 3030 2)" in line
               for line in lines)
    queued = next(n for n, line in enumerate(lines) if "-> 250 2.0.0 Ok: queued" in line)
    assert "[BDAT -> GREETED] LAST chunk accepted" in lines[queued + 1]


# --- the delivered notice (RFC 3461 4.1) --------------------------------------------------


def delivered_notice(server, notify, parameters=""):
    with Client(server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, f"MAIL FROM:<alice@test.ru>{parameters}", "250")
        expect(client, f"RCPT TO:<bob@test.ru>{notify}", "250")
        expect(client, "DATA", "354")
        client.send(b"Subject: tell me\r\nMessage-ID: <m1@test.ru>\r\n\r\nbody\r\n.\r\n")
        assert_reply(client.reply(), "250")
    assert len(maildir_messages(server.config.maildir, "bob@test.ru")) == 1
    return maildir_messages(server.config.maildir, "alice@test.ru")


def test_notify_success_on_a_local_delivery_sends_a_delivered_notice(server):
    import email
    import email.policy
    [notice] = delivered_notice(server, " NOTIFY=SUCCESS ORCPT=rfc822;Bob+40test.ru",
                                " ENVID=QQ314159")
    report = email.message_from_bytes(notice, policy=email.policy.default)
    assert notice.startswith(b"Return-Path: <>\n")             # notices come from <>
    assert report.get_content_type() == "multipart/report"
    status = [part for part in report.iter_parts()
              if part.get_content_type() == "message/delivery-status"][0].get_payload()
    assert status[0]["Original-Envelope-Id"] == "QQ314159"
    assert status[1]["Action"] == "delivered" and status[1]["Status"] == "2.0.0"
    assert status[1]["Original-Recipient"] == "rfc822;Bob@test.ru"
    assert "Subject: tell me" in list(report.iter_parts())[2].get_content()


@pytest.mark.parametrize("notify", ["", " NOTIFY=FAILURE,DELAY", " NOTIFY=NEVER"])
def test_no_delivered_notice_unless_asked(server, notify):
    assert delivered_notice(server, notify) == []
