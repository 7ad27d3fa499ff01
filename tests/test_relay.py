"""The relay over the wire: a loopback DNS server, fake MXs on 127.0.0.x, bounces in Maildirs."""
import dataclasses
import email
import email.policy
import re
import smtplib

import pytest

import smtpd
from tests.conftest import config_sections, maildir_messages, make_config, write_config_file
from tests.queue_world import LoopbackWorld, a_record
from tests.waiting import wait_until


@pytest.fixture
def world(tmp_path, start_server):
    """The loopback world of tests/queue_world.py, and our server started against it."""
    world = LoopbackWorld()
    world.server = lambda **more: start_server(make_config(tmp_path, **world.overrides(**more)))
    yield world
    world.stop()


def send(server, recipients, sender="alice@test.ru", body=None, subject="relay test"):
    body = body or (f"From: <{sender}>\r\nSubject: {subject}\r\n\r\nHello over there.\r\n")
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.sendmail(sender, recipients, body)


def queue_empty(server):
    return not server.system.spool.names()


def dsn_for(tmp_path, address="alice@test.ru", timeout=15):
    found = wait_until(lambda: maildir_messages(tmp_path / "mail", address), timeout)
    assert found, f"no bounce arrived for {address}"
    return email.message_from_bytes(found[-1], policy=email.policy.default)


def delivery_status(report):
    """The per-recipient fields of a multipart/report DSN."""
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status_part = [part for part in report.iter_parts()
                   if part.get_content_type() == "message/delivery-status"][0]
    return status_part.get_payload()[1]


def test_delivery_through_the_mx(world, tmp_path):
    world.resolve({"remote.test": [("MX", "10 mx1.remote.test.")],
                   "mx1.remote.test": a_record("127.0.0.2")})
    mx = world.mx("127.0.0.2")
    server = world.server()
    send(server, ["bob@remote.test"])
    assert mx.wait_for(1)
    mail_from, rcpt_to, data = mx.messages[0]
    assert (mail_from, rcpt_to) == ("alice@test.ru", ["bob@remote.test"])
    # our own trace line first (smtplib's EHLO names the client as it likes)
    assert re.match(rb"Received: from \S+ \(\[127\.0\.0\.1\]\)\r\n"
                    rb"\tby mail\.test\.ru \(smtpd\) with ESMTP id [0-9a-f]{16}\r\n", data)
    assert data.endswith(b"Subject: relay test\r\n\r\nHello over there.\r\n")
    assert wait_until(lambda: queue_empty(server))
    log = (tmp_path / "logs" / "smtpd.log").read_text()
    assert "MX lookup for remote.test: 10 mx1.remote.test" in log
    assert f"127.0.0.2:{world.port} -> RCPT TO:<bob@remote.test>" in log


def test_preferred_mx_first_and_fallback_when_it_is_down(world):
    world.resolve({"remote.test": [("MX", "20 backup.remote.test."),
                                   ("MX", "10 primary.remote.test.")],
                   "primary.remote.test": a_record("127.0.0.3"),      # nothing listens
                   "backup.remote.test": a_record("127.0.0.4"),
                   "other.test": [("MX", "10 a.other.test."), ("MX", "20 b.other.test.")],
                   "a.other.test": a_record("127.0.0.5"),
                   "b.other.test": a_record("127.0.0.6")})
    backup = world.mx("127.0.0.4")
    preferred, second = world.mx("127.0.0.5"), world.mx("127.0.0.6")
    server = world.server()
    send(server, ["bob@remote.test"])
    assert backup.wait_for(1)
    send(server, ["carol@other.test"])
    assert preferred.wait_for(1)
    assert wait_until(lambda: queue_empty(server))
    assert second.sessions == 0


def test_a_4xx_greeting_moves_on_to_the_next_mx(world):
    world.resolve({"remote.test": [("MX", "10 busy.remote.test."), ("MX", "20 ok.remote.test.")],
                   "busy.remote.test": a_record("127.0.0.3"),
                   "ok.remote.test": a_record("127.0.0.4")})
    busy = world.mx("127.0.0.3", greeting="421 4.3.2 too busy")
    working = world.mx("127.0.0.4")
    server = world.server()
    send(server, ["bob@remote.test"])
    assert working.wait_for(1)
    assert busy.sessions == 1 and not busy.messages


