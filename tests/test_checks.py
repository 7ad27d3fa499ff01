"""Issue 15, the receiving side, over the wire: SPF at RCPT, DKIM and DMARC after the text,
[checks] off/tag/enforce, the Authentication-Results and Received-SPF fields in the Maildir
file, forged fields of ours removed, DMARC quarantine into .Junk/, and clients in [relay]
networks left alone. DNS is a loopback zone (tests/dns_responder.py); the client is
127.0.0.1, made an outsider by [relay] networks = 10.0.0.0/8."""
import os

import dkim
import pytest

import checks
import dkimsign
import replies
from resolver import Answer, LookupFailed, Resolver
from tests.conftest import maildir_messages, make_config, stored_files
from tests.dns_responder import DNSResponder
from tests.test_wire import assert_reply, expect
from tests.wire import Client

HOSTNAME = "mail.test.ru"           # the default [server] hostname: our authserv-id
OUTSIDE = {"relay.networks": "10.0.0.0/8"}
DNS_TIMEOUT = "0.5"
NEUTRAL_SPF = '"v=spf1 ?all"'
MESSAGE = (b"From: Bob <bob@%s>\r\n"
           b"To: alice@test.ru\r\n"
           b"Subject: checked\r\n"
           b"\r\n"
           b"hello\r\n")


def txt_strings(value):
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    """An RSA key for signed.test, selector s1: (PEM bytes, TXT value)."""
    path, _, value = dkimsign.keygen("signed.test", "s1", str(tmp_path_factory.mktemp("k")))
    with open(path, "rb") as pem:
        return pem.read(), value


@pytest.fixture(scope="module")
def zone(key):
    records = {
        "spf-fail.test": [("TXT", '"v=spf1 -all"')],
        "signed.test": [("TXT", NEUTRAL_SPF)],
        "s1._domainkey.signed.test": [("TXT", txt_strings(key[1]))],
        "_dmarc.signed.test": [("TXT", '"v=DMARC1; p=reject"')],
        "reject.test": [("TXT", NEUTRAL_SPF)],
        "_dmarc.reject.test": [("TXT", '"v=DMARC1; p=reject"')],
        "quarantine.test": [("TXT", NEUTRAL_SPF)],
        "_dmarc.quarantine.test": [("TXT", '"v=DMARC1; p=quarantine"')],
        "slow.test": "TIMEOUT",
        "dmarcslow.test": [("TXT", NEUTRAL_SPF)],
        "_dmarc.dmarcslow.test": "TIMEOUT",
        "slowkey.test": [("TXT", NEUTRAL_SPF)],
        "s1._domainkey.slowkey.test": "TIMEOUT",
    }
    server = DNSResponder(records)
    try:
        yield server
    finally:
        server.stop()


def checked_server(tmp_path, start_server, zone, spf="tag", dkim_mode="tag", dmarc="tag",
                   **overrides):
    settings = {**OUTSIDE, "relay.nameservers": zone.nameserver,
                "checks.dns_timeout": DNS_TIMEOUT, "checks.spf": spf,
                "checks.dkim": dkim_mode, "checks.dmarc": dmarc, **overrides}
    return start_server(make_config(tmp_path, **settings))


def send(server, sender, text, rcpt="250", recipient="alice@test.ru"):
    """One transaction: the reply to the final dot, or RCPT's when it is not 250."""
    with Client(server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, f"MAIL FROM:<{sender}>", "250")
        rcpt_lines = expect(client, f"RCPT TO:<{recipient}>", rcpt)
        if rcpt != "250":
            return rcpt_lines
        expect(client, "DATA", "354")
        client.send(text + b".\r\n")
        return client.reply()


def inbox(server, folder=""):
    if not folder:
        return maildir_messages(server.config.maildir, "alice@test.ru")
    path = os.path.join(server.config.maildir, "test.ru", "alice", folder, "new")
    return [open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))] \
        if os.path.isdir(path) else []


def headers(stored):
    """The header section of a Maildir file (LF lines), as its lines, folded ones joined."""
    lines = []
    for line in stored.split(b"\n\n", 1)[0].split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            lines[-1] += b" " + line.strip()
        else:
            lines.append(line)
    return lines


