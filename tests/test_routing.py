"""Issue 14 over the wire: aliases, suffixes, catch-all, forwarding, Delivered-To loops and
senders who are who they say; and the aliases file and the sender rewriting on their own."""
import base64
import email
import email.policy
import os
import time

import pytest

import passwords
from address import Address
from aliases import AliasError, read_aliases
from forwarding import Forwarder
from tests.conftest import maildir_messages, make_config
from tests.fake_mx import FakeMX
from tests.test_wire import assert_reply, expect, split_stored
from tests.waiting import wait_until
from tests.wire import Client

ALIASES = """\
# the README's example, and two more
postmaster: alice
team@test.ru: alice, bob
carol: carol@remote.test          # forwarding to another domain
*@example.test: alice             # catch-all for one local domain
nested: team, dave
ghost: nobody-here
"""
DOMAINS = {"domains.local": "test.ru, example.test"}
PASSWORD = "pw"


@pytest.fixture
def remote_mx():
    mx = FakeMX("127.0.0.1", rcpt=("250 2.1.5 ok",))
    yield mx
    mx.stop()


def routing_server(tmp_path, start_server, mx=None, aliases=ALIASES, **overrides):
    (tmp_path / "users").write_text(f"alice@test.ru:{passwords.hash_password(PASSWORD)}\n"
                                    "alice\nbob\ndave\n")
    (tmp_path / "aliases").write_text(aliases)
    settings = {**DOMAINS, "users.aliases": str(tmp_path / "aliases"), **overrides}
    if mx:
        settings["relay.routes"] = f"remote.test=127.0.0.1:{mx.port}"
    return start_server(make_config(tmp_path, **settings))


def deliver(server, recipients, sender="sender@example.org", text=b"Subject: hi\r\n\r\nx\r\n",
            expect_rcpt="250"):
    with Client(server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, f"MAIL FROM:<{sender}>", "250")
        for recipient in recipients:
            expect(client, f"RCPT TO:<{recipient}>", expect_rcpt)
        if expect_rcpt != "250":
            return None
        expect(client, "DATA", "354")
        client.send(text + b".\r\n")
        return client.reply()


def rcpt_code(server, address):
    """The code RCPT TO:<address> gets in a fresh transaction."""
    with Client(server.address) as client:
        client.command("EHLO client.example")
        client.command("MAIL FROM:<sender@example.org>")
        return client.code(f"RCPT TO:<{address}>")


def mailbox(server, address):
    return maildir_messages(server.config.maildir, address)


def test_an_alias_delivers_one_copy_to_each_with_its_delivered_to(tmp_path, start_server):
    server = routing_server(tmp_path, start_server)
    assert_reply(deliver(server, ["team@test.ru"]), "250 2.0.0")
    for user in ("alice", "bob"):
        [stored] = mailbox(server, f"{user}@test.ru")
        assert stored.startswith(b"Return-Path: <sender@example.org>\n"
                                 b"Delivered-To: %s@test.ru\nReceived: " % user.encode())


def test_aliases_of_aliases_and_one_copy_per_mailbox(tmp_path, start_server):
    server = routing_server(tmp_path, start_server)
    assert_reply(deliver(server, ["nested@test.ru", "alice@test.ru", "team@test.ru"]), "250")
    assert [len(mailbox(server, f"{user}@test.ru")) for user in ("alice", "bob", "dave")] == \
        [1, 1, 1]                       # alice: addressed directly, and twice through aliases
    [direct] = mailbox(server, "alice@test.ru")
    assert b"Delivered-To:" not in direct      # addressed directly: no Delivered-To


def test_suffixes_with_and_without_an_alias(tmp_path, start_server):
    server = routing_server(tmp_path, start_server)
    assert_reply(deliver(server, ["alice+lists@test.ru", "team+x@test.ru"]), "250")
    assert len(mailbox(server, "alice@test.ru")) == 1 and len(mailbox(server, "bob@test.ru")) == 1
    (tmp_path / "off").mkdir()
    off = routing_server(tmp_path / "off", start_server, **{"users.suffix_separators": ""})
    deliver(off, ["alice+lists@test.ru"], expect_rcpt="550 5.1.1")


def test_catch_all_unknown_names_and_postmaster(tmp_path, start_server):
    server = routing_server(tmp_path, start_server)
    assert_reply(deliver(server, ["anything@example.test", "postmaster@test.ru",
                                  "postmaster@example.test"]), "250")
    assert len(mailbox(server, "alice@test.ru")) == 1             # postmaster@test.ru
    assert len(mailbox(server, "alice@example.test")) == 1        # catch-all and postmaster
    deliver(server, ["nobody@test.ru"], expect_rcpt="550 5.1.1")  # no catch-all in test.ru
    deliver(server, ["ghost@test.ru"], expect_rcpt="550 5.1.1")   # an alias that leads nowhere
    assert "aliases file line 7: no target is a mailbox" in \
        (tmp_path / "logs" / "smtpd.log").read_text()


def test_vrfy_and_expn_never_show_an_expansion(tmp_path, start_server):
    server = routing_server(tmp_path, start_server)
    with Client(server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, "VRFY team", "252 2.5.2")
        expect(client, "EXPN team", "502 5.5.1")


