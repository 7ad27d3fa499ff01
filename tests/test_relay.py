"""The relay over the wire: a loopback DNS server, fake MXs on 127.0.0.x, bounces in Maildirs;
MTA-STS against a loopback HTTPS policy host and a test CA, the TLS memory, DKIM sent."""
import dataclasses
import email
import email.policy
import json
import re
import smtplib

import pytest

import commands
import mtasts
import smtpd
from relay import Transaction
from resolver import Resolver
from tests.conftest import config_sections, maildir_messages, make_config, write_config_file
from tests.fake_mx import ehlo_offering
from tests.pki import pki_fixture, self_signed, server_context
from tests.policy_server import PolicyServer, policy_text
from tests.queue_world import LoopbackWorld, a_record, make_log, make_spool, write_spool
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


# ---------------------------------------------------------------------------------------
# Issue 15 on the way out: MTA-STS (RFC 8461), the TLS memory, DKIM signatures sent

pki_ca = pki_fixture                    # the `pki` fixture: the loopback test CA
POLICY_IP = "127.0.0.20"
STS_ID = "20261202"


def sts_zone(mx_hosts, policy_id=STS_ID):
    """remote.test with MX records {name: (preference, ip)}, an MTA-STS TXT record and the
    policy host's address."""
    records = {"remote.test": [("MX", f"{preference} {name}.")
                               for name, (preference, _) in mx_hosts.items()],
               "mta-sts.remote.test": a_record(POLICY_IP)}
    if policy_id:
        records["_mta-sts.remote.test"] = [("TXT", f'"v=STSv1; id={policy_id}"')]
    for name, (_, ip) in mx_hosts.items():
        records[name] = a_record(ip)
    return records