def field_names(stored):
    return [line.split(b":", 1)[0].lower() for line in headers(stored)]


def authentication_results(stored):
    return [line for line in headers(stored) if line.lower().startswith(b"authentication-results:")]


def fresh(path):
    """A directory for a second server in the same test."""
    path.mkdir(exist_ok=True)
    return path


def no_kept_texts(server):
    return stored_files(os.path.join(server.config.spool, "tmp")) == []


def test_an_enforced_spf_fail_is_refused_at_rcpt(tmp_path, start_server, zone):
    server = checked_server(tmp_path, start_server, zone, spf="enforce")
    lines = send(server, "bob@spf-fail.test", MESSAGE % b"spf-fail.test", rcpt="550 5.7.23")
    assert "SPF check of spf-fail.test failed for 127.0.0.1" in lines[-1]
    assert inbox(server) == []


def test_a_tagged_spf_fail_is_accepted_and_recorded(tmp_path, start_server, zone):
    server = checked_server(tmp_path, start_server, zone)
    assert_reply(send(server, "bob@spf-fail.test", MESSAGE % b"spf-fail.test"), "250 2.0.0")
    [stored] = inbox(server)
    # RFC 7208 9.1, RFC 8601 2.1: above our Received:, below Return-Path
    assert field_names(stored)[:4] == [b"return-path", b"authentication-results",
                                       b"received-spf", b"received"]
    [ours] = authentication_results(stored)
    assert ours.startswith(b"Authentication-Results: mail.test.ru; ")
    assert b"spf=fail" in ours and b"smtp.mailfrom=bob@spf-fail.test" in ours
    assert b"dkim=none" in ours and b"dmarc=none" in ours
    assert headers(stored)[2].startswith(b"Received-SPF: fail (mail.test.ru: ")
    assert stored.endswith(b"\n\nhello\n")
    assert no_kept_texts(server)


def test_an_enforced_spf_temperror_is_451(tmp_path, start_server, zone):
    server = checked_server(tmp_path, start_server, zone, spf="enforce")
    send(server, "bob@slow.test", b"", rcpt="451 4.7.24")


def test_dmarc_reject_is_refused_after_the_dot(tmp_path, start_server, zone):
    server = checked_server(tmp_path, start_server, zone, dmarc="enforce")
    lines = assert_reply(send(server, "bob@reject.test", MESSAGE % b"reject.test"), "550 5.7.1")
    assert "DMARC policy of reject.test" in lines[-1]
    assert inbox(server) == [] and no_kept_texts(server)


def test_dmarc_quarantine_goes_to_junk(tmp_path, start_server, zone):
    server = checked_server(tmp_path, start_server, zone, dmarc="enforce")
    assert_reply(send(server, "bob@quarantine.test", MESSAGE % b"quarantine.test"), "250")
    assert inbox(server) == []
    [stored] = inbox(server, ".Junk")
    [ours] = authentication_results(stored)
    assert b"dmarc=fail (p=quarantine)" in ours and b"header.from=quarantine.test" in ours
    junk = os.path.join(server.config.maildir, "test.ru", "alice", ".Junk")
    assert os.path.isfile(os.path.join(junk, "maildirfolder"))      # Maildir++


def test_dmarc_quarantine_only_tagged_stays_in_the_inbox(tmp_path, start_server, zone):
    server = checked_server(tmp_path, start_server, zone)
    assert_reply(send(server, "bob@quarantine.test", MESSAGE % b"quarantine.test"), "250")
    [stored] = inbox(server)
    assert b"dmarc=fail (p=quarantine)" in authentication_results(stored)[0]


def test_an_enforced_dmarc_temperror_is_451_after_the_dot(tmp_path, start_server, zone):
    server = checked_server(tmp_path, start_server, zone, dmarc="enforce")
    assert_reply(send(server, "bob@dmarcslow.test", MESSAGE % b"dmarcslow.test"), "451 4.7.1")
    assert inbox(server) == []