def test_forwarding_rewrites_the_sender_and_a_bounce_finds_the_way_back(
        tmp_path, start_server):
    mx = FakeMX("127.0.0.1", rcpt=("550 5.1.1 no such user here",))
    try:
        server = routing_server(tmp_path, start_server, mx)
        assert_reply(deliver(server, ["carol@test.ru"], sender="bob@test.ru"), "250")
        assert wait_until(lambda: any(c.startswith("RCPT") for c in mx.commands))
        mail = next(command for command in mx.commands if command.startswith("MAIL"))
        assert mail.startswith("MAIL FROM:<SRS0=") and mail.split(">")[0].endswith("@test.ru")
        # the remote's 550 bounced to the rewritten sender, which leads back to bob
        bounce = wait_until(lambda: mailbox(server, "bob@test.ru"))
        report = email.message_from_bytes(bounce[0], policy=email.policy.default)
        assert report.get_content_type() == "multipart/report"
        assert "carol@remote.test" in bounce[0].decode()
    finally:
        mx.stop()


def test_a_forwarded_copy_carries_delivered_to_and_a_loop_is_refused(tmp_path, start_server):
    mx = FakeMX("127.0.0.1")
    try:
        server = routing_server(tmp_path, start_server, mx)
        assert_reply(deliver(server, ["carol@test.ru"]), "250")
        assert mx.wait_for(1)
        _, recipients, data = mx.messages[0]
        assert recipients == ["carol@remote.test"]
        assert data.startswith(b"Delivered-To: carol@test.ru\r\nReceived: from client.example")
        # the remote forwards it back: this server has delivered it to carol before
        reply = deliver(server, ["carol@test.ru"], text=data)
        assert_reply(reply, "554 5.4.6")
    finally:
        mx.stop()


def test_the_file_changed_while_the_server_runs(tmp_path, start_server):
    server = routing_server(tmp_path, start_server)
    deliver(server, ["friends@test.ru"], expect_rcpt="550 5.1.1")
    aliases = tmp_path / "aliases"
    aliases.write_text(ALIASES + "friends: bob\n")
    os.utime(aliases, ns=(time.time_ns() + 10**9,) * 2)
    assert wait_until(lambda: rcpt_code(server, "friends@test.ru") == 250, 5)
    aliases.write_text(ALIASES + "friends: again\nagain: friends\n")      # a loop: refused
    os.utime(aliases, ns=(time.time_ns() + 2 * 10**9,) * 2)
    log = tmp_path / "logs" / "smtpd.log"
    looped = "a loop: friends@test.ru -> again@test.ru -> friends@test.ru"
    # the file is looked at again when an address is looked up (at most once a second)
    assert wait_until(lambda: rcpt_code(server, "friends@test.ru") and
                      looped in log.read_text(), 5)
    assert_reply(deliver(server, ["friends@test.ru"]), "250")           # the old file holds


def test_a_loop_in_the_file_stops_the_start(tmp_path, start_server):
    with pytest.raises(AliasError, match="a loop: a@test.ru -> b@test.ru -> a@test.ru"):
        routing_server(tmp_path, start_server, aliases="a: b\nb: a\n")


def authenticated(server):
    client = Client(server.address)
    expect(client, "EHLO client.example", "250")
    login = base64.b64encode(f"\0alice@test.ru\0{PASSWORD}".encode()).decode()
    expect(client, f"AUTH PLAIN {login}", "235")
    return client


@pytest.mark.parametrize("sender, expected", [
    ("alice@test.ru", "250"), ("Alice+lists@test.ru", "250"), ("team@test.ru", "250"),
    ("", "250"), ("bob@test.ru", "553 5.7.1"), ("someone@example.org", "553 5.7.1"),
])
def test_an_authenticated_sender_is_who_it_says(tmp_path, start_server, sender, expected):
    server = routing_server(tmp_path, start_server)
    with authenticated(server) as client:
        expect(client, f"MAIL FROM:<{sender}>", expected)


def test_sender_login_match_off_and_unauthenticated_clients(tmp_path, start_server):
    server = routing_server(tmp_path, start_server, **{"auth.sender_login_match": "no"})
    with authenticated(server) as client:
        expect(client, "MAIL FROM:<bob@test.ru>", "250")
    (tmp_path / "strict").mkdir()
    strict = routing_server(tmp_path / "strict", start_server)
    with Client(strict.address) as client:                  # loopback, no AUTH: as before
        expect(client, "EHLO client.example", "250")
        expect(client, "MAIL FROM:<bob@test.ru>", "250")


# --- the file and the rewriting, on their own ---------------------------------------------


def test_read_aliases_refuses_what_cannot_work(tmp_path):
    path = tmp_path / "aliases"
    for text, problem in (("team alice\n", "line 1: not `name: target"),
                          ("x@remote.test: alice\n", "line 1: not `name: target"),
                          ("a: <bad>@\n", "line 1: a target is not"),
                          ("".join(f"a{n}: a{n + 1}\n" for n in range(11)), "deeper than 10")):
        path.write_text(text)
        with pytest.raises(AliasError, match=problem):
            read_aliases(str(path), ("test.ru",))


def test_the_rewritten_sender_is_ours_only():
    forwarder = Forwarder(b"k" * 32)
    sender = Address("bob", "example.org")
    rewritten = forwarder.rewrite(sender, "test.ru", now=1_800_000_000)
    assert rewritten.domain == "test.ru" and rewritten.local_part.startswith("SRS0=")
    assert forwarder.reverse(rewritten, now=1_800_000_000 + 86400) == sender
    assert Forwarder(b"x" * 32).reverse(rewritten, now=1_800_000_000) is None   # other key
    forged = Address(rewritten.local_part.replace("bob", "eve"), "test.ru")
    assert forwarder.reverse(forged, now=1_800_000_000) is None
    assert forwarder.reverse(rewritten, now=1_800_000_000 + 40 * 86400) is None  # too old
    assert forwarder.rewrite(Address("", ""), "test.ru").is_null                 # <> stays
