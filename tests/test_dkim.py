"""dkimsign.py and dkimverify.py: signatures made by Signer, checked by dkimverify through a
real resolver.Resolver on a loopback DNS zone, and by an independent verifier (Mail::DKIM,
tests/dkim_verifier.pl) on the same zone; keys made by keygen / keygen_main with openssl.

Mail::DKIM is a Debian package (libmail-dkim-perl, installed by .ci/run): outside CI a
missing one skips its tests; in CI (SMTPD_CI=1) it fails them.
"""
import base64
import importlib.util
import logging
import os
import re
import shutil
import stat
import subprocess

import dkim
import pytest

import config as configuration
import dkimsign
import dkimverify
from resolver import Resolver
from tests.conftest import config_sections, make_config
from tests.dns_responder import DNSResponder

DNS_TIMEOUT = "0.5"             # seconds: what the TIMEOUT name costs
VERIFIER = os.path.join(os.path.dirname(__file__), "dkim_verifier.pl")
VERIFIER_TIMEOUT = 30

MESSAGE = (b"Received: from client.test by mail.test.ru; Wed, 02 Dec 2026 12:00:00 +0000\r\n"
           b"From: Alice <alice@test.ru>\r\n"
           b"To: Bob <bob@remote.test>\r\n"
           b"Subject: a signed\r\n"
           b" folded subject\r\n"
           b"Date: Wed, 02 Dec 2026 12:00:00 +0000\r\n"
           b"Message-ID: <1@test.ru>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"\r\n"
           b"hello\r\n"
           b".a line that starts with a dot (not dot-stuffed here)\r\n"
           b"trailing spaces   \r\n")


def with_from(address, message=MESSAGE):
    return message.replace(b"From: Alice <alice@test.ru>", b"From: " + address)


def txt_strings(value):
    """A TXT value as DNSResponder takes it: quoted strings of at most 255 octets."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


class Recorder:
    """A log that keeps what was said."""

    def __init__(self):
        self.lines = []

    def _say(self, text, *args):
        self.lines.append(text % args)

    info = warning = error = _say


# --- the world: keys, a zone, a resolver ----------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two RSA keys made by keygen: {domain: (selector, path, TXT value)}."""
    directory = str(tmp_path_factory.mktemp("dkim"))
    made = {}
    for domain, selector in (("test.ru", "s1"), ("relay.test", "s2")):
        path, name, value = dkimsign.keygen(domain, selector, directory)
        assert name == f"{selector}._domainkey.{domain}"
        made[domain] = (selector, path, value)
    return made


@pytest.fixture(scope="module")
def zone(keys):
    """The loopback DNS server: the two keys (direct.test reuses test.ru's), a key record
    that times out (slow.test), one that is no key (broken.test); nokey.test has none."""
    records = {f"{selector}._domainkey.{domain}": [("TXT", txt_strings(value))]
               for domain, (selector, _, value) in keys.items()}
    records["d1._domainkey.direct.test"] = [("TXT", txt_strings(keys["test.ru"][2]))]
    records["s1._domainkey.slow.test"] = "TIMEOUT"
    records["s1._domainkey.broken.test"] = [("TXT", '"v=DKIM1; k=rsa; p=AAAA"')]
    server = DNSResponder(records)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def lookup(tmp_path, zone):
    config = make_config(tmp_path, **{"relay.nameservers": zone.nameserver,
                                      "relay.connect_timeout": DNS_TIMEOUT})
    return Resolver(config, logging.getLogger("test_dkim")).lookup


def signer_for(keys, **domains):
    """A Signer with keys[key_domain]'s file for each domain=key_domain."""
    chosen = {domain.replace("_", "."): (keys[key][0], keys[key][1])
              for domain, key in domains.items()}
    return dkimsign.Signer(chosen, Recorder())


@pytest.fixture
def signer(keys):
    return dkimsign.Signer({domain: (selector, path)
                            for domain, (selector, path, _) in keys.items()}, Recorder())


def tags(header):
    """{tag: value} of a DKIM-Signature field, whitespace removed."""
    value = header.split(b":", 1)[1]
    return {name.strip().decode(): re.sub(rb"\s+", b"", text).decode()
            for name, _, text in (item.partition(b"=") for item in value.split(b";"))
            if name.strip()}


# --- signing ------------------------------------------------------------------------------

def test_signed_mail_verifies(signer, lookup):
    header = signer.sign(MESSAGE, "test.ru")
    results = dkimverify.verify(header + MESSAGE, lookup)
    assert [(r.result, r.domain, r.selector) for r in results] == [("pass", "test.ru", "s1")]
    assert results[0].signature_b == tags(header)["b"][:12]