def test_implicit_mx_when_the_domain_has_only_an_address(world):
    world.resolve({"remote.test": a_record("127.0.0.7")})
    mx = world.mx("127.0.0.7")
    server = world.server()
    send(server, ["bob@remote.test"])
    assert mx.wait_for(1)
    assert mx.messages[0][1] == ["bob@remote.test"]


def test_null_mx_bounces_at_once_with_5_1_10(world, tmp_path):
    world.resolve({"remote.test": [("MX", "0 .")]})
    server = world.server()
    send(server, ["bob@remote.test"])
    fields = delivery_status(dsn_for(tmp_path))
    assert fields["Final-Recipient"] == "rfc822; bob@remote.test"
    assert fields["Status"] == "5.1.10"
    assert wait_until(lambda: queue_empty(server))


def test_nxdomain_bounces(world, tmp_path):
    world.resolve({})
    server = world.server()
    send(server, ["bob@nowhere.test"])
    report = dsn_for(tmp_path)
    assert report["From"] == f"Mail Delivery System <MAILER-DAEMON@{server.config.hostname}>"
    assert delivery_status(report)["Status"] == "5.1.2"
    stored = maildir_messages(tmp_path / "mail", "alice@test.ru")[0]
    assert stored.startswith(b"Return-Path: <>\n")


@pytest.mark.parametrize("answer", ["SERVFAIL", "TIMEOUT"])
def test_dns_failure_is_temporary(world, answer):
    world.resolve({"remote.test": answer})
    server = world.server(**{"relay.connect_timeout": "0.5", "relay.retry": "3600"})
    send(server, ["bob@remote.test"])
    name = server.system.spool.names()[0]

    def attempted():
        record = server.system.spool.read_state(name)
        return record and record["recipients"]["bob@remote.test"]["attempts"] == 1 and record

    record = wait_until(attempted)
    recipient = record["recipients"]["bob@remote.test"]
    assert recipient["status"] == "pending"
    assert recipient["last_error"].startswith("451 4.4.3")


@pytest.mark.parametrize("first_reply, logged", [
    ("450 4.2.1 try later", "<bob@remote.test>: pending: 450 4.2.1 try later"),
    ("CLOSE", "<bob@remote.test>: pending: 451 4.4.2 remote closed the connection"),
], ids=["450-then-250", "connection-lost-after-MAIL"])
def test_temporary_failure_then_success(world, tmp_path, first_reply, logged):
    world.resolve({"remote.test": a_record("127.0.0.2")})
    mx = world.mx("127.0.0.2", rcpt=[first_reply, "250 2.1.5 ok"])
    server = world.server()
    send(server, ["bob@remote.test"])
    assert mx.wait_for(1)
    assert mx.sessions == 2
    assert wait_until(lambda: queue_empty(server))
    assert maildir_messages(tmp_path / "mail", "alice@test.ru") == []   # no bounce
    assert logged in (tmp_path / "logs" / "smtpd.log").read_text()


def test_permanent_failure_bounces_with_the_original_headers(world, tmp_path):
    world.resolve({"remote.test": a_record("127.0.0.2")})
    world.mx("127.0.0.2", rcpt=["550 5.1.1 no such user here"])
    server = world.server()
    send(server, ["nobody@remote.test"], subject="will bounce")
    report = dsn_for(tmp_path)
    assert report["To"].addresses[0].addr_spec == "alice@test.ru"
    fields = delivery_status(report)
    assert fields["Status"] == "5.1.1"
    assert "550 5.1.1 no such user here" in fields["Diagnostic-Code"]
    headers = [part for part in report.iter_parts()
               if part.get_content_type() == "text/rfc822-headers"][0]
    assert "Subject: will bounce" in headers.get_content()
    assert wait_until(lambda: queue_empty(server))


def test_too_old_message_bounces(world, tmp_path):
    world.resolve({"remote.test": a_record("127.0.0.2")})
    mx = world.mx("127.0.0.2", rcpt=["451 4.3.0 always busy"])
    server = world.server(**{"relay.max_queue_age": "1", "relay.retry": "1"})
    send(server, ["bob@remote.test"])
    fields = delivery_status(dsn_for(tmp_path))
    assert fields["Status"] == "4.3.0"
    assert "gave up" in fields["Diagnostic-Code"]
    assert mx.sessions >= 2 and not mx.messages
    assert wait_until(lambda: queue_empty(server))


