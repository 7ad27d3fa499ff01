"""spf.py: the openspf RFC 7208 test suite (tests/data/rfc7208-tests.yml, release 2014.04 from
pyspf 2.0.14's source distribution, BSD-style licence in its header) run test by test on a
loopback DNS server through a real resolver.Resolver; then the identity rules of RFC 7208
2.3/2.4, the Received-SPF field, DNS timeouts and the overall time bound."""
import logging
import time
from collections import namedtuple

import dns.rdata
import pytest

import spf
from resolver import Answer, LookupFailed, Resolver
from tests.conftest import make_config
from tests.dns_responder import DNSResponder
from tests.spf_suite import SuiteResponder, load_cases

DNS_TIMEOUT = "0.3"                 # seconds: the suite's TIMEOUT names cost this much each
CASES = load_cases()
# The suite's "DEFAULT" is its driver's stand-in for "no exp= text": spf.py leaves it empty
NO_EXPLANATION = "DEFAULT"
# Explanations compared without regard to case, and why
CASE_INSENSITIVE_EXPLANATIONS = {
    "v-macro-ip6": "RFC 7208 7.4 writes the nibbles of %{ir} for IPv6 in lower case (as does "
                   "ipaddress); the suite's author, pyspf, writes them in upper case",
}


def make_resolver(tmp_path, server):
    config = make_config(tmp_path, **{"relay.nameservers": server.nameserver,
                                      "relay.connect_timeout": DNS_TIMEOUT})
    return Resolver(config, logging.getLogger("test_spf"))


@pytest.fixture(scope="module")
def suite_dns(tmp_path_factory):
    """(responder, resolver): one loopback server for the whole suite, its zone swapped
    for each scenario."""
    server = SuiteResponder()
    try:
        yield server, make_resolver(tmp_path_factory.mktemp("spf"), server)
    finally:
        server.stop()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_rfc7208_suite(case, suite_dns):
    server, resolver = suite_dns
    server.zone = case.zone
    result = spf.check_sender(case.host, case.mailfrom, case.helo, resolver.lookup)
    assert result.result in case.results, (
        f"{case.scenario} / {case.spec}: {result.result} ({result.reason}), "
        f"expected {' or '.join(case.results)}")
    if case.explanation is None:
        return
    expected = "" if case.explanation == NO_EXPLANATION else case.explanation
    if case.name in CASE_INSENSITIVE_EXPLANATIONS:
        assert result.explanation.lower() == expected.lower()
    else:
        assert result.explanation == expected


@pytest.fixture
def dns_server():
    """dns_server(records) -> (DNSResponder, lookup) on a loopback server of `records`."""
    servers = []

    def start(records, tmp_path):
        server = DNSResponder(records)
        servers.append(server)
        return server, make_resolver(tmp_path, server).lookup

    yield start
    for server in servers:
        server.stop()


def txt(text):
    return [("TXT", f'"{text}"')]


def test_a_null_sender_is_checked_as_postmaster_at_the_helo_name(dns_server, tmp_path):
    server, lookup = dns_server({
        "helo.test": txt("v=spf1 ip4:127.0.0.9 -all exp=why.helo.test"),
        "why.helo.test": txt("%{s} may not send from %{i}"),
        "sender.test": txt("v=spf1 +all")}, tmp_path)
    refused = spf.check_sender("127.0.0.5", "<>", "helo.test", lookup)
    assert refused == spf.SpfResult(spf.FAIL, "helo.test", "helo.test: -all matched",
                                    "postmaster@helo.test may not send from 127.0.0.5")
    assert spf.check_sender("127.0.0.9", "", "helo.test", lookup).result == spf.PASS
    assert ("sender.test", "TXT") not in server.queries


def test_a_helo_that_is_no_domain_name_gives_none_without_dns(dns_server, tmp_path):
    server, lookup = dns_server({}, tmp_path)
    for helo in ("[127.0.0.5]", "[IPv6:::1]", "localhost", "two words.test"):
        assert spf.check_sender("127.0.0.5", "", helo, lookup).result == spf.NONE
    assert server.queries == []


def test_the_mail_from_domain_is_checked_in_a_labels(dns_server, tmp_path):
    server, lookup = dns_server({"xn--bcher-kva.test": txt("v=spf1 ip6:::1 -all")},
                                tmp_path)
    result = spf.check_sender("::1", "anna@bücher.test", "mx.bücher.test", lookup)
    assert result.result == spf.PASS
    assert server.queries == [("xn--bcher-kva.test", "TXT")]


def test_a_dns_timeout_is_a_temperror(dns_server, tmp_path):
    _, lookup = dns_server({"slow.test": "TIMEOUT",
                            "remote.test": txt("v=spf1 a:fast.test include:slow.test -all"),
                            "fast.test": [("A", "127.0.0.2")]}, tmp_path)
    assert spf.check_sender("127.0.0.5", "bob@slow.test", "mx.test", lookup).result == \
        spf.TEMPERROR
    result = spf.check_sender("127.0.0.5", "bob@remote.test", "mx.test", lookup)
    assert (result.result, result.domain) == (spf.TEMPERROR, "remote.test")
    assert "slow.test" in result.reason


