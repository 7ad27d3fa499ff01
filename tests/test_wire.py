"""Wire tests: the server runs in-process on a loopback port 0; smtplib is a real client and
tests.wire.Client sends exact bytes. Each test asserts what a user sees: bytes on the wire and
files in the Maildir or the spool (see ../shared/CONTRACT.md, "Replies a client can rely on").
"""
import mailbox
import os
import random
import re
import smtplib
import socket
import threading
import time

import pytest

from tests.conftest import maildir_messages, make_config, stored_files
from tests.waiting import wait_until
from tests.wire import Client

HOSTNAME = "mail.test.ru"
REMOTE = "example.org"
# Should a relay run inside the server, its next hop for REMOTE (and any DNS) stays on loopback
# and is refused at once, so spooled mail stays in the spool and no test touches the internet.
LOOPBACK_RELAY = {"relay.routes": f"{REMOTE}=127.0.0.1:9", "relay.nameservers": "127.0.0.1:9"}


# ---------------------------------------------------------------------------------------
# Helpers


def assert_reply(reply, expected):
    """`expected` is "250", "250 2.0.0" ...: the code of every line, and the start of the last."""
    code, lines = reply
    assert lines, f"the server closed the connection instead of answering {expected!r}"
    assert all(line[:3] == expected[:3] for line in lines), lines
    assert lines[-1] == expected or lines[-1].startswith(expected + " "), lines
    for line in lines[:-1]:
        assert line[3] == "-", lines            # RFC 5321 4.2.1: continuation lines
    return lines


def expect(client, command, expected):
    return assert_reply(client.command(command), expected)


def assert_closed(client, within=5.0):
    """The server closes the connection (EOF or reset) within `within` seconds, unprompted."""
    assert client.buffer == b"", f"unread bytes before close: {client.buffer!r}"
    client.sock.settimeout(within)
    try:
        data = client.sock.recv(65536)
    except ConnectionResetError:
        return
    except socket.timeout:
        pytest.fail(f"the server kept the connection open for {within} s")
    assert data == b"", f"expected the connection to close, got {data!r}"


def start_transaction(client, sender, recipients, mail_parameters="", helo="client.example"):
    expect(client, f"EHLO {helo}", "250")
    expect(client, f"MAIL FROM:<{sender}>{mail_parameters}", "250")
    for recipient in recipients:
        expect(client, f"RCPT TO:<{recipient}>", "250")
    expect(client, "DATA", "354")


def send_raw(client, sender, recipients, wire_text, mail_parameters=""):
    """A whole transaction; `wire_text` is the message as sent after 354 (dot-stuffed,
    with its final <CRLF>.<CRLF>). Returns the final reply."""
    start_transaction(client, sender, recipients, mail_parameters)
    client.send(wire_text)
    return client.reply()


STORED = re.compile(rb"Return-Path: <([^>\r\n]*)>\r\n"
                    rb"(Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)")


def split_stored(stored):
    """A stored message -> (reverse path, the server's Received header, the message as sent).
    The Maildir file has LF line ends (CONTRACT: "Where mail lands"); the parts are given
    back with CRLF, to compare with what went over the wire."""
    assert b"\r\n" not in stored, f"a CRLF in a Maildir file: {stored[:300]!r}"
    stored = stored.replace(b"\n", b"\r\n")
    match = STORED.match(stored)
    assert match, f"stored message does not start with Return-Path and Received: {stored[:300]!r}"
    return match.group(1), match.group(2), stored[match.end():]


def spool_files(config):
    """Files in the spool that are not lock files (messages, delivery state)."""
    return [path for path in stored_files(config.spool)
            if not os.path.basename(path).startswith(".")]


def read_if_there(path):
    """A file's bytes, or b"" if it went away meanwhile (the relay may rename its own files)."""
    try:
        with open(path, "rb") as spooled:
            return spooled.read()
    except (FileNotFoundError, IsADirectoryError):
        return b""


def spooled_transactions(config, recipient):
    """{path: content} of the spool files (directly in the spool) that hold a transaction
    (commands up to DATA) for `recipient`."""
    found = {}
    for name in os.listdir(config.spool):
        path = os.path.join(config.spool, name)
        content = read_if_there(path)
        if f"RCPT TO:<{recipient}>".encode() in content and b"\r\nDATA\r\n" in content:
            found[path] = content
    return found


def nothing_stored(config):
    return stored_files(config.maildir) == [] and spool_files(config) == []


def mailbox_tmp(config, address):
    local_part, domain = address.split("@")
    return os.listdir(os.path.join(config.maildir, domain, local_part, "tmp"))


# ---------------------------------------------------------------------------------------
# The reply table, row by row


def test_connect_greets_with_220_hostname_esmtp(server):
    with Client(server.address, greet=False) as client:
        client.sock.settimeout(5)
        data = b""
        while b"\r\n" not in data and len(data) < 1000:
            chunk = client.sock.recv(1000)
            if not chunk:
                break
            data += chunk
    assert re.fullmatch(rb"220 mail\.test\.ru ESMTP[^\r\n]*\r\n", data), data


@pytest.mark.parametrize("verb", ["HELO", "helo", "HeLo"])
def test_helo_ok_is_a_single_250(client, verb):
    code, lines = client.command(f"{verb} client.example")
    assert code == 250 and len(lines) == 1 and lines[0].startswith("250 "), lines


def test_ehlo_lists_the_keywords(client, server):
    lines = expect(client, "EHLO client.example", "250")
    keywords = {line[4:].upper() for line in lines[1:]}
    assert f"SIZE {server.config.max_message_size}" in keywords
    assert {"8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"} <= keywords
    assert not any(keyword.startswith("STARTTLS") for keyword in keywords), \
        "STARTTLS advertised without a certificate configured"