def signed(key, text=MESSAGE % b"signed.test", domain=b"signed.test"):
    return dkim.sign(text, b"s1", domain, key[0],
                     include_headers=[b"from", b"to", b"subject"]) + text


def test_an_aligned_dkim_signature_passes_dkim_and_dmarc_in_bdat_too(tmp_path, start_server,
                                                                     zone, key):
    server = checked_server(tmp_path, start_server, zone, "enforce", "enforce", "enforce")
    message = signed(key)
    with Client(server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, "MAIL FROM:<bob@signed.test>", "250")
        expect(client, "RCPT TO:<alice@test.ru>", "250")
        client.send(b"BDAT %d LAST\r\n" % len(message) + message)
        assert_reply(client.reply(), "250 2.0.0")
    [stored] = inbox(server)
    [ours] = authentication_results(stored)
    assert b"spf=neutral" in ours
    assert b"dkim=pass header.d=signed.test header.s=s1" in ours
    assert b"dmarc=pass (p=reject) header.from=signed.test" in ours
    assert stored.replace(b"\n", b"\r\n").endswith(message)     # the signed text untouched


def test_a_tampered_signature_fails_dkim_enforced(tmp_path, start_server, zone, key):
    server = checked_server(tmp_path, start_server, zone, dkim_mode="enforce")
    tampered = signed(key).replace(b"hello", b"HELLO")
    lines = assert_reply(send(server, "bob@signed.test", tampered), "550 5.7.20")
    assert "signed.test" in lines[-1]
    # and tagged only, dmarc=fail is recorded (p=reject is not enforced)
    (tmp_path / "tagged").mkdir()
    tagged = checked_server(fresh(tmp_path / "tagged"), start_server, zone)
    assert_reply(send(tagged, "bob@signed.test", tampered), "250")
    [ours] = authentication_results(inbox(tagged)[0])
    assert b"dkim=fail" in ours and b"dmarc=fail (p=reject)" in ours


def test_forged_fields_of_ours_go_and_others_stay(tmp_path, start_server, zone):
    server = checked_server(tmp_path, start_server, zone)
    text = (b"Authentication-Results: MAIL.TEST.RU; spf=pass smtp.mailfrom=bob@forged\r\n"
            b"Authentication-Results: other.example;\r\n\tdkim=pass header.d=x\r\n"
            b"Authentication-Results: (forged)\r\n mail.test.ru; dmarc=pass\r\n"
            + MESSAGE % b"spf-fail.test")
    assert_reply(send(server, "bob@spf-fail.test", text), "250")
    [stored] = inbox(server)
    found = authentication_results(stored)
    assert len(found) == 2
    assert found[0].startswith(b"Authentication-Results: mail.test.ru; spf=fail")
    assert found[1] == b"Authentication-Results: other.example; dkim=pass header.d=x"


def test_a_client_in_relay_networks_is_not_checked_but_loses_fields_of_ours(
        tmp_path, start_server, zone):
    (tmp_path / "aliases").write_text("both: alice, carol@remote.test\n")
    server = start_server(make_config(tmp_path, **{
        "relay.nameservers": zone.nameserver, "checks.spf": "enforce",
        "checks.dmarc": "enforce", "users.aliases": str(tmp_path / "aliases"),
        "relay.routes": "remote.test=127.0.0.1:9", "relay.retry": "3600"}))
    asked = len(zone.queries)
    theirs = b"Authentication-Results: other.example; spf=pass\r\n"
    text = b"Authentication-Results: mail.test.ru; spf=pass\r\n" + theirs + \
        MESSAGE % b"reject.test"
    assert_reply(send(server, "bob@spf-fail.test", text, recipient="both@test.ru"), "250 2.0.0")
    [stored] = inbox(server)
    assert field_names(stored)[:3] == [b"return-path", b"delivered-to", b"received"]
    # RFC 8601 5: a field with our authserv-id is not ours to trust, whoever sent it
    assert authentication_results(stored) == [theirs.rstrip()]
    assert b"Received-SPF" not in stored
    assert len(zone.queries) == asked
    # the copy forwarded on is the one-pass text, as it came
    [spooled] = [name for name in os.listdir(server.config.spool) if name.endswith(".smtp")]
    with open(os.path.join(server.config.spool, spooled), "rb") as spool_file:
        assert text in spool_file.read()