def test_the_signature_field_is_relaxed_rsa_sha256_with_the_usual_headers(signer):
    header = signer.sign(MESSAGE, "test.ru")
    assert header.startswith(b"DKIM-Signature: ") and header.endswith(b"\r\n")
    lines = header[:-2].split(b"\r\n")
    assert all(line[:1] in (b" ", b"\t") for line in lines[1:]), header
    assert all(len(line) <= 78 for line in lines), header   # RFC 5322 2.1.1
    fields = tags(header)
    assert fields["a"] == "rsa-sha256" and fields["c"] == "relaxed/relaxed"
    assert (fields["d"], fields["s"]) == ("test.ru", "s1")
    assert re.fullmatch(r"\d{10}", fields["t"])
    signed = fields["h"].split(":")
    # every present field of the set, From once more (RFC 6376 8.15), no trace fields
    assert sorted(signed) == sorted(["from", "from", "to", "subject", "date", "message-id",
                                     "mime-version", "content-type"])


def test_a_changed_body_or_header_fails(signer, lookup):
    signed = signer.sign(MESSAGE, "test.ru") + MESSAGE
    copies = {"body": signed.replace(b"hello", b"hellO"),
              "subject": signed.replace(b"a signed", b"a changed"),
              "second From": signed.replace(b"To: Bob", b"From: mallory@test.ru\r\nTo: Bob")}
    for what, copy in copies.items():
        results = dkimverify.verify(copy, lookup)
        assert [r.result for r in results] == ["fail"], what
        assert results[0].reason, what
    body = dkimverify.verify(copies["body"], lookup)[0]
    assert "body hash" in body.reason


def test_relaxed_canonicalization_survives_whitespace_and_case_changes(signer, lookup):
    signed = signer.sign(MESSAGE, "test.ru") + MESSAGE
    rewritten = (signed.replace(b"Subject: a signed\r\n folded", b"subject:   a signed folded")
                 .replace(b"trailing spaces   \r\n", b"trailing spaces\r\n\r\n\r\n"))
    assert [r.result for r in dkimverify.verify(rewritten, lookup)] == ["pass"]


def test_the_from_domain_signs_before_the_reverse_path_domain(signer, lookup):
    assert tags(signer.sign(MESSAGE, "relay.test"))["d"] == "test.ru"
    elsewhere = with_from(b'"Carol, at home" <carol@elsewhere.test>')
    header = signer.sign(elsewhere, "relay.test")
    assert tags(header)["d"] == "relay.test"
    assert [r.result for r in dkimverify.verify(header + elsewhere, lookup)] == ["pass"]
    upper = with_from(b"Alice <alice@TEST.RU.>")
    assert tags(signer.sign(upper, "elsewhere.test"))["d"] == "test.ru"


def test_no_key_for_either_domain_gives_no_signature(signer):
    assert signer.sign(with_from(b"carol@elsewhere.test"), "elsewhere.test") == b""
    assert signer.sign(with_from(b"carol@elsewhere.test"), "") == b""
    assert signer.log.lines == []


def test_a_message_dkimpy_cannot_sign_is_logged_and_goes_unsigned(signer):
    unparsable = b"this header line has no colon\r\n\r\nbody\r\n"
    assert signer.sign(unparsable, "test.ru") == b""
    assert len(signer.log.lines) == 1 and "test.ru" in signer.log.lines[0]


def test_a_missing_or_broken_key_file_is_a_one_line_error_naming_it(tmp_path, keys):
    cases = {"missing.pem": None,
             "text.pem": b"not a key at all\n",
             "certificate.pem": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
             "garbage.pem": b"-----BEGIN PRIVATE KEY-----\nAAAAAAAA\n-----END PRIVATE KEY-----\n",
             "truncated.pem": open(keys["test.ru"][1], "rb").read()[:200] + b"\n-----END"}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(dkimsign.SigningKeyError) as raised:
            dkimsign.Signer({"test.ru": ("s1", str(path))}, Recorder())
        message = str(raised.value)
        assert str(path) in message and "\n" not in message, name
    with pytest.raises(dkimsign.SigningKeyError, match="selector") as raised:
        dkimsign.Signer({"test.ru": ("bad selector", keys["test.ru"][1])}, Recorder())
    assert keys["test.ru"][1] in str(raised.value)


