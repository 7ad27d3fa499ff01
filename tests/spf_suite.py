"""The openspf RFC 7208 YAML suite (tests/data/rfc7208-tests.yml) served on loopback DNS.

    cases = load_cases()                    # [SuiteCase], one per test of the suite
    with SuiteResponder() as server:        # a DNSResponder whose zone can be swapped
        server.zone = case.zone
        ... a resolver.Resolver asking server.nameserver ...

The suite's zone data is turned into DNS the way the suite's own driver (pyspf's
test/testspf.py) reads it, so that every scenario means what its authors meant:
- `SPF:` records (type 99, dropped by RFC 7208 3.1) are also served as TXT records, unless
  the name has a `TXT:` entry of its own (`TXT: NONE` only says "no TXT here");
- `TIMEOUT` in a name's list: a question for a type with no record listed before it gets
  no answer at all; a name whose list is just `TIMEOUT` never answers;
- a CNAME is answered with its chain, as far as the zone has it (a loop stops the chain);
- a name not in the zone is NXDOMAIN;
- records go out in the order of the YAML, not shuffled (the suite's ptr-limit test
  prefers its result for the first 10 PTR records in that order).
A TXT record with no strings at all (the suite's `SPF: []`) cannot be sent: RFC 1035 3.3.14
gives TXT-DATA one or more character-strings and dnspython refuses to build or parse one
without. It is served as one empty string, the nearest legal record with no text.
"""
import os
from typing import NamedTuple

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset
import yaml

from tests.dns_responder import DNSResponder

SUITE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                          "rfc7208-tests.yml")
TIMEOUT = "TIMEOUT"
NO_TXT = "NONE"                     # `TXT: NONE`: the name has no TXT record
MAX_CNAME_CHAIN = 8
MAX_STRING_OCTETS = 255             # RFC 1035 3.3: a character-string
TTL = 60
NAME_TYPES = ("PTR", "CNAME")       # whose value is a domain name


class SuiteCase(NamedTuple):
    """One test of the suite, with its scenario's zone."""
    name: str
    scenario: str
    spec: str
    helo: str
    host: str
    mailfrom: str
    results: tuple                  # acceptable results, the preferred first
    explanation: object             # the expected exp text; None: not checked
    zone: dict                      # dns.name.Name -> [(type, value) or TIMEOUT]


def load_cases(path=SUITE_FILE):
    with open(path, "rb") as suite_file:
        scenarios = list(yaml.safe_load_all(suite_file))
    cases = []
    for scenario in scenarios:
        zone = build_zone(scenario.get("zonedata") or {})
        for name, test in scenario["tests"].items():
            results = test["result"]
            results = tuple(results) if isinstance(results, list) else (results,)
            cases.append(SuiteCase(name, scenario["description"], str(test.get("spec", "")),
                                   str(test["helo"]), str(test["host"]),
                                   str(test["mailfrom"]), results,
                                   test.get("explanation"), zone))
    return cases


def build_zone(zonedata):
    """The scenario's `zonedata` as {Name: [(type, value) or TIMEOUT, ...]}, in the order of
    the YAML, SPF records copied to TXT the way testspf.py's getrdata() does."""
    return {dns.name.from_text(name): _entries(values) for name, values in zonedata.items()}


def _entries(values):
    entries, copied_to_txt, has_txt = [], [], False
    for value in values:
        if value == TIMEOUT:
            entries.append(TIMEOUT)
            continue
        for kind, data in value.items():
            if kind in ("TXT", "SPF") and isinstance(data, str):
                data = [data]
            if kind == "TXT":
                has_txt = True
            elif kind == "SPF":
                copied_to_txt.append(("TXT", data))
            if data != [NO_TXT]:
                entries.append((kind, data))
    return entries if has_txt else entries + copied_to_txt


def _rdata(kind, data):
    rdtype = dns.rdatatype.from_text(kind)
    if kind in ("TXT", "SPF"):
        strings = [piece for text in data for piece in _character_strings(text)] or [b""]
        return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, rdtype, strings)
    if kind == "MX":
        preference, host = data
        return dns.rdata.from_text(dns.rdataclass.IN, rdtype, f"{preference} {_absolute(host)}")
    if kind in NAME_TYPES:
        return dns.rdata.from_text(dns.rdataclass.IN, rdtype, _absolute(str(data)))
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, str(data))


def _character_strings(text):
    octets = text.encode("utf-8")
    return [octets[start:start + MAX_STRING_OCTETS]
            for start in range(0, len(octets), MAX_STRING_OCTETS)] or [b""]


def _absolute(host):
    return host if host.endswith(".") else host + "."


class SuiteResponder(DNSResponder):
    """A DNSResponder answering from `zone` (a build_zone() result), which a test may
    replace between lookups."""

    def __init__(self):
        self.zone = {}
        super().__init__({})

    def _answer(self, data):
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return None
        question = query.question[0]
        self.queries.append((question.name.to_text().lower().rstrip("."),
                             dns.rdatatype.to_text(question.rdtype)))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not self._fill(response, question.name, question.rdtype):
            return None
        return response.to_wire(want_shuffle=False)     # records in the suite's order

    def _fill(self, response, name, rdtype, seen=()):
        """Put the answer for (name, rdtype) into response; False: do not answer."""
        entries = self.zone.get(name)
        if entries is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return True
        kind = dns.rdatatype.to_text(rdtype)
        values = []
        for entry in entries:
            if entry == TIMEOUT:
                if not values:
                    return False
                break
            if entry[0] == kind:
                values.append(entry[1])
        if values:
            response.answer.append(dns.rrset.from_rdata_list(
                name, TTL, [_rdata(kind, value) for value in values]))
            return True
        return self._follow_cname(response, name, rdtype, entries, seen)

    def _follow_cname(self, response, name, rdtype, entries, seen):
        aliases = [value for entry in entries if entry != TIMEOUT
                   for kind, value in [entry] if kind == "CNAME"]
        if not aliases or rdtype == dns.rdatatype.CNAME:
            return True
        target = dns.name.from_text(_absolute(aliases[0]))
        response.answer.append(dns.rrset.from_rdata_list(
            name, TTL, [_rdata("CNAME", aliases[0])]))
        if target in seen or target == name or len(seen) >= MAX_CNAME_CHAIN:
            return True
        return self._fill(response, target, rdtype, seen + (name,))
