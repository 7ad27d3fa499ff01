"""dmarc.py (RFC 7489) and authresults.py (RFC 8601) on their own: the From: domain, the
policy record and its organisational-domain fallback, strict and relaxed alignment, and the
header field with the removal of forged ones. DNS is a dict here (the wire tests,
test_checks.py, use the loopback resolver)."""
from typing import NamedTuple

import dns.rdata
import dns.rdataclass
import dns.rdatatype

import authresults
import dmarc
from resolver import Answer, LookupFailed


class Spf(NamedTuple):
    result: str
    domain: str
    reason: str = ""
    explanation: str = ""


class Dkim(NamedTuple):
    result: str
    domain: str
    selector: str = "s1"
    reason: str = ""
    signature_b: str = "abc/def+ghi="


ZONE = {
    "_dmarc.example.com": ['v=DMARC1; p=reject; sp=quarantine; adkim=s; aspf=s'],
    "_dmarc.relaxed.test": ['v=DMARC1; p=quarantine'],
    "_dmarc.own.relaxed.test": ['v=DMARC1; p=none'],
    "_dmarc.slow.test": "TIMEOUT",
    "_dmarc.two.test": ['v=DMARC1; p=reject', 'v=DMARC1; p=none'],
    "_dmarc.notfirst.test": ['p=reject; v=DMARC1'],
    "_dmarc.badp.test": ['v=DMARC1; p=bogus; rua=mailto:d@badp.test'],
    "_dmarc.badp-norua.test": ['v=DMARC1; p=bogus'],
    "_dmarc.pct.test": ['v=DMARC1; p=reject; pct=0'],
    "_dmarc.example.co.uk": ['v=DMARC1; p=reject'],
}


class Zone:
    def __init__(self, records=ZONE):
        self.records = records
        self.asked = []

    def __call__(self, name, record_type):
        assert record_type == "TXT"
        self.asked.append(name)
        entry = self.records.get(name)
        if entry == "TIMEOUT":
            raise LookupFailed(f"TXT lookup for {name}: timed out")
        if entry is None:
            return Answer((), exists=False)
        return Answer(tuple(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT,
                                                f'"{text}"') for text in entry))


def verdict(author, spf=None, dkim=(), zone=None):
    return dmarc.evaluate(author, spf, list(dkim), zone or Zone())


# --- alignment ------------------------------------------------------------------------------

def test_strict_alignment_needs_the_same_name():
    assert dmarc.aligned("example.com", "EXAMPLE.com.", dmarc.STRICT)
    assert not dmarc.aligned("mail.example.com", "example.com", dmarc.STRICT)
    assert dmarc.aligned("mail.example.com", "example.com", dmarc.RELAXED)
    assert dmarc.aligned("a.example.co.uk", "b.example.co.uk", dmarc.RELAXED)
    assert not dmarc.aligned("other.co.uk", "example.co.uk", dmarc.RELAXED)   # PSL: co.uk
    assert not dmarc.aligned("", "example.com", dmarc.RELAXED)


def test_an_aligned_passing_spf_or_dkim_passes_and_an_unaligned_one_does_not():
    assert verdict("relaxed.test", Spf("pass", "bounces.relaxed.test")).result == dmarc.PASS
    assert verdict("relaxed.test", dkim=[Dkim("fail", "relaxed.test"),
                                         Dkim("pass", "sub.relaxed.test")]).result == dmarc.PASS
    unaligned = verdict("relaxed.test", Spf("pass", "elsewhere.test"),
                        [Dkim("pass", "elsewhere.test")])
    assert (unaligned.result, unaligned.policy) == (dmarc.FAIL, "quarantine")
    # aspf=s, adkim=s: a subdomain is not enough
    strict = verdict("example.com", Spf("pass", "mail.example.com"),
                     [Dkim("pass", "mail.example.com")])
    assert (strict.result, strict.policy, strict.domain) == (dmarc.FAIL, "reject", "example.com")
    assert verdict("example.com", Spf("pass", "example.com")).result == dmarc.PASS


def test_spf_that_did_not_pass_never_aligns_its_way_to_a_pass():
    for result in ("fail", "softfail", "neutral", "none", "permerror"):
        assert verdict("relaxed.test", Spf(result, "relaxed.test")).result == dmarc.FAIL