def test_ehlo_through_smtplib(smtp, server):
    assert smtp.does_esmtp
    assert smtp.esmtp_features["size"] == str(server.config.max_message_size)
    for keyword in ("8bitmime", "pipelining", "enhancedstatuscodes"):
        assert smtp.has_extn(keyword), keyword


@pytest.mark.parametrize("command", ["HELO", "EHLO", "HELO ", "EHLO   ", "ehlo"])
def test_helo_ehlo_without_domain_501_5_5_4(client, command):
    expect(client, command, "501 5.5.4")
    expect(client, "EHLO client.example", "250")     # the session goes on


MAIL = "MAIL FROM:<carol@example.org>"
RCPT = "RCPT TO:<alice@test.ru>"


@pytest.mark.parametrize("before, command", [
    ([], MAIL),                                             # MAIL before HELO/EHLO
    ([], "RCPT TO:<alice@test.ru>"),
    ([], "DATA"),
    (["EHLO client.example", MAIL], "MAIL FROM:<dave@example.org>"),   # nested MAIL
    (["HELO client.example"], RCPT),                        # RCPT before MAIL
    (["EHLO client.example"], "DATA"),                      # DATA before MAIL
    (["EHLO client.example", MAIL], "DATA"),                # DATA before RCPT
    (["EHLO client.example", MAIL, RCPT, "RSET"], "DATA"),  # RSET ended the transaction
    (["EHLO client.example", MAIL, RCPT, "EHLO client.example"], "DATA"),  # RFC 5321 4.1.4
], ids=["mail-first", "rcpt-first", "data-first", "nested-mail", "rcpt-before-mail",
        "data-before-mail", "data-before-rcpt", "data-after-rset", "data-after-ehlo"])
def test_bad_sequence_503_5_5_1(client, before, command):
    for setup in before:
        assert client.code(setup) == 250, setup
    expect(client, command, "503 5.5.1")
    expect(client, "NOOP", "250 2.0.0")


def test_nested_mail_keeps_the_first_transaction(server, client):
    expect(client, "EHLO client.example", "250")
    expect(client, MAIL, "250")
    expect(client, "MAIL FROM:<dave@example.org>", "503 5.5.1")
    expect(client, RCPT, "250")
    expect(client, "DATA", "354")
    client.send("Subject: first\r\n\r\nbody\r\n.\r\n")
    assert_reply(client.reply(), "250 2.0.0")
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    assert split_stored(stored)[0] == b"carol@example.org"


@pytest.mark.parametrize("command", [
    "MAIL FROM:carol@example.org", "MAIL FROM:<carol>", "MAIL FROM:<carol@>",
    "MAIL FROM:<@example.org>", "MAIL FROM:<ca rol@example.org>", "MAIL FROM:<carol@exa_mple.org>",
])
def test_bad_sender_syntax_501_5_1_7(client, command):
    expect(client, "EHLO client.example", "250")
    expect(client, command, "501 5.1.7")
    expect(client, MAIL, "250")


@pytest.mark.parametrize("command", [
    "RCPT TO:alice@test.ru", "RCPT TO:<alice>", "RCPT TO:<>", "RCPT TO:<alice@>",
    "RCPT TO:<alice@test..ru>", "RCPT TO:<al ice@test.ru>",
])
def test_bad_recipient_syntax_501_5_1_3(client, command):
    expect(client, "EHLO client.example", "250")
    expect(client, MAIL, "250")
    expect(client, command, "501 5.1.3")
    expect(client, RCPT, "250")


def test_unknown_local_user_550_5_1_1(server, client):
    expect(client, "EHLO client.example", "250")
    expect(client, MAIL, "250")
    expect(client, "RCPT TO:<nobody@test.ru>", "550 5.1.1")
    expect(client, "RCPT TO:<postmaster@test.ru>", "250")     # RFC 5321 4.5.1: always there
    expect(client, "RCPT TO:<Postmaster>", "250")
    expect(client, "DATA", "354")
    client.send("Subject: hi\r\n\r\nfor the postmaster\r\n.\r\n")
    assert_reply(client.reply(), "250 2.0.0")
    assert len(maildir_messages(server.config.maildir, "postmaster@test.ru")) == 1
    assert not os.path.exists(os.path.join(server.config.maildir, "test.ru", "nobody"))


def test_unknown_local_user_through_smtplib(smtp, server):
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        smtp.sendmail("carol@example.org", ["nobody@test.ru"], b"Subject: x\r\n\r\nx\r\n")
    code, text = refused.value.recipients["nobody@test.ru"]
    assert code == 550 and text.startswith(b"5.1.1"), (code, text)
    assert nothing_stored(server.config)


def test_remote_recipient_from_non_relay_client_554_5_7_1(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **{"relay.networks": "192.0.2.0/24"},
                                      **LOOPBACK_RELAY))
    with Client(server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, MAIL, "250")
        expect(client, f"RCPT TO:<dave@{REMOTE}>", "554 5.7.1")
        expect(client, RCPT, "250")                 # local mail is still accepted
        expect(client, "DATA", "354")
        client.send("Subject: x\r\n\r\nx\r\n.\r\n")
        assert_reply(client.reply(), "250 2.0.0")
    assert spool_files(server.config) == []
    assert len(maildir_messages(server.config.maildir, "alice@test.ru")) == 1


def test_101_recipients_452_4_5_3_and_the_first_100_get_it(tmp_path, start_server):
    users = [f"user{number}" for number in range(101)]
    server = start_server(make_config(tmp_path, users=users))
    recipients = [f"{user}@test.ru" for user in users]
    with smtplib.SMTP(*server.address, timeout=10) as smtp:
        refused = smtp.sendmail("carol@example.org", recipients,
                                b"Subject: many\r\n\r\nto a hundred\r\n")
    assert list(refused) == [recipients[100]]
    code, text = refused[recipients[100]]
    assert code == 452 and text.startswith(b"4.5.3"), (code, text)
    for recipient in recipients[:100]:
        assert len(maildir_messages(server.config.maildir, recipient)) == 1, recipient
    assert maildir_messages(server.config.maildir, recipients[100]) == []


