"""Issue 15 the way users run it: the real `python smtpd.py`, as root with the drop to nobody.

On the way out: `--dkim-keygen` makes a key and prints its record; the running server signs
what it relays with it (the key file is root's, 0600: it is read before the drop), and the
signature verifies against the record printed. On the way in: SPF, DKIM and DMARC against a
loopback DNS zone, with `[checks]` enforced: the replies on the wire, and the
Authentication-Results in the Maildir file (or the file in `.Junk/`).

The relay networks are set to 192.0.2.0/24 where mail must be checked: the tests connect
from 127.0.0.1, which is then an outside client.
"""
import os
import pathlib
import re
import stat

import dkim
import pytest

from tests.daemon import Sandbox, is_root, require_root
from tests.fake_mx import ehlo_offering
from tests.pki import pki_fixture, self_signed, server_context
from tests.policy_server import PolicyServer, policy_text
from tests.test_daemon import route, send, text
from tests.waiting import wait_until
from tests.wire import Client

OUTSIDE = {"relay.networks": "192.0.2.0/24"}        # 127.0.0.1 is not a relay client
ENFORCE = {"checks.spf": "enforce", "checks.dkim": "enforce", "checks.dmarc": "enforce"}
pki = pki_fixture                   # the session's test CA (tests/pki.py)
HOSTNAME = "mail.test.ru"                           # [server] hostname, the authserv-id


@pytest.fixture
def sandbox():
    box = Sandbox()
    yield box
    box.cleanup()


def published_record(output):
    """(name, value) of the TXT record --dkim-keygen printed: `name IN TXT ( "..." "..." )`
    or `name TXT "..."`, its quoted strings joined (RFC 1035 5.1)."""
    match = re.search(r"^(\S+)\s+(?:\d+\s+)?(?:IN\s+)?TXT\s+(.*?)$", output, re.M | re.S)
    assert match, output
    strings = re.findall(r'"((?:[^"\\]|\\.)*)"', match.group(2))
    assert strings, output
    return match.group(1).rstrip("."), "".join(strings)


def keygen(sandbox, domain="test.ru", selector="s2"):
    """`python smtpd.py --dkim-keygen DOMAIN --selector S`: (key path, record name, value)."""
    rc, out, err = sandbox.run_cli("--dkim-keygen", domain, "--selector", selector)
    assert rc == 0, out + err
    key = sandbox.path("dkim", f"{domain}.{selector}.pem")
    name, value = published_record(out)
    return key, name, value


def txt_lookup(records):
    """dkimpy's dnsfunc over a dict {name: TXT value} (the test's own, not the server's)."""
    def dnsfunc(name, timeout=5):
        return records.get(name.decode().rstrip(".").lower(), "").encode()
    return dnsfunc


def header_fields(raw, name):
    """The values of every `name:` field of a stored message (unfolded)."""
    head = raw.split(b"\n\n", 1)[0].decode("utf-8", "replace")
    unfolded = re.sub(r"\n[ \t]+", " ", head)
    prefix = name.lower() + ":"
    return [line[len(prefix):].strip() for line in unfolded.split("\n")
            if line.lower().startswith(prefix)]


# ---------------------------------------------------------------------------------------
# On the way out


def test_dkim_keygen_writes_a_private_key_and_prints_the_record_to_publish(sandbox):
    key, name, value = keygen(sandbox)
    assert name == "s2._domainkey.test.ru"
    assert value.startswith("v=DKIM1;") and "k=rsa" in value and re.search(r"p=[A-Za-z0-9+/=]{300,}", value)
    mode = stat.S_IMODE(os.stat(key).st_mode)
    assert mode == 0o600, oct(mode)
    rc, out, err = sandbox.run_cli("--dkim-keygen", "test.ru", "--selector", "s2")
    assert rc != 0 and len((out + err).strip().splitlines()) == 1, out + err
    assert key in out + err                         # the refusal names the file it keeps
    rotated, _, new_value = keygen(sandbox, selector="s3")   # a new key beside the old
    assert rotated != key and new_value != value
    rc, out, err = sandbox.run_cli("--selector", "s2")      # not a server with a selector
    assert rc == 2 and (out + err).strip() == "smtpd: --selector: only with --dkim-keygen " \
        "(see --help)", out + err