def test_no_bounce_for_the_null_sender(world, tmp_path):
    world.resolve({"remote.test": a_record("127.0.0.2")})
    mx = world.mx("127.0.0.2", rcpt=["550 5.1.1 no"])
    server = world.server()
    send(server, ["bob@remote.test"], sender="")
    assert wait_until(lambda: queue_empty(server))
    assert mx.sessions == 1
    log = (tmp_path / "logs" / "smtpd.log").read_text()
    assert "not bounced: the sender is <>" in log
    assert maildir_messages(tmp_path / "mail", "postmaster@test.ru") == []
    assert maildir_messages(tmp_path / "mail", "alice@test.ru") == []


def test_recipients_of_one_domain_share_one_transaction(world):
    world.resolve({"remote.test": a_record("127.0.0.2"), "other.test": a_record("127.0.0.3")})
    remote, other = world.mx("127.0.0.2"), world.mx("127.0.0.3")
    server = world.server()
    send(server, ["a@remote.test", "b@remote.test", "c@remote.test", "d@other.test"])
    assert remote.wait_for(1) and other.wait_for(1)
    assert remote.sessions == 1
    assert remote.messages[0][1] == ["a@remote.test", "b@remote.test", "c@remote.test"]
    assert other.messages[0][1] == ["d@other.test"]


def test_a_local_and_a_remote_recipient(world, tmp_path):
    world.resolve({"remote.test": a_record("127.0.0.2")})
    mx = world.mx("127.0.0.2")
    server = world.server()
    send(server, ["bob@test.ru", "carol@remote.test"])
    assert mx.wait_for(1)
    assert mx.messages[0][1] == ["carol@remote.test"]
    assert len(maildir_messages(tmp_path / "mail", "bob@test.ru")) == 1


def test_200_messages_to_5_domains(world):
    domains = [f"d{n}.test" for n in range(5)]
    world.resolve({domain: a_record(f"127.0.0.{10 + n}") for n, domain in enumerate(domains)})
    mxs = [world.mx(f"127.0.0.{10 + n}") for n in range(5)]
    server = world.server(**{"relay.workers": "8"})
    with smtplib.SMTP(*server.address, timeout=10) as client:
        for number in range(200):
            domain = domains[number % 5]
            client.sendmail("alice@test.ru", [f"user{number}@{domain}"],
                            f"Subject: message {number}\r\n\r\nbody {number}\r\n")
    assert all(mx.wait_for(40, timeout=30) for mx in mxs)
    assert wait_until(lambda: queue_empty(server))
    subjects = sorted(data.split(b"\r\n\r\n")[0].split(b"Subject: ")[1]
                      for mx in mxs for _, _, data in mx.messages)
    assert subjects == sorted(f"message {n}".encode() for n in range(200))


def test_our_own_server_as_the_remote_mx(world, tmp_path, start_server):
    world.resolve({"remote.test": [("MX", "10 mx.remote.test.")],
                   "mx.remote.test": a_record("127.0.0.2")})
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    remote_config = make_config(remote_dir, users=("bob",), ip="127.0.0.2",
                                **{"domains.local": "remote.test",
                                   "server.hostname": "mx.remote.test"})
    remote_config = dataclasses.replace(remote_config, port=world.port)
    start_server(remote_config)
    server = world.server()
    send(server, ["bob@remote.test"], body="Subject: across\r\n\r\n.leading dot\r\n")
    stored = wait_until(lambda: maildir_messages(remote_dir / "mail", "bob@remote.test"))
    assert stored[0].startswith(b"Return-Path: <alice@test.ru>\nReceived: from mail.test.ru")
    assert stored[0].endswith(b"Subject: across\n\n.leading dot\n")
    assert stored[0].count(b"Received: ") == 2


def test_queue_listing_and_flush_without_a_server(world, tmp_path, capsys):
    world.resolve({"remote.test": a_record("127.0.0.2")})
    sections = config_sections(tmp_path, **world.overrides(**{"relay.retry": "3600"}))
    config_file = write_config_file(tmp_path / "smtpd.conf", sections)
    server = world.server(**{"relay.retry": "3600"})
    send(server, ["bob@remote.test"])                 # refused: nothing listens yet
    name = server.system.spool.names()[0]
    assert wait_until(lambda: server.system.spool.read_state(name))
    server.stop(grace=1)

    assert smtpd.main(["--config", config_file, "--queue"]) == 0
    listing = capsys.readouterr().out
    assert "from <alice@test.ru>" in listing
    assert "<bob@remote.test>  pending, 1 attempt(s), next in 59m" in listing
    assert "last error: 451 4.4.1" in listing

    mx = world.mx("127.0.0.2")
    assert smtpd.main(["--config", config_file, "--flush"]) == 0
    assert len(mx.messages) == 1
    assert "Mail queue is empty" in capsys.readouterr().out