def test_size_parameter_over_the_limit_552_5_3_4(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **{"server.max_message_size": "1000"}))
    with Client(server.address) as client:
        lines = expect(client, "EHLO client.example", "250")
        assert "250-SIZE 1000" in lines or "250 SIZE 1000" in lines, lines
        expect(client, "MAIL FROM:<carol@example.org> SIZE=1001", "552 5.3.4")
        expect(client, "MAIL FROM:<carol@example.org> SIZE=99999999999999999999", "552 5.3.4")
        expect(client, "MAIL FROM:<carol@example.org> SIZE=1000", "250")


def test_size_parameter_through_smtplib(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **{"server.max_message_size": "1000"}))
    with smtplib.SMTP(*server.address, timeout=10) as smtp:
        # smtplib sends SIZE= itself when the server offers SIZE
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("carol@example.org", ["alice@test.ru"], b"x" * 1500 + b"\r\n")
    assert refused.value.smtp_code == 552
    assert refused.value.smtp_error.startswith(b"5.3.4")
    assert nothing_stored(server.config)


@pytest.mark.parametrize("size", [1500, 200_000], ids=["a-bit-over", "far-over"])
def test_actual_size_over_the_limit_552_5_3_4_nothing_stored(tmp_path, start_server, size):
    server = start_server(make_config(tmp_path, **{"server.max_message_size": "1000"}))
    line = b"y" * 98 + b"\r\n"
    with Client(server.address) as client:
        reply = send_raw(client, "carol@example.org", ["alice@test.ru"],
                         line * (size // 100) + b".\r\n")
        assert_reply(reply, "552 5.3.4")
        assert nothing_stored(server.config)
        # the session goes on: a message within the limit is accepted
        expect(client, MAIL, "250")
        expect(client, RCPT, "250")
        expect(client, "DATA", "354")
        client.send(line * 5 + b".\r\n")
        assert_reply(client.reply(), "250 2.0.0")
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    assert split_stored(stored)[2] == line * 5


def test_command_line_over_512_octets_500_5_5_2(client):
    expect(client, "NOOP " + "x" * (512 - len("NOOP ") - 2), "250 2.0.0")   # exactly 512
    expect(client, "NOOP " + "x" * (513 - len("NOOP ") - 2), "500 5.5.2")   # 513
    expect(client, "EHLO " + "a" * 600 + ".example", "500 5.5.2")
    expect(client, "NOOP", "250 2.0.0")


def test_endless_line_gets_one_500_and_the_session_goes_on(client):
    client.send(b"A" * 1_000_000 + b"\r\nNOOP\r\n")
    assert_reply(client.reply(), "500 5.5.2")
    assert_reply(client.reply(), "250 2.0.0")
    expect(client, "EHLO client.example", "250")


def test_text_line_over_1000_octets_500_5_5_2_nothing_stored(server, client):
    longest = b"z" * 998 + b"\r\n"                                   # 1000 with CRLF: fine
    reply = send_raw(client, "carol@example.org", ["alice@test.ru"],
                     b"Subject: long\r\n\r\n" + b"z" * 999 + b"\r\n.\r\n")
    assert_reply(reply, "500 5.5.2")
    assert nothing_stored(server.config)
    reply = send_raw(client, "carol@example.org", ["alice@test.ru"],
                     b"Subject: long\r\n\r\n" + longest + b".\r\n")
    assert_reply(reply, "250 2.0.0")
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    assert split_stored(stored)[2] == b"Subject: long\r\n\r\n" + longest


@pytest.mark.parametrize("command", ["FOO", "MAILFROM:<a@b>", "STARTTLSX", "\x7f"])
def test_unknown_command_500_5_5_2(client, command):
    expect(client, command, "500 5.5.2")
    expect(client, "EHLO client.example", "250")


def test_expn_502_5_5_1(client):
    expect(client, "EXPN staff", "502 5.5.1")
    expect(client, "EHLO client.example", "250")
    expect(client, "EXPN alice", "502 5.5.1")


def test_vrfy_252_2_5_2_never_confirms(client):
    known = expect(client, "VRFY alice", "252 2.5.2")
    unknown = expect(client, "VRFY nobody", "252 2.5.2")
    # the same answer for a user who exists and one who does not
    assert known[-1].replace("alice", "X") == unknown[-1].replace("nobody", "X")
    expect(client, "EHLO client.example", "250")
    expect(client, "VRFY <alice@test.ru>", "252 2.5.2")


def test_noop_and_rset_250_2_0_0(client):
    expect(client, "NOOP", "250 2.0.0")
    expect(client, "RSET", "250 2.0.0")
    expect(client, "EHLO client.example", "250")
    expect(client, MAIL, "250")
    expect(client, "NOOP", "250 2.0.0")
    expect(client, "RSET", "250 2.0.0")
    expect(client, "RCPT TO:<alice@test.ru>", "503 5.5.1")    # the transaction is gone


def test_data_354_then_250_2_0_0_with_the_queue_id(server, client):
    expect(client, "EHLO client.example", "250")
    expect(client, MAIL, "250 2.1.0")
    expect(client, RCPT, "250 2.1.5")
    expect(client, "DATA", "354")
    client.send("Subject: hello\r\n\r\nHi Alice\r\n.\r\n")
    [final] = assert_reply(client.reply(), "250 2.0.0")
    queue_id = final.split()[-1]
    assert re.fullmatch(r"[0-9A-Za-z]{6,}", queue_id), final
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    _, received, message = split_stored(stored)
    assert re.search(rb"\bid " + queue_id.encode() + rb"\b", received), received
    assert message == b"Subject: hello\r\n\r\nHi Alice\r\n"


def test_empty_message_is_accepted(server, client):
    reply = send_raw(client, "carol@example.org", ["alice@test.ru"], b".\r\n")
    assert_reply(reply, "250 2.0.0")
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    assert split_stored(stored)[2] == b""


def test_quit_221_then_the_server_closes(client):
    expect(client, "EHLO client.example", "250")
    expect(client, "QUIT", "221 2.0.0")
    assert_closed(client)


@pytest.mark.parametrize("stall", ["idle", "half-a-command", "in-data"])
def test_idle_timeout_421_4_4_2(tmp_path, start_server, stall):
    server = start_server(make_config(tmp_path, **{"server.timeout": "1"}))
    with Client(server.address) as client:
        expect(client, "EHLO client.example", "250")
        if stall == "half-a-command":
            client.send("NOOP")
        elif stall == "in-data":
            start_transaction(client, "carol@example.org", ["alice@test.ru"])
            client.send("Subject: slow\r\n\r\nand then nothing")
        began = time.monotonic()
        client.sock.settimeout(6)
        assert_reply(client.reply(), "421 4.4.2")
        assert 0.5 <= time.monotonic() - began < 5
        assert_closed(client)
    assert nothing_stored(server.config)


def test_too_many_clients_421_4_7_0(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **{"server.max_clients": "1"}))
    with Client(server.address) as first:
        assert first.greeting[0] == 220
        with Client(server.address, greet=False) as second:
            second.sock.settimeout(5)
            assert_reply(second.reply(), "421 4.7.0")
            assert_closed(second)
        expect(first, "NOOP", "250 2.0.0")          # the first client is unaffected
        expect(first, "QUIT", "221")
        assert_closed(first)
    # the client sees the close a moment before the server's thread has given up the place
    admission = server.listeners[0].admission
    assert wait_until(lambda: not admission.clients, timeout=5), admission.clients
    with Client(server.address) as third:           # its place is free again
        assert third.greeting[0] == 220
        expect(third, "QUIT", "221")


@pytest.mark.parametrize("greeted", [False, True])
def test_shutdown_421_4_3_2_to_an_idle_session(server, greeted):
    address = server.address
    with Client(address) as client:
        if greeted:
            expect(client, "EHLO client.example", "250")
            expect(client, MAIL, "250")
        began = time.monotonic()
        server.stop(grace=5)
        assert time.monotonic() - began < 4, "stop() waited for an idle session"
        client.sock.settimeout(5)
        assert_reply(client.reply(), "421 4.3.2")
        assert_closed(client)
    with pytest.raises(OSError):
        Client(address, timeout=2).close()          # no longer accepting
    assert nothing_stored(server.config)


def test_session_threads_end_when_the_server_stops(tmp_path):
    """Start and stop three servers in one process: no thread is left behind."""
    import smtpd
    before = {thread.ident for thread in threading.enumerate()}
    for number in range(3):
        (tmp_path / str(number)).mkdir()
        server = smtpd.start(make_config(tmp_path / str(number)), console=False)
        with Client(server.address) as client:          # a session on a thread of its own
            expect(client, "QUIT", "221")
        with Client(server.address) as idle:
            expect(idle, "NOOP", "250")
            server.stop(grace=2)
    left = [thread for thread in threading.enumerate()
            if thread.ident not in before and thread.is_alive()]
    for thread in left:                                  # bounded: each had its stop
        thread.join(2)
    assert [thread.name for thread in left if thread.is_alive()] == []


def test_shutdown_lets_a_session_in_data_finish(server):
    with Client(server.address) as client:
        start_transaction(client, "carol@example.org", ["alice@test.ru"])
        client.send("Subject: last one\r\n\r\nalmost")
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 5}, daemon=True)
        stopper.start()
        assert server.shutdown.event.wait(5)
        client.send(" done\r\n.\r\n")
        client.sock.settimeout(5)
        assert_reply(client.reply(), "250 2.0.0")
        assert_reply(client.reply(), "421 4.3.2")
        assert_closed(client)
        stopper.join(6)
        assert not stopper.is_alive()
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    assert split_stored(stored)[2] == b"Subject: last one\r\n\r\nalmost done\r\n"