def test_an_unchecked_message_without_a_body_still_loses_a_last_field_of_ours(
        tmp_path, start_server, zone):
    server = start_server(make_config(tmp_path, **{"relay.nameservers": zone.nameserver,
                                                   "checks.dmarc": "tag"}))
    text = b"Subject: no body\r\nAuthentication-Results: mail.test.ru;\r\n spf=pass\r\n"
    assert_reply(send(server, "bob@test.ru", text), "250 2.0.0")
    [stored] = inbox(server)
    assert stored.endswith(b"\nSubject: no body\n")


def test_checks_off_add_nothing_and_ask_nothing(tmp_path, start_server, zone):
    server = checked_server(tmp_path, start_server, zone, "off", "off", "off")
    asked = len(zone.queries)
    assert_reply(send(server, "bob@spf-fail.test", MESSAGE % b"reject.test"), "250 2.0.0")
    assert field_names(inbox(server)[0])[:2] == [b"return-path", b"received"]
    assert len(zone.queries) == asked


def test_the_replies_cite_their_rfcs():
    for reply in (replies.SPF_FAILED, replies.SPF_TEMPORARY, replies.DKIM_FAILED,
                  replies.DKIM_TEMPORARY, replies.DMARC_REJECTED, replies.DMARC_TEMPORARY,
                  replies.DMARC_SEVERAL_FROM):
        assert reply.rfc.startswith("RFC ")


def test_a_forwarded_copy_loses_forged_fields_of_ours_and_gets_none_added(tmp_path, start_server,
                                                                          zone):
    (tmp_path / "aliases").write_text("both: alice, carol@remote.test\n")
    server = checked_server(tmp_path, start_server, zone, **{
        "users.aliases": str(tmp_path / "aliases"), "relay.routes": "remote.test=127.0.0.1:9",
        "relay.retry": "3600"})
    text = (b"Authentication-Results: mail.test.ru; spf=pass\r\n"
            b"Authentication-Results: other.example; spf=fail\r\n" + MESSAGE % b"spf-fail.test")
    assert_reply(send(server, "bob@spf-fail.test", text, recipient="both@test.ru"), "250 2.0.0")
    [spooled] = [name for name in os.listdir(server.config.spool) if name.endswith(".smtp")]
    with open(os.path.join(server.config.spool, spooled), "rb") as spool_file:
        spooled_text = spool_file.read()
    assert b"Authentication-Results: other.example; spf=fail\r\n" in spooled_text
    assert b"mail.test.ru; spf=pass" not in spooled_text
    assert b"Received-SPF" not in spooled_text and b"mail.test.ru;\r\n" not in spooled_text
    [stored] = inbox(server)
    assert len(authentication_results(stored)) == 2     # ours, new, and other.example's


def test_spf_is_asked_once_per_transaction(tmp_path, start_server, zone):
    server = checked_server(tmp_path, start_server, zone, spf="enforce")
    asked = len(zone.queries)
    with Client(server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, "MAIL FROM:<bob@spf-fail.test>", "250")
        expect(client, "RCPT TO:<alice@test.ru>", "550 5.7.23")
        expect(client, "RCPT TO:<bob@test.ru>", "550 5.7.23")
        assert zone.queries[asked:] == [("spf-fail.test", "TXT")]
        expect(client, "RSET", "250")                   # a new transaction asks again
        expect(client, "MAIL FROM:<bob@spf-fail.test>", "250")
        expect(client, "RCPT TO:<alice@test.ru>", "550 5.7.23")
    assert zone.queries[asked:] == [("spf-fail.test", "TXT")] * 2


def test_a_dkim_key_lookup_timeout_enforced_is_451(tmp_path, start_server, zone, key):
    server = checked_server(tmp_path, start_server, zone, dkim_mode="enforce")
    message = signed(key, MESSAGE % b"slowkey.test", b"slowkey.test")
    lines = assert_reply(send(server, "bob@slowkey.test", message), "451 4.7.5")
    assert "slowkey.test" in lines[-1]
    assert inbox(server) == [] and no_kept_texts(server)