def test_an_ed25519_key_signs_with_pynacl_or_is_refused_without_it(tmp_path, zone, lookup):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    pem = subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519"], capture_output=True,
                         check=True, timeout=30).stdout
    path = tmp_path / "ed.pem"
    path.write_bytes(pem)
    if importlib.util.find_spec("nacl") is None:
        with pytest.raises(dkimsign.SigningKeyError, match="PyNaCl") as raised:
            dkimsign.Signer({"ed.test": ("e1", str(path))}, Recorder())
        assert str(path) in str(raised.value)
        return
    signer = dkimsign.Signer({"ed.test": ("e1", str(path))}, Recorder())
    message = with_from(b"alice@ed.test")
    header = signer.sign(message, "")
    assert tags(header)["a"] == "ed25519-sha256"
    public = subprocess.run(["openssl", "pkey", "-pubout", "-outform", "DER"], input=pem,
                            capture_output=True, check=True, timeout=30).stdout[-32:]
    zone.records["e1._domainkey.ed.test"] = [
        ("TXT", f'"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}"')]
    assert [r.result for r in dkimverify.verify(header + message, lookup)] == ["pass"]


# --- verifying ------------------------------------------------------------------------------

def test_an_unsigned_message_has_no_results(lookup):
    assert dkimverify.verify(MESSAGE, lookup) == []


def test_a_key_lookup_that_times_out_is_a_temperror(keys, lookup):
    signer = signer_for(keys, slow_test="test.ru")
    message = with_from(b"alice@slow.test")
    results = dkimverify.verify(signer.sign(message, "") + message, lookup)
    assert [(r.result, r.domain) for r in results] == [("temperror", "slow.test")]


def test_no_key_record_or_a_broken_one_is_a_permerror(keys, lookup):
    for domain in ("nokey.test", "broken.test"):
        signer = signer_for(keys, **{domain.replace(".", "_"): "test.ru"})
        message = with_from(b"alice@" + domain.encode())
        results = dkimverify.verify(signer.sign(message, "") + message, lookup)
        assert [(r.result, r.domain) for r in results] == [("permerror", domain)]
        assert f"s1._domainkey.{domain}" in results[0].reason


def test_broken_signature_tags_are_neutral(lookup):
    for field in (b"DKIM-Signature: v=1; d=test.ru; s=s1\r\n",          # tags missing
                  b"DKIM-Signature: this is no tag list\r\n"):
        results = dkimverify.verify(field + MESSAGE, lookup)
        assert [r.result for r in results] == ["neutral"], field


def test_two_signatures_give_two_results_in_header_order(signer, keys, lookup):
    inner = signer.sign(MESSAGE, "test.ru") + MESSAGE
    outer = signer_for(keys, nokey_test="relay.test").sign(with_from(b"x@nokey.test", inner),
                                                           "")
    relayed = outer + with_from(b"x@nokey.test", inner)    # the inner one now fails: From
    results = dkimverify.verify(relayed, lookup)
    assert [(r.result, r.domain) for r in results] == [("permerror", "nokey.test"),
                                                       ("fail", "test.ru")]
    resigned = signer_for(keys, relay_test="relay.test").sign(inner, "relay.test") + inner
    results = dkimverify.verify(resigned, lookup)
    assert [(r.result, r.domain, r.selector) for r in results] == [("pass", "relay.test", "s2"),
                                                                   ("pass", "test.ru", "s1")]
    assert results[0].signature_b != results[1].signature_b


def test_mail_signed_by_dkimpy_itself_verifies(keys, lookup):
    with open(keys["test.ru"][1], "rb") as pem:
        key = pem.read()
    message = with_from(b"someone@direct.test")
    for canonicalization in ((b"simple", b"simple"), (b"relaxed", b"simple")):
        header = dkim.sign(message, b"d1", b"direct.test", key, canonicalize=canonicalization,
                           include_headers=[b"from", b"to", b"subject"])
        results = dkimverify.verify(header + message, lookup)
        assert [(r.result, r.domain, r.selector) for r in results] == \
            [("pass", "direct.test", "d1")], canonicalization
        changed = (header + message).replace(b"Subject: a", b"Subject:  a")
        expected = "fail" if canonicalization[0] == b"simple" else "pass"
        assert [r.result for r in dkimverify.verify(changed, lookup)] == [expected]


# --- the independent verifier: Mail::DKIM -------------------------------------------------