# ---------------------------------------------------------------------------------------
# How the bytes arrive


def test_verbs_are_case_insensitive(server, client):
    for command in ("ehlo client.example", "mail from:<carol@example.org>",
                    "rcpt to:<alice@test.ru>"):
        expect(client, command, "250")
    expect(client, "data", "354")
    client.send("Subject: lower\r\n\r\nx\r\n.\r\n")
    assert_reply(client.reply(), "250 2.0.0")
    expect(client, "quit", "221")
    assert len(maildir_messages(server.config.maildir, "alice@test.ru")) == 1


def test_pipelining_a_whole_transaction_in_one_send(server, client):
    client.send(b"EHLO client.example\r\n"
                b"MAIL FROM:<carol@example.org>\r\n"
                b"RCPT TO:<alice@test.ru>\r\n"
                b"RCPT TO:<bob@test.ru>\r\n"
                b"DATA\r\n"
                b"Subject: pipelined\r\n\r\nall at once\r\n.\r\n"
                b"NOOP\r\n"
                b"QUIT\r\n")
    for expected in ("250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "354", "250 2.0.0",
                     "250 2.0.0", "221 2.0.0"):
        assert_reply(client.reply(), expected)
    assert_closed(client)
    for recipient in ("alice@test.ru", "bob@test.ru"):
        [stored] = maildir_messages(server.config.maildir, recipient)
        assert split_stored(stored)[2] == b"Subject: pipelined\r\n\r\nall at once\r\n"