def test_relay_uses_starttls_when_the_mx_offers_it(world, tmp_path, start_server, certificate):
    world.resolve({"remote.test": a_record("127.0.0.2")})
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    cert, key = certificate
    remote_config = make_config(remote_dir, users=("bob",), ip="127.0.0.2",
                                **{"domains.local": "remote.test", "tls.cert": cert,
                                   "tls.key": key})
    start_server(dataclasses.replace(remote_config, port=world.port))
    server = world.server(**{"relay.tls": "require"})
    send(server, ["bob@remote.test"])
    assert wait_until(lambda: maildir_messages(remote_dir / "mail", "bob@remote.test"))
    log = (tmp_path / "logs" / "smtpd.log").read_text()
    assert f"127.0.0.2:{world.port} -> STARTTLS" in log
    assert "TLS established: TLSv1.3" in log
    assert "TLS established" in (remote_dir / "logs" / "smtpd.log").read_text()


def test_tls_required_but_not_offered_keeps_the_mail_queued(world):
    world.resolve({"remote.test": a_record("127.0.0.2")})
    mx = world.mx("127.0.0.2")                  # offers no STARTTLS
    server = world.server(**{"relay.tls": "require", "relay.retry": "3600"})
    send(server, ["bob@remote.test"])
    name = server.system.spool.names()[0]
    record = wait_until(lambda: server.system.spool.read_state(name))
    recipient = record["recipients"]["bob@remote.test"]
    assert recipient["status"] == "pending"
    assert recipient["last_error"].startswith("451 4.7.10")
    assert not mx.messages


def test_a_failed_handshake_falls_back_to_clear_text(world, tmp_path):
    world.resolve({"remote.test": a_record("127.0.0.2")})
    # offers STARTTLS, answers 220, then speaks clear text: the handshake fails
    mx = world.mx("127.0.0.2", ehlo=("250-fake.mx", "250 STARTTLS"))
    server = world.server()
    send(server, ["bob@remote.test"])
    assert mx.wait_for(1)
    log = (tmp_path / "logs" / "smtpd.log").read_text()
    assert "TLS handshake with" in log and "trying again in clear text" in log


def test_relay_trace_shows_the_mx_answer_and_the_next_hops(world, tmp_path):
    world.resolve({"remote.test": [("MX", "10 mx1.remote.test.")],
                   "mx1.remote.test": a_record("127.0.0.2")})
    mx = world.mx("127.0.0.2", rcpt=["450 4.2.1 later", "250 2.1.5 ok"])
    server = world.server(**{"log.trace": "yes"})
    send(server, ["bob@remote.test"])
    assert mx.wait_for(1)
    log = (tmp_path / "logs" / "smtpd.log").read_text()
    assert "MX lookup for remote.test: 10 mx1.remote.test" in log
    assert f"next hops for remote.test, in order: 127.0.0.2:{world.port} (RFC 5321 5.1)" in log
    assert "<bob@remote.test> retried in 1s (RFC 5321 4.5.4.1)" in log


def test_a_bounce_for_a_message_with_8bit_headers(world, tmp_path):
    """Raw UTF-8 in the original headers must not stop the DSN (nor lose the message)."""
    world.resolve({"remote.test": a_record("127.0.0.2")})
    world.mx("127.0.0.2", rcpt=["550 5.1.1 no such user"])
    server = world.server()
    with smtplib.SMTP(*server.address, timeout=10) as client:
        client.ehlo("client.example")
        client.sendmail("alice@test.ru", ["nobody@remote.test"],
                        "Subject: Привет\r\n\r\nbody\r\n".encode(), mail_options=["BODY=8BITMIME"])
    fields = delivery_status(dsn_for(tmp_path))
    assert fields["Status"] == "5.1.1"
    assert wait_until(lambda: queue_empty(server))