def test_only_a_signed_text_is_read_back():
    assert not checks.may_be_signed(b"Subject: x\r\nX-DKIM-Signature: no")
    assert checks.may_be_signed(b"Subject: x\r\nDKIM-Signature : v=1")
    assert checks.may_be_signed(b"dkim-signature: v=1")
    assert checks.may_be_signed(b"X" * 65536)               # not kept whole: read it


# --- what the review found (issue 15) --------------------------------------------------------

def test_a_from_field_that_cannot_be_parsed_is_a_permerror_and_leaves_nothing(
        tmp_path, start_server, zone):
    server = checked_server(tmp_path, start_server, zone, dmarc="enforce")
    text = b"From: " + b"(" * 600 + b"\r\nTo: alice@test.ru\r\nSubject: x\r\n\r\nhello\r\n"
    assert_reply(send(server, "bob@reject.test", text), "250 2.0.0")
    [ours] = authentication_results(inbox(server)[0])
    assert b'dmarc=permerror reason="From: not parsable"' in ours
    assert no_kept_texts(server)


def test_a_check_that_breaks_costs_the_transaction_and_leaves_no_file(tmp_path, start_server,
                                                                      zone, monkeypatch):
    server = checked_server(tmp_path, start_server, zone)

    def broken(*arguments):
        raise RuntimeError("a bug in a check")

    monkeypatch.setattr(server.system.checks, "after_text", broken)
    assert_reply(send(server, "bob@reject.test", MESSAGE % b"reject.test"), "451")
    assert inbox(server) == [] and no_kept_texts(server)


def test_a_from_field_after_64_kib_of_header_still_meets_its_policy(tmp_path, start_server,
                                                                     zone):
    padding = b"".join(b"X-Pad-%05d: %s\r\n" % (i, b"a" * 900) for i in range(80))
    assert len(padding) > checks.HEAD_KEPT
    server = checked_server(tmp_path, start_server, zone, dmarc="enforce")
    lines = assert_reply(send(server, "bob@reject.test", padding + MESSAGE % b"reject.test"),
                         "550 5.7.1")
    assert "reject.test" in lines[-1]
    tagged = checked_server(fresh(tmp_path / "tagged"), start_server, zone)
    assert_reply(send(tagged, "bob@reject.test", padding + MESSAGE % b"reject.test"), "250")
    [stored] = inbox(tagged)
    assert b"dmarc=fail (p=reject)" in authentication_results(stored)[0]
    assert stored.endswith(padding.replace(b"\r\n", b"\n") +
                           (MESSAGE % b"reject.test").replace(b"\r\n", b"\n"))
    assert no_kept_texts(server) and no_kept_texts(tagged)


def test_a_second_from_field_is_refused_under_enforce(tmp_path, start_server, zone):
    second = b"From: bob@reject.test\r\nFrom: x@attacker.example\r\n" + \
        (MESSAGE % b"reject.test").split(b"\r\n", 1)[1]
    server = checked_server(tmp_path, start_server, zone, dmarc="enforce")
    lines = assert_reply(send(server, "bob@reject.test", second), "550 5.7.1")
    assert "2 From: fields" in lines[-1]
    tagged = checked_server(fresh(tmp_path / "tagged"), start_server, zone)
    assert_reply(send(tagged, "bob@reject.test", second), "250")
    assert b"dmarc=permerror" in authentication_results(inbox(tagged)[0])[0]


def test_a_from_with_a_second_domain_meets_the_strictest_policy(tmp_path, start_server, zone):
    text = b"From: x@attacker.example, bob@reject.test\r\n" + \
        (MESSAGE % b"reject.test").split(b"\r\n", 1)[1]
    server = checked_server(tmp_path, start_server, zone, dmarc="enforce")
    lines = assert_reply(send(server, "bob@reject.test", text), "550 5.7.1")
    assert "DMARC policy of reject.test" in lines[-1]