def test_two_pipelined_transactions_in_one_send(server, client):
    expect(client, "EHLO client.example", "250")
    client.send(b"MAIL FROM:<carol@example.org>\r\nRCPT TO:<alice@test.ru>\r\nDATA\r\n"
                b"Subject: one\r\n\r\n1\r\n.\r\n"
                b"MAIL FROM:<dave@example.org>\r\nRCPT TO:<bob@test.ru>\r\nDATA\r\n"
                b"Subject: two\r\n\r\n2\r\n.\r\n")
    for expected in ("250", "250", "354", "250 2.0.0") * 2:
        assert_reply(client.reply(), expected)
    [one] = maildir_messages(server.config.maildir, "alice@test.ru")
    [two] = maildir_messages(server.config.maildir, "bob@test.ru")
    assert split_stored(one)[2] == b"Subject: one\r\n\r\n1\r\n"
    assert split_stored(two)[2] == b"Subject: two\r\n\r\n2\r\n"


def test_byte_by_byte_input(server, client):
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def trickle(data):
        for byte in data:
            client.send(bytes([byte]))

    for command, expected in ((b"EHLO client.example\r\n", "250"),
                              (b"MAIL FROM:<carol@example.org>\r\n", "250 2.1.0"),
                              (b"RCPT TO:<alice@test.ru>\r\n", "250 2.1.5"),
                              (b"DATA\r\n", "354"),
                              (b"Subject: slow\r\n\r\n.dot\r\nbyte\rby\nbyte\r\n.\r\n", None)):
        trickle(command)
        if expected:
            assert_reply(client.reply(), expected)
    final = client.reply()
    # the body had a bare CR and a bare LF: this server refuses it whole (CONTRACT.md)
    assert_reply(final, "554 5.6.0")
    assert maildir_messages(server.config.maildir, "alice@test.ru") == []
    trickle(b"MAIL FROM:<carol@example.org>\r\n")
    assert_reply(client.reply(), "250 2.1.0")
    trickle(b"RCPT TO:<bob@test.ru>\r\n")
    assert_reply(client.reply(), "250 2.1.5")
    trickle(b"DATA\r\n")
    assert_reply(client.reply(), "354")
    trickle(b"Subject: slow\r\n\r\n..dot\r\nbyte\r\n.\r\n")
    assert_reply(client.reply(), "250 2.0.0")
    [message] = maildir_messages(server.config.maildir, "bob@test.ru")
    assert split_stored(message)[2] == b"Subject: slow\r\n\r\n.dot\r\nbyte\r\n"


# A message whose lines start with periods, as the user wrote it and as it goes on the wire
DOTTED = (b".starts with a dot\r\n"
          b"Subject: dots\r\n"
          b"\r\n"
          b".\r\n"
          b"..\r\n"
          b"...\r\n"
          b".hidden\r\n"
          b"..two\r\n"
          b"a . in the middle\r\n"
          b" .space first\r\n"
          b".\r\n")
DOTTED_ON_THE_WIRE = (b"..starts with a dot\r\n"
                      b"Subject: dots\r\n"
                      b"\r\n"
                      b"..\r\n"
                      b"...\r\n"
                      b"....\r\n"
                      b"..hidden\r\n"
                      b"...two\r\n"
                      b"a . in the middle\r\n"
                      b" .space first\r\n"
                      b"..\r\n"
                      b".\r\n")


def test_dot_stuffing_is_undone_exactly(server, client):
    reply = send_raw(client, "carol@example.org", ["alice@test.ru"], DOTTED_ON_THE_WIRE)
    assert_reply(reply, "250 2.0.0")
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    assert split_stored(stored)[2] == DOTTED


def test_dot_stuffing_round_trips_through_smtplib(server, smtp):
    smtp.sendmail("carol@example.org", ["alice@test.ru"], DOTTED)
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    assert split_stored(stored)[2] == DOTTED


def test_8bit_body_is_stored_byte_exact(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **LOOPBACK_RELAY))
    high = bytes(range(0x80, 0x100))
    body = (b"Subject: =?utf-8?q?8bit?=\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n"
            + "Привет, Алиса! ÆØÅ €\r\n".encode("utf-8")
            + high[:64] + b"\r\n" + high[64:] + b"\r\n\t\x01\x1b tab and controls\r\n")
    with smtplib.SMTP(*server.address, timeout=10) as smtp:
        smtp.ehlo("client.example")
        refused = smtp.sendmail("carol@example.org", ["alice@test.ru", f"dave@{REMOTE}"], body,
                                mail_options=["BODY=8BITMIME"])
    assert refused == {}
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    assert split_stored(stored)[2] == body
    # the spooled transaction keeps the 8-bit declaration and the bytes
    [text] = spooled_transactions(server.config, f"dave@{REMOTE}").values()
    assert re.search(rb"^MAIL FROM:<carol@example\.org> [^\r\n]*BODY=8BITMIME", text, re.M | re.I)
    assert body in text


def test_body_parameter_7bit_and_bad_value(client):
    expect(client, "EHLO client.example", "250")
    expect(client, "MAIL FROM:<carol@example.org> BODY=7BIT", "250")
    expect(client, "RSET", "250")
    expect(client, "MAIL FROM:<carol@example.org> BODY=9BIT", "555 5.5.4")
    expect(client, "MAIL FROM:<carol@example.org> FROBNICATE=yes", "555 5.5.4")


def test_one_megabyte_message(server, smtp):
    body = b"Subject: big\r\n\r\n" + b"".join(b"%07d " % number + b"m" * 68 + b"\r\n"
                                                 for number in range(13_500))
    assert len(body) > 1_000_000
    began = time.monotonic()
    smtp.sendmail("carol@example.org", ["alice@test.ru"], body)
    assert time.monotonic() - began < 10
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    assert split_stored(stored)[2] == body


def test_disconnect_mid_data_stores_nothing(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **LOOPBACK_RELAY))
    with Client(server.address) as client:
        start_transaction(client, "carol@example.org", ["alice@test.ru", f"dave@{REMOTE}"])
        client.send(b"Subject: cut\r\n\r\n" + b"half a message\r\n" * 1000)
    began = time.monotonic()
    server.stop(grace=5)            # returns once every session has ended
    assert time.monotonic() - began < 4, "the session did not notice the client had gone"
    assert stored_files(server.config.maildir) == []
    assert spool_files(server.config) == []
    assert stored_files(os.path.join(server.config.spool, "tmp")) == []