def mail_dkim(message, zone):
    """Mail::DKIM's lines for `message`, keys from the loopback zone."""
    if not shutil.which("perl") or subprocess.run(
            ["perl", "-MMail::DKIM::Verifier", "-MNet::DNS", "-e", "1"],
            capture_output=True, timeout=VERIFIER_TIMEOUT).returncode != 0:
        reason = "Mail::DKIM is not installed (Debian libmail-dkim-perl: see .ci/run)"
        if os.environ.get("SMTPD_CI"):
            pytest.fail(f"{reason}; it never skips in CI")
        pytest.skip(reason)
    done = subprocess.run(["perl", VERIFIER, str(zone.address[1])], input=message,
                          capture_output=True, timeout=VERIFIER_TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().splitlines()


def test_mail_dkim_verifies_our_signatures(signer, zone):
    signed = signer.sign(MESSAGE, "test.ru") + MESSAGE
    assert [line.split()[:3] for line in mail_dkim(signed, zone)] == [["pass", "test.ru", "s1"]]
    elsewhere = with_from(b"carol@elsewhere.test")
    signed = signer.sign(elsewhere, "relay.test") + elsewhere
    assert [line.split()[:3] for line in mail_dkim(signed, zone)] == \
        [["pass", "relay.test", "s2"]]


def test_mail_dkim_fails_a_changed_copy(signer, zone):
    signed = signer.sign(MESSAGE, "test.ru") + MESSAGE
    for copy in (signed.replace(b"hello", b"hellO"), signed.replace(b"a signed", b"a changed")):
        assert [line.split()[0] for line in mail_dkim(copy, zone)] == ["fail"]


# --- making keys --------------------------------------------------------------------------

def test_keygen_writes_a_0600_key_per_selector_and_never_over_an_existing_file(tmp_path):
    path, name, value = dkimsign.keygen("new.test", "k1", str(tmp_path / "dkim"))
    assert path == str(tmp_path / "dkim" / "new.test.k1.pem")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert name == "k1._domainkey.new.test"
    assert re.fullmatch(r"v=DKIM1; k=rsa; p=[A-Za-z0-9+/]+=*", value)
    before = open(path, "rb").read()
    with pytest.raises(dkimsign.SigningKeyError) as raised:
        dkimsign.keygen("new.test", "k1", str(tmp_path / "dkim"))
    assert path in str(raised.value) and "\n" not in str(raised.value)
    assert open(path, "rb").read() == before
    rotated, _, new_value = dkimsign.keygen("new.test", "k2", str(tmp_path / "dkim"))
    assert rotated == str(tmp_path / "dkim" / "new.test.k2.pem") and new_value != value


def printed_record(output):
    """(name, value) of the zone-file TXT line keygen_main printed."""
    match = re.search(r'^(\S+)\.\s+IN\s+TXT\s+\((.*)\)\s*$', output, re.M)
    assert match, output
    strings = re.findall(r'"([^"]*)"', match.group(2))
    assert all(len(text) <= 255 for text in strings), strings    # RFC 1035 3.3.14
    return match.group(1), "".join(strings), strings


def test_keygen_main_prints_a_record_that_verifies_the_key(tmp_path, capsys, zone, lookup):
    config_file = tmp_path / "conf" / "smtpd.conf"
    config_file.parent.mkdir()
    config = configuration.from_sections(config_sections(tmp_path), port=0,
                                         config_file=str(config_file))
    assert dkimsign.keygen_main(config, "Main.Test", "k9") == 0
    output = capsys.readouterr().out
    name, value, strings = printed_record(output)
    assert name == "k9._domainkey.main.test" and len(strings) > 1
    assert re.search(r"^keys = main\.test=k9:dkim/main\.test\.k9\.pem$", output, re.M), output
    key_path = tmp_path / "conf" / "dkim" / "main.test.k9.pem"
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    zone.records[name] = [("TXT", " ".join(f'"{text}"' for text in strings))]
    signer = dkimsign.Signer({"main.test": ("k9", str(key_path))}, Recorder())
    message = with_from(b"alice@main.test")
    results = dkimverify.verify(signer.sign(message, "") + message, lookup)
    assert [(r.result, r.domain) for r in results] == [("pass", "main.test")]

    assert dkimsign.keygen_main(config, "main.test", "k9") == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert str(key_path) in captured.err


def test_a_key_others_can_read_is_used_with_a_warning(tmp_path, keys):
    selector, path, _ = keys["test.ru"]
    copy = tmp_path / "readable.pem"
    copy.write_bytes(open(path, "rb").read())
    copy.chmod(0o644)
    log = Recorder()
    signer = dkimsign.Signer({"test.ru": (selector, str(copy))}, log)
    assert signer.sign(MESSAGE, "test.ru").startswith(b"DKIM-Signature:")
    assert [line for line in log.lines if str(copy) in line and "chmod 600" in line]