# --- the record -----------------------------------------------------------------------------

def test_the_organisational_domain_record_applies_with_its_sp():
    zone = Zone()
    result = verdict("deep.sub.example.com", zone=zone)
    assert (result.result, result.policy) == (dmarc.FAIL, "quarantine")      # sp=
    assert zone.asked == ["_dmarc.deep.sub.example.com", "_dmarc.example.com"]
    # without sp= the subdomain gets p=
    assert verdict("x.relaxed.test").policy == "quarantine"
    # a record at the From: domain itself wins over the organisational one
    assert verdict("own.relaxed.test").policy == "none"
    # the PSL knows co.uk: the organisational domain of a.b.example.co.uk is example.co.uk
    assert verdict("a.b.example.co.uk").policy == "reject"


def test_no_record_is_none_and_a_timeout_is_a_temperror():
    zone = Zone()
    none = verdict("nothing.test", Spf("fail", "nothing.test"), zone=zone)
    assert (none.result, none.policy) == (dmarc.NONE, "")
    assert zone.asked == ["_dmarc.nothing.test"]        # it is its own organisational domain
    slow = verdict("slow.test", Spf("pass", "slow.test"))
    assert slow.result == dmarc.TEMPERROR and "timed out" in slow.reason


def test_a_temperror_of_an_aligned_check_is_a_temperror_not_a_fail():
    assert verdict("relaxed.test", Spf("temperror", "relaxed.test")).result == dmarc.TEMPERROR
    assert verdict("relaxed.test", dkim=[Dkim("temperror", "relaxed.test")]).result == \
        dmarc.TEMPERROR
    assert verdict("relaxed.test", Spf("temperror", "other.test")).result == dmarc.FAIL


def test_records_dmarc_does_not_apply():
    assert verdict("two.test").result == dmarc.NONE             # RFC 7489 6.6.3: several
    assert verdict("notfirst.test").result == dmarc.NONE        # v=DMARC1 must come first
    assert verdict("badp-norua.test").result == dmarc.NONE      # bad p=, no rua=
    assert verdict("badp.test").policy == "none"                # bad p= with rua=: p=none
    assert verdict("pct.test").policy == "reject"               # pct= is read as 100


# --- the From: domain -----------------------------------------------------------------------

def test_the_from_domain_of_a_header_block():
    block = b"Subject: x\r\nFrom: Bob\r\n <Bob@Example.COM>\r\nTo: a@test.ru"
    assert dmarc.from_domain(block) == dmarc.FromDomain("example.com")
    both = b"From: a@example.com, b@example.com"
    assert dmarc.from_domain(both).domain == "example.com"


def test_several_from_fields_are_a_permerror_that_says_how_many_and_none_is_none():
    two_fields = b"From: a@example.com\r\nFrom: b@example.com"
    assert dmarc.from_domain(two_fields).result == dmarc.PERMERROR
    assert dmarc.from_domain(b"Subject: x").result == dmarc.NONE
    assert dmarc.from_domain(b"From: undisclosed").result == dmarc.NONE
    result = dmarc.evaluate_message(two_fields, Spf("pass", "example.com"), [], Zone())
    assert (result.result, result.policy, result.from_fields) == (dmarc.PERMERROR, "", 2)
    one = dmarc.evaluate_message(b"From: a@example.com", Spf("pass", "example.com"), [], Zone())
    assert (one.result, one.from_fields) == (dmarc.PASS, 1)


def test_a_from_with_several_domains_gets_the_strictest_verdict():
    two_domains = b"From: a@relaxed.test, b@example.com"
    assert dmarc.from_domain(two_domains).domains == ("example.com", "relaxed.test")
    # relaxed.test passes by SPF, example.com (p=reject) fails: the reject applies
    result = dmarc.evaluate_message(two_domains, Spf("pass", "relaxed.test"), [], Zone())
    assert (result.result, result.policy, result.domain) == (dmarc.FAIL, "reject",
                                                             "example.com")
    # a domain without a record next to one that fails under p=quarantine: the fail
    quarantined = b"From: a@norecord.test, b@relaxed.test"
    result = dmarc.evaluate_message(quarantined, Spf("pass", "norecord.test"), [], Zone())
    assert (result.result, result.policy) == (dmarc.FAIL, "quarantine")
    # a policy that cannot be looked up next to one that passes: try again later
    slow = b"From: a@slow.test, b@relaxed.test"
    result = dmarc.evaluate_message(slow, Spf("pass", "relaxed.test"), [], Zone())
    assert result.result == dmarc.TEMPERROR