def test_disconnect_right_after_the_final_dot_still_delivers(server):
    # the client did send the whole message; whether or not it reads the 250, it is stored once
    with Client(server.address) as client:
        start_transaction(client, "carol@example.org", ["alice@test.ru"])
        client.send(b"Subject: bye\r\n\r\nbye\r\n.\r\n")
        client.sock.settimeout(5)
        assert_reply(client.reply(), "250 2.0.0")
    assert len(maildir_messages(server.config.maildir, "alice@test.ru")) == 1


# ---------------------------------------------------------------------------------------
# Hostile input


TRAVERSALS = [
    "<../../etc/passwd@test.ru>",
    '<"../../etc/passwd"@test.ru>',
    '<"../../../../tmp/owned"@test.ru>',
    "<a/b@test.ru>",
    "<alice/../bob@test.ru>",
    '<"alice/../../x"@test.ru>',
    "<.alice@test.ru>",
    '<".alice"@test.ru>',
    '<".."@test.ru>',
    '<"."@test.ru>',
    '<"a\\\\b"@test.ru>',
    "<al\x00ice@test.ru>",
    '<"alice\x00"@test.ru>',
    '<"alice\x00/../x"@test.ru>',
    '<"al\tice"@test.ru>',
    "<alice@../../x>",
    "<alice@test.ru/../../x>",
]


@pytest.mark.parametrize("path", TRAVERSALS, ids=[repr(path) for path in TRAVERSALS])
def test_path_traversal_in_the_recipient_is_refused(tmp_path, server, client, path):
    expect(client, "EHLO client.example", "250")
    expect(client, MAIL, "250")
    code, lines = client.command(f"RCPT TO:{path}")
    # a syntax error, or an unknown local name: never a mailbox
    assert lines and lines[-1][:9] in ("501 5.1.3", "550 5.1.1"), (path, lines)
    expect(client, RCPT, "250")
    expect(client, "DATA", "354")
    client.send("Subject: traversal\r\n\r\nx\r\n.\r\n")
    assert_reply(client.reply(), "250 2.0.0")
    expect(client, "QUIT", "221")
    assert_closed(client)
    # the only message is alice's; nothing was written anywhere else
    alice = os.path.join(server.config.maildir, "test.ru", "alice")
    allowed_directories = {str(tmp_path), server.config.maildir, server.config.spool,
                           os.path.join(server.config.spool, "tmp"), server.config.log_dir,
                           os.path.join(server.config.maildir, "test.ru"), alice,
                           *(os.path.join(alice, sub) for sub in ("tmp", "new", "cur"))}
    for directory, _, names in os.walk(tmp_path):
        assert directory in allowed_directories, directory
        for name in names:
            path_found = os.path.join(directory, name)
            assert (directory in (str(tmp_path), server.config.log_dir)
                    or directory == os.path.join(alice, "new")
                    or name.startswith(".")), path_found
    assert len(maildir_messages(server.config.maildir, "alice@test.ru")) == 1
    assert spool_files(server.config) == []


def test_mailbox_names_are_lower_cased(server, client):
    reply = send_raw(client, "Carol@Example.ORG", ["ALICE@TEST.RU"],
                     b"Subject: x\r\n\r\ny\r\n.\r\n")
    assert_reply(reply, "250 2.0.0")
    assert os.listdir(os.path.join(server.config.maildir)) == ["test.ru"]
    assert os.listdir(os.path.join(server.config.maildir, "test.ru")) == ["alice"]
    assert len(maildir_messages(server.config.maildir, "alice@test.ru")) == 1


SMUGGLING = ["\n.\n", "\r\n.\n", "\n.\r\n", "\r.\r", "\r\n.\r"]


@pytest.mark.parametrize("fake_end", SMUGGLING, ids=[repr(end) for end in SMUGGLING])
@pytest.mark.parametrize("packets", ["one-send", "split"])
def test_bare_line_ending_never_ends_or_splits_a_message(server, client, fake_end, packets):
    first = f"Subject: innocent\r\n\r\nhello{fake_end}".encode()
    smuggled = (b"MAIL FROM:<evil@example.org>\r\n"
                b"RCPT TO:<bob@test.ru>\r\n"
                b"DATA\r\n"
                b"Subject: smuggled\r\n\r\nevil\r\n.\r\n")
    start_transaction(client, "carol@example.org", ["alice@test.ru"])
    if packets == "split":
        client.send(first)
        client.send(smuggled)
    else:
        client.send(first + smuggled)
    final = client.reply()
    expect(client, "QUIT", "221")        # exactly one reply came for the message
    assert_closed(client)
    assert maildir_messages(server.config.maildir, "bob@test.ru") == []
    assert_reply(final, "554 5.6.0")         # refused whole: nothing stored, never two
    assert nothing_stored(server.config)


def test_garbage_and_nul_bytes_then_a_normal_message(server, client):
    for garbage, expected in ((b"\x00\r\n", "500 5.5.2"), (b"\x00\x00\x00 NOOP\r\n", "500 5.5.2"),
                              (b"\xff\xfe\xfd\r\n", "500 5.5.2"), (b"HELO \x00\r\n", "501 5.5.4"),
                              (b"\x1b[2J\x07\r\n", "500 5.5.2")):
        client.send(garbage)
        code, lines = client.reply()
        assert lines and lines[-1].startswith(expected + " "), (garbage, lines)
        assert not any("Traceback" in line for line in lines)
    reply = send_raw(client, "carol@example.org", ["alice@test.ru"],
                     b"Subject: after garbage\r\n\r\nstill here\r\n.\r\n")
    assert_reply(reply, "250 2.0.0")
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    assert split_stored(stored)[2] == b"Subject: after garbage\r\n\r\nstill here\r\n"