def test_relayed_mail_is_signed_with_the_key_and_verifies_against_the_record(sandbox):
    require_root("the key is root's 0600 file, read before the drop to nobody")
    key, name, value = keygen(sandbox)
    assert os.stat(key).st_uid == 0
    mx = sandbox.mx("127.0.0.2")
    server = sandbox.start({"relay.routes": route("remote.test", mx),
                            "dkim.keys": f"test.ru=s2:{key}"})
    message = ("From: Alice <alice@test.ru>\r\nTo: bob@remote.test\r\nSubject: signed\r\n"
               "Date: Wed, 02 Dec 2026 12:00:00 +0000\r\nMessage-ID: <1@test.ru>\r\n\r\n"
               "hello\r\n..a line that was dot-stuffed\r\n.\r\n")
    code, lines = send(server, "alice@test.ru", ["bob@remote.test"], message)
    assert code == 250, lines
    assert mx.wait_for(1, timeout=15), sandbox.log_text()[-2000:]
    data = mx.messages[0][2]
    data = data.encode() if isinstance(data, str) else data
    assert data.startswith(b"DKIM-Signature:"), data[:300]
    assert b"\r\n.a line that was dot-stuffed\r\n" in data
    signature = header_fields(data.replace(b"\r\n", b"\n"), "DKIM-Signature")[0]
    assert "d=test.ru" in signature.replace(" ", "") and "s=s2" in signature.replace(" ", "")
    assert dkim.verify(data, dnsfunc=txt_lookup({name: value}))
    tampered = data.replace(b"hello", b"hellO")
    assert not dkim.verify(tampered, dnsfunc=txt_lookup({name: value}))
    assert server.stop() == 0


def test_a_key_the_server_cannot_use_stops_it_with_one_line(sandbox):
    bad = sandbox.write_file(sandbox.path("bad.pem"), "not a key\n", mode=0o600)
    code, stderr = sandbox.start_expecting_exit({"dkim.keys": f"test.ru={bad}"})
    assert code != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and bad in lines[0] and "Traceback" not in stderr, stderr


# ---------------------------------------------------------------------------------------
# On the way in