def test_a_check_over_the_time_limit_is_a_temperror(monkeypatch):
    """Each lookup of a chain of includes takes 6 s on a fake clock: the fourth would start
    after 18 s, the fifth after 24 s, past the 20 s bound (RFC 7208 4.6.4)."""
    Txt = namedtuple("Txt", "strings")
    now = [1000.0]
    asked = []

    def slow_lookup(name, record_type):
        asked.append(name)
        now[0] += 6
        number = int(name.split(".")[0][1:])
        return Answer((Txt([f"v=spf1 include:n{number + 1}.test -all".encode()]),))

    monkeypatch.setattr(spf, "_clock", lambda: now[0])
    result = spf.check_host("192.0.2.1", "n0.test", "bob@n0.test", "mx.test", slow_lookup)
    assert result.result == spf.TEMPERROR
    assert "time limit" in result.reason
    assert asked == ["n0.test", "n1.test", "n2.test", "n3.test"]


def test_a_lookup_failure_of_the_record_itself_is_a_temperror():
    def failing(name, record_type):
        raise LookupFailed(f"{record_type} lookup for {name}: SERVFAIL")

    result = spf.check_host("192.0.2.1", "remote.test", "bob@remote.test", "mx.test", failing)
    assert result == spf.SpfResult(spf.TEMPERROR, "remote.test",
                                   "DNS: TXT lookup for remote.test: SERVFAIL")


def test_received_spf_for_a_mail_from_identity():
    result = spf.SpfResult(spf.PASS, "remote.test", "remote.test: ip6:2001:db8::/32 matched")
    assert spf.received_spf(result, "2001:db8::7", "<bob@remote.test>", "mx.remote.test",
                            "mail.test.ru") == (
        "Received-SPF: pass (mail.test.ru: domain of bob@remote.test designates 2001:db8::7 "
        'as permitted sender) client-ip="2001:db8::7"; envelope-from="bob@remote.test"; '
        "helo=mx.remote.test; receiver=mail.test.ru; identity=mailfrom")


def test_received_spf_for_a_helo_identity_and_an_error():
    result = spf.SpfResult(spf.PERMERROR, "mx.remote.test",
                           'more than 2 void lookups (a:"x")\r\n')
    assert spf.received_spf(result, "192.0.2.1", "", "mx.remote.test", "mail.test.ru") == (
        "Received-SPF: permerror (mail.test.ru: error in processing during lookup of "
        'mx.remote.test: more than 2 void lookups \\(a:"x"\\)  ) client-ip=192.0.2.1; '
        'envelope-from=""; helo=mx.remote.test; receiver=mail.test.ru; identity=helo')


def fake_lookup(records):
    """lookup() in-process over {name: [(type, text)]}, records kept in the given order."""
    def lookup(name, record_type):
        if name not in records:
            return Answer((), exists=False)
        return Answer(tuple(dns.rdata.from_text("IN", kind, text)
                            for kind, text in records[name] if kind == record_type))
    return lookup


def test_only_the_first_ten_ptr_names_are_validated():
    """RFC 7208 4.6.4: names past the 10th PTR record are ignored, not an error."""
    names = [f"h{number}.remote.test" for number in range(11)]
    records = {"1.2.0.192.in-addr.arpa": [("PTR", name + ".") for name in names],
               "remote.test": [("TXT", '"v=spf1 ptr:h10.remote.test ptr ?all"')]}
    records.update({name: [("A", "192.0.2.1")] for name in names})
    result = spf.check_host("192.0.2.1", "remote.test", "bob@remote.test", "mx.test",
                            fake_lookup(records))
    assert (result.result, result.reason) == (spf.PASS, "remote.test: ptr matched")
    records["remote.test"] = [("TXT", '"v=spf1 ptr:h10.remote.test ?all"')]
    result = spf.check_host("192.0.2.1", "remote.test", "bob@remote.test", "mx.test",
                            fake_lookup(records))
    assert (result.result, result.reason) == (spf.NEUTRAL, "remote.test: ?all matched")


def test_an_explanation_may_name_the_receiver_the_client_and_the_time():
    records = {"remote.test": [("TXT", '"v=spf1 -all exp=why.remote.test"')],
               "why.remote.test": [("TXT", '"%{r} refused %{c} for %{o} at %{t}"')]}
    before = int(time.time())
    result = spf.check_host("2001:db8::7", "remote.test", "bob@remote.test", "mx.test",
                            fake_lookup(records), receiver="mail.test.ru")
    after = int(time.time())
    text, _, stamp = result.explanation.rpartition(" ")
    assert text == "mail.test.ru refused 2001:db8::7 for remote.test at"
    assert before <= int(stamp) <= after
    records["remote.test"] = [("TXT", '"v=spf1 -all exp=%{r}.remote.test"')]
    result = spf.check_host("2001:db8::7", "remote.test", "bob@remote.test", "mx.test",
                            fake_lookup(records))
    assert result.result == spf.PERMERROR            # RFC 7208 7.1: r only in exp text