@pytest.fixture
def policy_host(pki, monkeypatch):
    """policy_host(body) -> a PolicyServer for mta-sts.remote.test, HTTPS_PORT pointed at it."""
    servers = []

    def start(body):
        server = PolicyServer(POLICY_IP, server_context(*pki.leaf("mta-sts.remote.test")), body)
        monkeypatch.setattr(mtasts, "HTTPS_PORT", server.port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def tls_mx(world, pki, ip, name="mx1.remote.test", cert=None, **script):
    """A FakeMX on `ip` offering STARTTLS with a certificate for `name` from the test CA
    (or `cert`)."""
    context = server_context(*(cert or pki.leaf(name)))
    return world.mx(ip, ehlo=ehlo_offering("STARTTLS"), tls_context=context, **script)


def tls_server(world, pki, **more):
    return world.server(**{"relay.ca_file": pki.cert_file, "log.trace": "yes", **more})


def tls_memory(tmp_path):
    path = tmp_path / "spool" / "tls-domains.json"
    return json.loads(path.read_text()) if path.exists() else {}


def logged(tmp_path, text, timeout=15):
    return wait_until(lambda: text in (tmp_path / "logs" / "smtpd.log").read_text(), timeout)


def test_mta_sts_enforce_delivers_over_verified_tls(world, pki, policy_host, tmp_path):
    world.resolve(sts_zone({"mx1.remote.test": (10, "127.0.0.2")}))
    policy = policy_host(policy_text("enforce", ["mx1.remote.test"]))
    mx = tls_mx(world, pki, "127.0.0.2")
    server = tls_server(world, pki)
    send(server, ["bob@remote.test"])
    assert mx.wait_for(1)
    assert mx.tls == [True] and mx.messages[0][1] == ["bob@remote.test"]
    assert wait_until(lambda: queue_empty(server))
    assert len(policy.requests) == 1
    assert "certificate valid for mx1.remote.test" in (tmp_path / "logs" / "smtpd.log").read_text()
    assert wait_until(lambda: tls_memory(tmp_path).get("remote.test", {}).get("level")
                      == "verified")
    send(server, ["carol@remote.test"])          # the cached policy: not fetched again
    assert mx.wait_for(1)
    assert len(policy.requests) == 1 and mx.tls == [True, True]


@pytest.mark.parametrize("certificate", ["self-signed", "another name"])
def test_mta_sts_enforce_with_a_bad_certificate_is_a_4xx_and_the_mail_waits(
        world, pki, policy_host, tmp_path, certificate):
    world.resolve(sts_zone({"mx1.remote.test": (10, "127.0.0.2")}))
    policy_host(policy_text("enforce", ["mx1.remote.test"]))
    cert = self_signed(pki.directory, "mx1.remote.test") if certificate == "self-signed" \
        else pki.leaf("mx9.elsewhere.test")
    mx = tls_mx(world, pki, "127.0.0.2", cert=cert)
    server = tls_server(world, pki)
    send(server, ["bob@remote.test"])
    assert logged(tmp_path, "<bob@remote.test>: pending: 451 4.7.5 MTA-STS policy of "
                            "remote.test (mode enforce) requires TLS with a certificate valid "
                            "for mx1.remote.test")
    assert mx.messages == [] and mx.handshakes == 0
    assert server.system.spool.names()              # kept in the queue, no bounce
    assert maildir_messages(tmp_path / "mail", "alice@test.ru") == []
    assert not any(line.startswith("MAIL") for line in mx.commands)


def test_mta_sts_enforce_skips_an_mx_the_policy_does_not_name(world, pki, policy_host,
                                                              tmp_path):
    world.resolve(sts_zone({"rogue.remote.test": (5, "127.0.0.3"),
                            "mx1.remote.test": (10, "127.0.0.2")}))
    policy_host(policy_text("enforce", ["mx1.remote.test"]))
    rogue = tls_mx(world, pki, "127.0.0.3", name="rogue.remote.test")
    mx = tls_mx(world, pki, "127.0.0.2")
    server = tls_server(world, pki)
    send(server, ["bob@remote.test"])
    assert mx.wait_for(1)
    assert rogue.sessions == 0
    assert logged(tmp_path, "MTA-STS enforce: skipping rogue.remote.test (127.0.0.3:"
                            f"{world.port}) is not an MX host of the MTA-STS policy of "
                            "remote.test")
    assert "RFC 8461 4.1" in (tmp_path / "logs" / "smtpd.log").read_text()


def test_mta_sts_testing_delivers_and_logs_what_would_have_failed(world, pki, policy_host,
                                                                 tmp_path):
    world.resolve(sts_zone({"mx1.remote.test": (10, "127.0.0.2")}))
    policy_host(policy_text("testing", ["mx1.remote.test"]))
    mx = tls_mx(world, pki, "127.0.0.2", cert=self_signed(pki.directory, "mx1.remote.test"))
    server = tls_server(world, pki)
    send(server, ["bob@remote.test"])
    assert mx.wait_for(1)
    assert mx.tls == [True]                         # opportunistic TLS, as before
    assert logged(tmp_path, "MTA-STS testing: mx1.remote.test (127.0.0.2:"
                            f"{world.port}) would have failed: TLS with an unchecked "
                            "certificate instead of a certificate valid for it (RFC 8461 5")
    assert wait_until(lambda: tls_memory(tmp_path).get("remote.test", {}).get("level")
                      == "tls")


def test_mta_sts_does_not_apply_to_a_static_route(world, pki, policy_host, tmp_path):
    world.resolve(sts_zone({"mx1.remote.test": (10, "127.0.0.2")}))
    policy = policy_host(policy_text("enforce", ["mx1.remote.test"]))
    mx = world.mx("127.0.0.4")                      # no STARTTLS at all
    server = tls_server(world, pki, **{"relay.routes": f"remote.test=127.0.0.4:{world.port}"})
    send(server, ["bob@remote.test"])
    assert mx.wait_for(1)
    assert policy.requests == []


def test_mta_sts_off_fetches_nothing_and_remembers_nothing(world, pki, policy_host, tmp_path):
    world.resolve(sts_zone({"mx1.remote.test": (10, "127.0.0.2")}))
    policy = policy_host(policy_text("enforce", ["mx1.remote.test"]))
    mx = tls_mx(world, pki, "127.0.0.2", cert=self_signed(pki.directory, "mx1.remote.test"))
    server = tls_server(world, pki, **{"relay.mta_sts": "no"})
    send(server, ["bob@remote.test"])
    assert mx.wait_for(1)
    assert policy.requests == [] and tls_memory(tmp_path) == {}


@pytest.mark.parametrize("later", ["no STARTTLS", "self-signed"])
def test_tls_memory_refuses_a_downgrade_with_a_4xx(world, pki, tmp_path, later):
    dns = world.resolve(sts_zone({"mx1.remote.test": (10, "127.0.0.2")}, policy_id=None))
    first = tls_mx(world, pki, "127.0.0.2")
    server = tls_server(world, pki)
    send(server, ["bob@remote.test"])
    assert first.wait_for(1) and first.tls == [True]
    assert wait_until(lambda: tls_memory(tmp_path).get("remote.test", {}).get("level")
                      == "verified")
    # the domain's mail now goes to another host that offers less
    dns.records["remote.test"] = [("MX", "10 mx2.remote.test.")]
    dns.records["mx2.remote.test"] = a_record("127.0.0.3")
    second = world.mx("127.0.0.3") if later == "no STARTTLS" else \
        tls_mx(world, pki, "127.0.0.3", name="mx2.remote.test",
               cert=self_signed(pki.directory, "mx2.remote.test"))
    send(server, ["carol@remote.test"])
    assert logged(tmp_path, "<carol@remote.test>: pending: 451 4.7.5 remote.test has taken "
                            "mail over verified TLS before; refusing to downgrade")
    assert second.messages == [] and server.system.spool.names()
    assert not any(line.startswith("MAIL") for line in second.commands)


def test_tls_domains_and_queue_listings(world, pki, policy_host, tmp_path, capsys):
    world.resolve(sts_zone({"mx1.remote.test": (10, "127.0.0.2")}))
    policy_host(policy_text("enforce", ["mx1.remote.test"], max_age=86400))
    mx = tls_mx(world, pki, "127.0.0.2", rcpt=["250 2.1.5 ok", "450 4.2.0 later"])
    server = tls_server(world, pki)
    send(server, ["bob@remote.test", "carol@remote.test"])
    assert mx.wait_for(1)
    assert logged(tmp_path, "<carol@remote.test>: pending")
    assert wait_until(lambda: tls_memory(tmp_path).get("remote.test", {}).get("level")
                      == "verified")
    config = server.system.config
    assert commands.show_tls_domains(config) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"remote\.test  verified since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  "
                        rf"MTA-STS enforce id {STS_ID} expires in (23|24)h "
                        r"\(mx mx1\.remote\.test\)", lines[0]), lines[0]
    assert commands.show_queue(config) == 0
    listing = capsys.readouterr().out
    assert "TLS of the queued domains" in listing and "    remote.test  verified" in listing