def test_a_from_domain_dns_cannot_have_is_a_permerror_not_a_451(tmp_path, start_server, zone):
    server = checked_server(tmp_path, start_server, zone, dmarc="enforce")
    asked = len(zone.queries)
    text = b"From: bob@a..b\r\nTo: alice@test.ru\r\n\r\nhello\r\n"
    assert_reply(send(server, "bob@reject.test", text), "250 2.0.0")
    assert b"dmarc=permerror" in authentication_results(inbox(server)[0])[0]
    assert [name for name, _ in zone.queries[asked:]] == ["reject.test"]     # SPF only


def test_a_name_dns_cannot_have_is_looked_up_as_no_such_name(tmp_path, zone):
    lookup = Resolver(make_config(tmp_path, **{"relay.nameservers": zone.nameserver,
                                               "checks.dns_timeout": DNS_TIMEOUT}),
                      None).lookup
    asked = len(zone.queries)
    for name in ("_dmarc.a..b", "x" * 64 + ".test", ".".join(["a" * 60] * 5)):
        assert lookup(name, "TXT") == Answer((), exists=False), name
    assert len(zone.queries) == asked
    with pytest.raises(LookupFailed):
        lookup("slow.test", "TXT")


def test_a_selector_dns_cannot_have_is_a_permerror_and_not_refused(tmp_path, start_server, zone,
                                                                   key):
    text = MESSAGE % b"signed.test"
    signature = dkim.sign(text, b"s1", b"signed.test", key[0], include_headers=[b"from"])
    broken = signature.replace(b"s=s1", b"s=a..b")
    assert broken != signature
    server = checked_server(tmp_path, start_server, zone, dkim_mode="enforce")
    assert_reply(send(server, "bob@signed.test", broken + text), "250 2.0.0")
    assert b"dkim=permerror" in authentication_results(inbox(server)[0])[0]


def test_a_signature_that_cannot_be_checked_is_as_none_under_enforce(tmp_path, start_server,
                                                                     zone):
    server = checked_server(tmp_path, start_server, zone, dkim_mode="enforce")
    text = MESSAGE % b"remote.example"
    assert_reply(send(server, "bob@remote.example", text), "250 2.0.0")
    ed25519 = (b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=remote.example;\r\n"
               b" s=ed; h=from:to:subject; bh=AAAA; b=AAAA\r\n")
    assert_reply(send(server, "bob@remote.example", ed25519 + text), "250 2.0.0")
    broken = b"DKIM-Signature: v=1; a=rsa-sha256; d=remote.example; b=AAAA\r\n"   # no s=
    assert_reply(send(server, "bob@remote.example", broken + text), "250 2.0.0")
    results = [clause.split()[0] for stored in inbox(server)
               for clause in authentication_results(stored)[0].split(b";")
               if clause.split()[:1] and clause.split()[0].startswith(b"dkim=")]
    # the ed25519 key is not published: permerror; the tags are broken: neutral
    assert results == [b"dkim=none", b"dkim=permerror", b"dkim=neutral"]


def test_a_failing_second_maildir_copy_removes_the_first(tmp_path, start_server, zone):
    (tmp_path / "aliases").write_text("team: bob\n")
    server = checked_server(tmp_path, start_server, zone,
                            **{"users.aliases": str(tmp_path / "aliases")})
    bob = os.path.join(server.config.maildir, "test.ru", "bob")
    os.makedirs(bob)
    open(os.path.join(bob, "tmp"), "w").close()         # bob's tmp/ cannot be made
    with Client(server.address) as client:
        expect(client, "EHLO client.example", "250")
        expect(client, "MAIL FROM:<bob@remote.example>", "250")
        expect(client, "RCPT TO:<alice@test.ru>", "250")
        expect(client, "RCPT TO:<team@test.ru>", "250")
        expect(client, "DATA", "354")
        client.send(MESSAGE % b"remote.example" + b".\r\n")
        assert_reply(client.reply(), "451")
    assert os.listdir(os.path.join(server.config.maildir, "test.ru", "alice", "tmp")) == []
    assert no_kept_texts(server)