def test_a_flood_of_random_bytes_does_not_hurt_the_server(server):
    noise = random.Random(5321).randbytes(300_000)
    with Client(server.address) as client:
        try:
            client.send(noise)
        except OSError:
            pass                                    # the server may hang up on it
        client.sock.settimeout(5)
        for _ in range(10_000):                     # read whatever it answered, up to EOF
            try:
                code, lines = client.reply()
            except OSError:
                break
            if code is None:
                break
            assert not any("Traceback" in line for line in lines)
            assert code >= 400 or code == 250, lines
    with Client(server.address) as client:
        reply = send_raw(client, "carol@example.org", ["alice@test.ru"],
                         b"Subject: after noise\r\n\r\nok\r\n.\r\n")
        assert_reply(reply, "250 2.0.0")
    assert len(maildir_messages(server.config.maildir, "alice@test.ru")) == 1


def test_error_budget_then_421_and_close(client):
    replies_seen = []
    for _ in range(30):
        code, lines = client.command("BOGUS")
        if code is None:
            break
        replies_seen.append(lines[-1])
        if code == 421:
            break
    assert replies_seen and replies_seen[-1].startswith("421 "), replies_seen
    assert all(line.startswith("500 5.5.2") for line in replies_seen[:-1]), replies_seen
    assert 3 <= len(replies_seen) <= 26, replies_seen
    assert_closed(client)


def test_mail_loop_554_5_4_6_nothing_stored(server, client):
    hops = b"".join(b"Received: from hop%d.example by hop%d.example; "
                    b"Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (n, n + 1) for n in range(51))
    reply = send_raw(client, "carol@example.org", ["alice@test.ru"],
                     hops + b"Subject: loop\r\n\r\nround and round\r\n.\r\n")
    assert_reply(reply, "554 5.4.6")
    assert nothing_stored(server.config)


def test_storage_failure_451_4_3_0_and_the_session_goes_on(server, client):
    # alice's Maildir cannot be created: a plain file sits where its folder should be.
    # The text would go straight to its file, so DATA itself is refused.
    os.makedirs(os.path.join(server.config.maildir, "test.ru"))
    with open(os.path.join(server.config.maildir, "test.ru", "alice"), "w") as blocker:
        blocker.write("in the way\n")
    expect(client, "EHLO client.example", "250")
    expect(client, "MAIL FROM:<carol@example.org>", "250")
    expect(client, "RCPT TO:<alice@test.ru>", "250")
    expect(client, "RCPT TO:<bob@test.ru>", "250")
    reply = expect(client, "DATA", "451 4.3.0")
    assert not any("Traceback" in line for line in reply)
    expect(client, "RSET", "250")
    assert maildir_messages(server.config.maildir, "bob@test.ru") == []
    expect(client, "RCPT TO:<bob@test.ru>", "503 5.5.1")          # the transaction is gone
    expect(client, MAIL, "250")
    expect(client, "RCPT TO:<bob@test.ru>", "250")
    expect(client, "DATA", "354")
    client.send(b"Subject: x\r\n\r\nfor bob\r\n.\r\n")
    assert_reply(client.reply(), "250 2.0.0")
    assert len(maildir_messages(server.config.maildir, "bob@test.ru")) == 1


# ---------------------------------------------------------------------------------------
# Load


def test_20_concurrent_clients_5_messages_each_all_100_land(server):
    errors = []

    def one_client(number):
        try:
            with smtplib.SMTP(*server.address, timeout=10) as smtp:
                smtp.ehlo(f"client{number}.example")
                for message in range(5):
                    refused = smtp.sendmail(
                        f"sender{number}@example.org", ["alice@test.ru"],
                        b"Subject: load\r\nX-Id: %d-%d\r\n\r\nbody %d-%d\r\n"
                        % (number, message, number, message))
                    assert refused == {}
        except Exception as error:          # reported by the main thread
            errors.append((number, repr(error)))

    threads = [threading.Thread(target=one_client, args=(n,), daemon=True) for n in range(20)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.1, 20 - (time.monotonic() - began)))
    assert not any(thread.is_alive() for thread in threads), "clients still running after 20 s"
    assert errors == []
    stored = maildir_messages(server.config.maildir, "alice@test.ru")
    ids = sorted(re.search(rb"X-Id: (\d+-\d+)", message).group(1) for message in stored)
    assert ids == sorted(b"%d-%d" % (n, m) for n in range(20) for m in range(5))
    assert mailbox_tmp(server.config, "alice@test.ru") == []


# ---------------------------------------------------------------------------------------
# What lands on disk


def test_mailbox_maildir_reads_what_was_stored(server, smtp):
    body = b"Subject: hello\r\nFrom: Carol <carol@example.org>\r\n\r\nHi Alice,\r\nline two\r\n"
    smtp.sendmail("carol@example.org", ["alice@test.ru"], body)
    folder = mailbox.Maildir(os.path.join(server.config.maildir, "test.ru", "alice"),
                             create=False)
    [key] = folder.keys()
    message = folder[key]
    assert message.keys()[:2] == ["Return-Path", "Received"]
    assert message["Return-Path"] == "<carol@example.org>"
    received = " ".join(message["Received"].split())
    assert received.startswith("from client.example ([127.0.0.1])"), received
    assert f"by {HOSTNAME}" in received and "for <alice@test.ru>" in received, received
    assert re.search(r"; \w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$", received), received
    assert message["Subject"] == "hello"
    assert message.get_payload().replace("\r\n", "\n") == "Hi Alice,\nline two\n"
    assert message.get_subdir() == "new"
    # and the file itself, byte for byte
    with folder.get_file(key) as stored:
        assert split_stored(stored.read())[2] == body
    assert mailbox_tmp(server.config, "alice@test.ru") == []