def test_show_tls_domains_with_nothing_remembered(tmp_path, capsys):
    assert commands.show_tls_domains(make_config(tmp_path)) == 0
    assert capsys.readouterr().out == "No domain has a TLS record or an MTA-STS policy yet\n"


class StubSigner:
    """dkimsign.Signer's interface: records what it was given to sign."""
    HEADER = b"DKIM-Signature: v=1; a=rsa-sha256; d=test.ru; s=s1;\r\n\tb=c3R1Yg==\r\n"

    def __init__(self):
        self.signed = []

    def sign(self, message, reverse_path_domain):
        self.signed.append((message, reverse_path_domain))
        return self.HEADER


STUFFED_TEXT = b"From: <alice@test.ru>\r\nSubject: dots\r\n\r\n.leading dot\r\n..two\r\nend\r\n"


@pytest.mark.parametrize("chunking", [False, True])
def test_a_dkim_signature_goes_before_the_text(world, tmp_path, chunking):
    mx = world.mx("127.0.0.2", ehlo=ehlo_offering(*(["CHUNKING"] if chunking else [])))
    config = make_config(tmp_path, **{"relay.routes": f"remote.test=127.0.0.2:{world.port}"})
    log = make_log(tmp_path)
    spool = make_spool(tmp_path)
    message = spool.read(write_spool(spool, ["bob@remote.test"], text=STUFFED_TEXT))
    signer = StubSigner()
    reports = []
    Transaction(config, Resolver(config, log), log, message, "remote.test",
                list(message.recipients), reports.append, signer=signer).run()
    assert mx.wait_for(1)
    # signed: the message as sent, the stuffing undone (RFC 5321 4.5.2)
    assert signer.signed == [(STUFFED_TEXT, "test.ru")]
    assert mx.messages[0][2] == StubSigner.HEADER + STUFFED_TEXT
    if chunking:
        assert mx.chunks[0][1].startswith(StubSigner.HEADER + b"From: <alice@test.ru>")
    else:
        assert not mx.chunks
    size = len(StubSigner.HEADER) + message.text_size
    assert any(line.startswith("MAIL") and f"SIZE={size}" in line for line in mx.commands)


def test_mail_of_another_domain_is_not_signed(world, tmp_path):
    mx = world.mx("127.0.0.2")
    config = make_config(tmp_path, **{"relay.routes": f"remote.test=127.0.0.2:{world.port}"})
    log = make_log(tmp_path)
    spool = make_spool(tmp_path)
    message = spool.read(write_spool(spool, ["bob@remote.test"], sender="eve@elsewhere.test"))
    signer = StubSigner()
    Transaction(config, Resolver(config, log), log, message, "remote.test",
                list(message.recipients), lambda outcomes: None, signer=signer).run()
    assert mx.wait_for(1)
    assert signer.signed == [] and not mx.messages[0][2].startswith(b"DKIM-Signature")