def test_a_from_that_cannot_be_parsed_is_a_permerror_and_asks_nothing():
    zone = Zone()
    nested = b"From: " + b"(" * 5000 + b"\r\nTo: a@test.ru"     # getaddresses recurses
    assert dmarc.from_domain(nested) == dmarc.FromDomain("", dmarc.PERMERROR,
                                                         "From: not parsable")
    for bad in (b"From: bob@a..b", b"From: bob@" + b"x" * 64 + b".test", b"From: b@[192.0.2.1]"):
        result = dmarc.evaluate_message(bad, None, [], zone)
        assert (result.result, result.domain) == (dmarc.PERMERROR, ""), bad
    assert zone.asked == []


def test_a_long_folded_from_field_is_read_in_one_pass():
    # 200 000 continuation lines: joining them one at a time would copy terabytes
    folded = b"From: Bob\r\n" + b" x\r\n" * 200_000 + b" <bob@example.com>\r\nTo: a@test.ru"
    assert dmarc.from_domain(folded) == dmarc.FromDomain("example.com")


# --- authresults ----------------------------------------------------------------------------

def test_the_header_field_has_one_method_a_line_and_quotes_what_is_no_token():
    field = authresults.header_field("mail.test.ru", [
        authresults.spf_clause(Spf("pass", "remote.test"), "<bob@remote.test>", "h.test"),
        *authresults.dkim_clauses([Dkim("pass", "remote.test")]),
        authresults.dmarc_clause(dmarc.DmarcResult("fail", "reject", "remote.test", "no"))])
    assert field == ("Authentication-Results: mail.test.ru;\r\n"
                     "\tspf=pass smtp.mailfrom=bob@remote.test;\r\n"
                     '\tdkim=pass header.d=remote.test header.s=s1 header.b="abc/def+ghi=";\r\n'
                     '\tdmarc=fail (p=reject) reason="no" header.from=remote.test')
    assert authresults.header_field("mail.test.ru", []) == \
        "Authentication-Results: mail.test.ru;\r\n\tnone"
    null_sender = authresults.spf_clause(Spf("fail", "h.test", "-all"), "", "h.test")
    assert authresults._clause(null_sender) == 'spf=fail reason="-all" smtp.helo=h.test'
    assert authresults.dkim_clauses([]) == [authresults.MethodResult("dkim", "none")]


def test_our_fields_go_and_others_stay():
    block = (b"Authentication-Results: MAIL.test.ru; spf=pass\r\n"
             b"Subject: x\r\n"
             b"Authentication-Results:\r\n (comment) mail.test.ru\r\n 1; dkim=pass\r\n"
             b"Authentication-Results: other.example; spf=fail\r\n"
             b'Authentication-Results: "mail.test.ru"; none\r\n'
             b"Authentication-Results: mail.test.ru.evil; none\r\n"
             b"To: a@test.ru")
    assert authresults.remove_own_fields(block, "mail.test.ru") == (
        b"Subject: x\r\n"
        b"Authentication-Results: other.example; spf=fail\r\n"
        b"Authentication-Results: mail.test.ru.evil; none\r\n"
        b"To: a@test.ru")


def test_the_filter_leaves_the_body_alone_and_works_across_pieces():
    own = authresults.OwnFields("mail.test.ru")
    pieces = [b"Subject: x\r\nAuthentication-Results: mail.test.ru;\r\n",
              b"\tspf=pass\r\n", b"\r\nAuthentication-Results: mail.test.ru; in the body\r\n"]
    assert b"".join(own.feed(piece) for piece in pieces) + own.finish() == \
        b"Subject: x\r\n\r\nAuthentication-Results: mail.test.ru; in the body\r\n"
    assert own.removed == 1
    headers_only = authresults.OwnFields("mail.test.ru")
    assert headers_only.feed(b"Authentication-Results: x.test; none\r\n") == b""
    assert headers_only.finish() == b"Authentication-Results: x.test; none\r\n"