def test_one_message_for_two_local_users_reaches_both(server, smtp):
    body = b"Subject: both\r\n\r\nto two\r\n"
    smtp.sendmail("", ["alice@test.ru", "bob@test.ru"], body)   # MAIL FROM:<>
    for recipient in ("alice@test.ru", "bob@test.ru"):
        [stored] = maildir_messages(server.config.maildir, recipient)
        reverse_path, received, message = split_stored(stored)
        assert reverse_path == b""                  # the null reverse path of a bounce
        assert b"for <" not in received             # two recipients: no for clause
        assert message == body


def test_remote_recipient_from_loopback_is_spooled(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **LOOPBACK_RELAY))
    body = b"Subject: away\r\n\r\n.leading dot\r\nto a remote user\r\n"
    with Client(server.address) as client:
        client_port = client.sock.getsockname()[1]
        reply = send_raw(client, "alice@test.ru", [f"dave@{REMOTE}", f"erin@{REMOTE}"],
                         body.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        assert_reply(reply, "250 2.0.0")
        queue_id = reply[1][-1].split()[-1]
        spooled = spooled_transactions(server.config, f"dave@{REMOTE}")
    assert len(spooled) == 1, spool_files(server.config)
    [(path, text)] = spooled.items()
    name = os.path.basename(path)
    assert str(client_port) in name and queue_id in name, (name, client_port, queue_id)
    commands = text.decode("utf-8").split("\r\n")
    assert re.fullmatch(r"(EHLO|HELO) \S+", commands[0]), commands[:5]
    assert commands[1].startswith("MAIL FROM:<alice@test.ru>"), commands[:5]
    assert sorted(commands[2:4]) == [f"RCPT TO:<dave@{REMOTE}>", f"RCPT TO:<erin@{REMOTE}>"]
    assert commands[4] == "DATA"
    # the message follows DATA dot-stuffed and with our Received line, ended by "."
    assert text.endswith(b"\r\n.\r\nQUIT\r\n") or text.endswith(b"\r\n.\r\n"), text[-40:]
    assert b"\r\n..leading dot\r\nto a remote user\r\n.\r\n" in text
    assert re.search(rb"\r\nDATA\r\nReceived: from client\.example", text), text[:400]
    assert stored_files(server.config.maildir) == []


def test_local_and_remote_recipients_in_one_transaction(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **LOOPBACK_RELAY))
    body = b"Subject: mixed\r\n\r\nhello\r\n"
    with smtplib.SMTP(*server.address, timeout=10) as smtp:
        smtp.ehlo("client.example")
        assert smtp.sendmail("carol@example.org", ["alice@test.ru", f"dave@{REMOTE}"], body) == {}
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    assert split_stored(stored)[2] == body
    [text] = spooled_transactions(server.config, f"dave@{REMOTE}").values()
    assert b"RCPT TO:<alice@test.ru>" not in text


def test_ipv6_loopback(tmp_path, start_server):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no ::1")
    server = start_server(make_config(tmp_path, ip="::1"))
    with Client(server.address) as client:
        assert client.greeting[0] == 220
        reply = send_raw(client, "carol@example.org", ["alice@test.ru"],
                         b"Subject: v6\r\n\r\nx\r\n.\r\n")
        assert_reply(reply, "250 2.0.0")
    [stored] = maildir_messages(server.config.maildir, "alice@test.ru")
    assert b"([IPv6:::1])" in split_stored(stored)[1]


# ---------------------------------------------------------------------------------------
# The dialogue log


def test_the_dialogue_log(server):
    secret = "body-marker-7f3a9c"
    with Client(server.address) as client:
        port = client.sock.getsockname()[1]
        expect(client, "HELO client.example", "250")
        expect(client, "MAIL FROM:<carol@example.org>", "250")
        expect(client, "RCPT TO:<alice@test.ru>", "250")
        expect(client, "DATA", "354")
        client.send(f"Subject: private\r\n\r\n{secret}\r\n.\r\n")
        assert_reply(client.reply(), "250 2.0.0")
        expect(client, "QUIT", "221")
    with open(os.path.join(server.config.log_dir, "smtpd.log"), encoding="utf-8") as log_file:
        log = log_file.read()
    greeting = re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[(\w+)\] 127\.0\.0\.1:%d "
                         r"-> 220 mail\.test\.ru ESMTP" % port, log, re.M)
    assert greeting, log
    tag = re.escape(f"[{greeting.group(1)}] 127.0.0.1:{port}")
    for line in (r"<- HELO client\.example$", r"-> 250 ", r"<- MAIL FROM:<carol@example\.org>$",
                 r"<- RCPT TO:<alice@test\.ru>$", r"<- DATA$", r"-> 354 ", r"-> 250 2\.0\.0 ",
                 r"<- QUIT$", r"-> 221 2\.0\.0 "):
        assert re.search(rf"^\d{{4}}-\S+ \S+ {tag} {line}", log, re.M), (line, log)
    assert secret not in log
    assert "Subject: private" not in log


def test_control_bytes_in_commands_cannot_forge_log_lines(server):
    forged = "2026-01-01 00:00:00 [forged] 10.9.8.7:25 <- MAIL FROM:<ceo@test.ru>"
    with Client(server.address) as client:
        expect(client, f"NOOP\r{forged}", "500 5.5.2")
        expect(client, "NOOP \x00\x1b[2J\x07", "250 2.0.0")
        expect(client, "QUIT", "221")
    with open(os.path.join(server.config.log_dir, "smtpd.log"), "rb") as log_file:
        raw = log_file.read()
    # read as any log reader does (universal newlines): one line per command, none forged
    lines = raw.decode("utf-8", "replace").splitlines()
    assert not any(line.startswith("2026-01-01 00:00:00 [forged]") for line in lines), lines
    assert not re.search(rb"[\x00-\x09\x0b-\x1f\x7f]", raw), raw