def signed_by(domain, selector, key_pem, subject="checked", from_domain=None):
    """A message from `from_domain` (default `domain`) signed by dkimpy with `key_pem` as
    d=`domain`, with its terminator for after 354."""
    from_domain = from_domain or domain
    message = (f"From: someone@{from_domain}\r\nTo: alice@test.ru\r\nSubject: {subject}\r\n"
               "Date: Wed, 02 Dec 2026 12:00:00 +0000\r\n"
               f"Message-ID: <{subject}@{from_domain}>\r\n\r\nhello\r\n").encode()
    header = dkim.sign(message, selector.encode(), domain.encode(), key_pem,
                       include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return (header + message).decode() + ".\r\n"


@pytest.fixture(scope="module")
def sender_key(tmp_path_factory):
    """An RSA key of the sending domains (made with openssl, as --dkim-keygen does) and its
    public key as a DKIM record value."""
    box = Sandbox(users=())
    try:
        _, _, value = keygen(box, "sender.test", "k1")
        with open(box.path("dkim", "sender.test.k1.pem"), "rb") as pem:
            return pem.read(), value
    finally:
        box.cleanup()


def zone(public_value):
    """The loopback zone: good.test (SPF pass for 127.0.0.1, DMARC reject, a DKIM key),
    evil.test (SPF -all), quarantined.test (SPF ?all, DMARC quarantine), slow.test (TXT
    times out)."""
    return {
        "good.test": {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
        "k1._domainkey.good.test": {"TXT": [_quoted(public_value)]},
        "_dmarc.good.test": {"TXT": ['"v=DMARC1; p=reject"']},
        "evil.test": {"TXT": ['"v=spf1 -all"']},
        "quarantined.test": {"TXT": ['"v=spf1 ?all"']},
        "_dmarc.quarantined.test": {"TXT": ['"v=DMARC1; p=quarantine"']},
        "rejecting.test": {"TXT": ['"v=spf1 ?all"']},
        "_dmarc.rejecting.test": {"TXT": ['"v=DMARC1; p=reject"']},
        "slow.test": {"TXT": "TIMEOUT"},
    }


def _quoted(value):
    """A TXT value in zone-file form: quoted strings of at most 255 octets."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


def start_checking(sandbox, public_value, checks=ENFORCE):
    dns = sandbox.dns(zone(public_value))
    return sandbox.start({**OUTSIDE, **checks, "relay.nameservers": dns.nameserver,
                          "checks.dns_timeout": "1"})


def test_spf_fail_enforced_is_refused_at_rcpt(sandbox, sender_key):
    server = start_checking(sandbox, sender_key[1])
    with Client(server.address) as client:
        client.command("EHLO client.example")
        assert client.command("MAIL FROM:<someone@evil.test>")[0] == 250
        code, lines = client.command("RCPT TO:<alice@test.ru>")
        assert code == 550 and lines[-1][4:].startswith("5.7.23"), lines
        assert "evil.test" in lines[-1]
    assert sandbox.maildir_messages("alice@test.ru") == []
    assert server.stop() == 0


def test_a_dns_timeout_enforced_is_a_451(sandbox, sender_key):
    server = start_checking(sandbox, sender_key[1])
    with Client(server.address) as client:
        client.command("EHLO client.example")
        client.command("MAIL FROM:<someone@slow.test>")
        code, lines = client.command("RCPT TO:<alice@test.ru>")
        assert code == 451 and lines[-1][4:].startswith("4.7.24"), lines
        assert "timed out" in lines[-1] and "127.0.0.1" not in lines[-1], lines  # no internals
    assert server.stop() == 0


def test_aligned_signed_mail_passes_and_carries_one_authentication_results(sandbox, sender_key):
    pem, value = sender_key
    server = start_checking(sandbox, value)
    forged = f"Authentication-Results: {HOSTNAME}; dkim=pass header.d=evil.test\r\n"
    theirs = "Authentication-Results: mx.elsewhere.test; spf=fail\r\n"
    message = forged + theirs + signed_by("good.test", "k1", pem, "aligned")
    code, lines = send(server, "someone@good.test", ["alice@test.ru"], message)
    assert code == 250, lines
    stored = sandbox.wait_for_messages("alice@test.ru")[0]
    results = [value for value in header_fields(stored, "Authentication-Results")
               if value.lower().startswith(HOSTNAME)]
    assert len(results) == 1, stored[:1500]
    verdict = results[0].replace("\n", " ")
    assert re.search(r"\bspf=pass\b", verdict) and re.search(r"\bdkim=pass\b", verdict), verdict
    assert re.search(r"\bdmarc=pass\b", verdict) and "header.d=good.test" in verdict, verdict
    assert "header.d=evil.test" not in stored.decode()          # the forged one is gone
    assert any(value.startswith("mx.elsewhere.test") for value in
               header_fields(stored, "Authentication-Results"))   # another's is kept
    assert header_fields(stored, "Received-SPF")[0].lower().startswith("pass")
    assert server.stop() == 0


def test_dmarc_reject_enforced_is_a_550_after_the_text(sandbox, sender_key):
    pem, value = sender_key
    server = start_checking(sandbox, value)
    # SPF neutral, and signed by good.test: not aligned with rejecting.test (RFC 7489 3.1)
    message = signed_by("good.test", "k1", pem, "unaligned", from_domain="rejecting.test")
    code, lines = send(server, "someone@rejecting.test", ["alice@test.ru"], message)
    assert code == 550 and lines[-1][4:].startswith("5.7.1"), lines
    assert sandbox.maildir_messages("alice@test.ru") == []
    assert server.stop() == 0


def test_dmarc_quarantine_enforced_lands_in_junk(sandbox, sender_key):
    server = start_checking(sandbox, sender_key[1])
    code, lines = send(server, "someone@quarantined.test", ["alice@test.ru"],
                       "From: someone@quarantined.test\r\nSubject: junk\r\n\r\nhi\r\n.\r\n")
    assert code == 250, lines
    junk = os.path.join(sandbox.maildir, "test.ru", "alice", ".Junk", "new")
    assert wait_for_files(junk), sandbox.log_text()[-2000:]
    with open(os.path.join(junk, os.listdir(junk)[0]), "rb") as stored:
        verdict = " ".join(header_fields(stored.read(), "Authentication-Results"))
    assert "dmarc=fail" in verdict, verdict
    assert sandbox.maildir_messages("alice@test.ru") == []
    if is_root():
        uid = os.stat(junk).st_uid
        assert uid != 0                             # made by the server as nobody
    assert server.stop() == 0


def test_relay_clients_are_not_checked_and_get_no_header(sandbox, sender_key):
    dns = sandbox.dns(zone(sender_key[1]))
    server = sandbox.start({**ENFORCE, "relay.nameservers": dns.nameserver})
    code, lines = send(server, "someone@evil.test", ["alice@test.ru"], text("trusted"))
    assert code == 250, lines
    stored = sandbox.wait_for_messages("alice@test.ru")[0]
    assert header_fields(stored, "Authentication-Results") == []
    assert not [query for query in dns.queries if query[0] == "evil.test"]
    assert server.stop() == 0


def wait_for_files(folder, timeout=10):
    return wait_until(lambda: os.path.isdir(folder) and os.listdir(folder), timeout)


# ---------------------------------------------------------------------------------------
# MTA-STS and the TLS memory, with the policy host on the real port 443


POLICY_IP, MX_IP = "127.0.0.25", "127.0.0.26"


def sts_world(sandbox, pki, mx_cert, policy_id="20261202"):
    """remote.test: MX mx1.remote.test (a FakeMX with STARTTLS and `mx_cert`), an MTA-STS
    policy in enforce mode served on POLICY_IP:443 with a certificate of the test CA, whose
    certificate goes to [relay] ca_file (a copy nobody can read). Returns (mx, dns)."""
    require_root("the policy host listens on port 443 (RFC 8461 3.3)")
    cert, key = pki.leaf("mta-sts.remote.test")
    policy = PolicyServer(POLICY_IP, server_context(cert, key),
                          policy_text("enforce", ["mx1.remote.test"]), port=443)
    sandbox.peers.append(policy)
    mx = sandbox.mx(MX_IP, ehlo=ehlo_offering("STARTTLS"), tls_context=server_context(*mx_cert))
    dns = sandbox.dns({"remote.test": [("MX", "10 mx1.remote.test.")],
                       "mx1.remote.test": [("A", MX_IP)],
                       "_mta-sts.remote.test": [("TXT", f'"v=STSv1; id={policy_id}"')],
                       "mta-sts.remote.test": [("A", POLICY_IP)]})
    with open(pki.cert_file, "rb") as ca:
        ca_copy = sandbox.write_file(sandbox.path("ca.pem"), ca.read())
    sandbox.configure({"relay.nameservers": dns.nameserver, "relay.port": mx.port,
                       "relay.ca_file": ca_copy})
    return mx, policy


def test_mta_sts_enforce_delivers_over_verified_tls_and_is_remembered(sandbox, pki):
    mx, policy = sts_world(sandbox, pki, pki.leaf("mx1.remote.test"))
    server = sandbox.start()
    code, lines = send(server, "alice@test.ru", ["bob@remote.test"], text("over sts"))
    assert code == 250, lines
    assert mx.wait_for(1, timeout=15), sandbox.log_text()[-3000:]
    assert mx.tls and policy.requests == [("mta-sts.remote.test", "/.well-known/mta-sts.txt")]
    assert os.path.exists(os.path.join(sandbox.spool, "mta-sts", "remote.test.json"))
    rc, out, err = sandbox.run_cli("--tls-domains")
    assert rc == 0, out + err
    line = next(line for line in out.splitlines() if line.startswith("remote.test"))
    assert "verified" in line and "enforce" in line and "20261202" in line, out
    assert server.stop() == 0


def test_mta_sts_enforce_with_a_bad_certificate_keeps_the_mail_queued(sandbox, pki):
    mx, _ = sts_world(sandbox, pki, self_signed(pathlib.Path(sandbox.base), "mx1.remote.test"))
    server = sandbox.start()
    code, lines = send(server, "alice@test.ru", ["bob@remote.test"], text("refused"))
    assert code == 250, lines
    listing = sandbox.wait_for_listing(lambda listing: "4.7.5" in listing)
    assert "4.7.5" in listing and "<bob@remote.test>" in listing, listing
    assert mx.messages == []
    assert server.stop() == 0


@pytest.mark.parametrize("mta_sts", ["yes", "no"])
def test_a_domain_that_took_verified_tls_is_never_downgraded(sandbox, pki, mta_sts):
    """TLS memory (as chasquid keeps it): no MTA-STS record, but once remote.test took mail
    over TLS with a valid certificate, its MX without STARTTLS gets no mail: 451 4.7.5,
    with MTA-STS switched off too."""
    secure = sandbox.mx(MX_IP, ehlo=ehlo_offering("STARTTLS"),
                        tls_context=server_context(*pki.leaf("mx1.remote.test")))
    dns = sandbox.dns({"remote.test": [("MX", "10 mx1.remote.test.")],
                       "mx1.remote.test": [("A", MX_IP)]})
    with open(pki.cert_file, "rb") as ca:
        ca_copy = sandbox.write_file(sandbox.path("ca.pem"), ca.read())
    server = sandbox.start({"relay.nameservers": dns.nameserver, "relay.port": secure.port,
                            "relay.ca_file": ca_copy, "relay.mta_sts": mta_sts})
    assert send(server, "alice@test.ru", ["bob@remote.test"], text("first"))[0] == 250
    assert secure.wait_for(1, timeout=15), sandbox.log_text()[-3000:]
    port = secure.port
    secure.stop()
    secure.server_close()
    plain = sandbox.mx(MX_IP, port=port)                 # the same MX, STARTTLS gone
    assert send(server, "alice@test.ru", ["carol@remote.test"], text("second"))[0] == 250
    listing = sandbox.wait_for_listing(lambda listing: "4.7.5" in listing)
    assert "<carol@remote.test>" in listing and "4.7.5" in listing, \
        listing + sandbox.log_text()[-3000:]
    assert plain.messages == []
    rc, out, err = sandbox.run_cli("--tls-domains")
    assert re.search(r"^remote\.test\s+verified", out, re.M), out + err
    assert server.stop() == 0


@pytest.mark.parametrize("sender", ["eve@outside.test", "boss@test.ru",
                                    "a-sender-whose-local-part-is-too-long-for-an-srs-one@test.ru"])
def test_mail_forwarded_for_an_alias_is_not_signed_with_our_key(sandbox, sender):
    """Anyone may write to an alias: a forward (SRS, or our Delivered-To first when SRS would
    not fit) leaves unsigned, whatever From: it claims; a relay client's own mail is signed."""
    require_root("the key is root's 0600 file, read before the drop to nobody")
    key, _, _ = keygen(sandbox)
    aliases = sandbox.write_file(sandbox.path("aliases"), "carol: carol@remote.test\n")
    mx = sandbox.mx("127.0.0.2")
    server = sandbox.start({**OUTSIDE, "relay.routes": route("remote.test", mx),
                            "dkim.keys": f"test.ru=s2:{key}", "users.aliases": aliases,
                            "checks.spf": "off", "checks.dkim": "off", "checks.dmarc": "off"})
    forged = f"From: The Boss <boss@test.ru>\r\nSubject: pay this\r\n\r\nnow\r\n.\r\n"
    code, lines = send(server, sender, ["carol@test.ru"], forged)
    assert code == 250, lines
    assert mx.wait_for(1, timeout=15), sandbox.log_text()[-2000:]
    data = mx.messages[0][2]
    data = data.encode() if isinstance(data, str) else data
    assert b"DKIM-Signature" not in data, data[:600]
    assert b"Subject: pay this" in data
    assert server.stop() == 0
