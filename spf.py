"""SPF (RFC 7208): may this client send mail for that domain?

    result = spf.check_sender("192.0.2.7", "bob@remote.test", "mx.remote.test",
                              resolver.lookup, receiver="mail.test.ru")
    result.result                   # spf.PASS, spf.FAIL, ... ; .reason says why
    spf.received_spf(result, "192.0.2.7", "bob@remote.test", "mx.remote.test",
                     "mail.test.ru")  # -> "Received-SPF: pass (mail.test.ru: ...) ..."

`check_sender` picks the identity (RFC 7208 2.3, 2.4): the MAIL FROM domain, or for the
null reverse path the HELO name, as postmaster@<helo>. `check_host` is RFC 7208 4 itself,
for callers that already know the domain: the one v=spf1 TXT record of the domain, every
mechanism and modifier, macros (RFC 7208 7), and the limits of RFC 7208 4.6.4 (10 terms
that query DNS, 2 void lookups, 10 MX and PTR names, TIME_LIMIT seconds in all), all
counted over the whole check, includes and redirects included.

`lookup(name, type)` is `resolver.Resolver.lookup`: an Answer, or LookupFailed (which
is a temperror wherever RFC 7208 does not say to skip the name). The explanation of a
`fail` is the text the record's exp= names (RFC 7208 6.2), "" when it has none or when
that text cannot be had; it is untrusted text from the sender's DNS, for a reply's text
at most.
"""
import ipaddress
import re
import time
import urllib.parse
from typing import Callable, NamedTuple, Optional

import address
from resolver import Answer, LookupFailed

Lookup = Callable[[str, str], Answer]     # resolver.Resolver.lookup

NONE, NEUTRAL, PASS, FAIL, SOFTFAIL, TEMPERROR, PERMERROR = (
    "none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")
QUALIFIERS = {"+": PASS, "-": FAIL, "~": SOFTFAIL, "?": NEUTRAL}     # RFC 7208 4.6.2

VERSION = "v=spf1"                  # RFC 7208 4.5
MAX_DNS_TERMS = 10                  # RFC 7208 4.6.4: include a mx ptr exists redirect
MAX_VOID_LOOKUPS = 2                # RFC 7208 4.6.4: answers with no records, or NXDOMAIN
MAX_MX_NAMES = 10                   # RFC 7208 4.6.4: more is a permerror
MAX_PTR_NAMES = 10                  # RFC 7208 4.6.4: the rest are ignored
TIME_LIMIT = 20.0                   # RFC 7208 4.6.4: "at least 20 seconds"
MAX_NAME_LENGTH = 253               # RFC 7208 7.3; RFC 1035 2.3.4
MAX_LABEL_LENGTH = 63               # RFC 1035 2.3.4
IPV4_BITS, IPV6_BITS = 32, 128      # the CIDR lengths when none is given (RFC 7208 5.6)
UNKNOWN = "unknown"                 # RFC 7208 7.3: %{p} unvalidated, %{r} not given
IDENTITY_MAILFROM, IDENTITY_HELO = "mailfrom", "helo"   # RFC 7208 9.1

_clock = time.monotonic             # the time bound's clock (the tests replace it)

# RFC 7208 7.1: macro-expand; the letters c, r, t only in explanation text (exp= TXT)
_MACRO = re.compile(r"%(?:\{([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\}|([%_-]))")
_ESCAPES = {"%": "%", "_": " ", "-": "%20"}
DOMAIN_MACRO_LETTERS = "slodiphv"
EXPLANATION_MACRO_LETTERS = DOMAIN_MACRO_LETTERS + "crt"
# RFC 7208 7.1: toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum /
# "-" ) alphanum ), the greedy form of both
_TOPLABEL = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9]")
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)", re.S)           # RFC 7208 4.6.1
_MECHANISM = re.compile(r"([+?~-]?)([A-Za-z][A-Za-z0-9]*)([:/].*)?", re.S)
_DUAL_CIDR = re.compile(r"(.*?)(?:/([0-9]+))?(?://([0-9]+))?", re.S)      # RFC 7208 5.6
_CIDR = re.compile(r"(.*?)(?:/([0-9]+))?", re.S)
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


class SpfResult(NamedTuple):
    """The outcome of one check: `result` (a constant above), the domain checked, one line
    saying which mechanism matched or what went wrong, and the exp= text of a fail."""
    result: str
    domain: str
    reason: str
    explanation: str = ""


class Mechanism(NamedTuple):
    """One directive of a record (RFC 7208 4.6.2, 5), as parsed."""
    result: str                     # what a match means: the qualifier's result
    name: str                       # "all", "include", "a", "mx", "ptr", "ip4", "ip6", ...
    domain_spec: str = ""           # "" : the current domain
    cidr4: int = IPV4_BITS
    cidr6: int = IPV6_BITS
    network: Optional[object] = None            # ip4, ip6: an ipaddress network
    text: str = ""                  # as written, for the reason


class Record(NamedTuple):
    """A parsed v=spf1 record: its mechanisms in order, and the two modifiers of RFC 7208 6
    (None when absent; unknown modifiers are checked for syntax, then ignored)."""
    mechanisms: tuple
    redirect: Optional[str]
    exp: Optional[str]


class _Macro(NamedTuple):
    """A macro-expand of RFC 7208 7.1: a letter with transformers, or a fixed escape."""
    letter: str = ""
    digits: int = 0                 # 0: all the parts
    reverse: bool = False
    delimiters: str = "."
    fixed: Optional[str] = None     # %% %_ %- stand for this text


class _Stop(Exception):
    """The check ends here with `result` (temperror or permerror)."""

    def __init__(self, result, reason):
        super().__init__(reason)
        self.result = result
        self.reason = reason


def _permerror(reason):
    return _Stop(PERMERROR, reason)


# The identities -------------------------------------------------------------------------

def check_sender(ip: str, mail_from: str, helo: str, lookup: Lookup,
                 receiver: str = "") -> SpfResult:
    """SPF of the MAIL FROM identity, or with a null reverse path (`""` or `"<>"`) of the
    HELO identity (RFC 7208 2.3, 2.4). A HELO that is an address literal or no domain name
    gives none, as does a MAIL FROM domain that is one."""
    mail_from = mail_from.strip("<>")
    if not mail_from:
        if not _is_domain(helo, multi_label=True):
            return SpfResult(NONE, helo, f"HELO {helo!r} is not a domain name")
        return check_host(ip, helo, f"postmaster@{helo}", helo, lookup, receiver)
    domain = mail_from.rpartition("@")[2]
    if not domain.isascii():
        try:
            domain = address.domain_name(domain)     # U-labels: ask DNS in A-labels
        except address.AddressError:
            return SpfResult(NONE, domain, f"{domain!r} is not a domain name")
    return check_host(ip, domain, mail_from, helo, lookup, receiver)


def check_host(ip: str, domain: str, sender: str, helo: str, lookup: Lookup,
               receiver: str = "") -> SpfResult:
    """RFC 7208 4: the SPF result for client `ip` sending as `sender` for `domain`, an
    SpfResult naming `domain` whatever includes and redirects were followed. `ip` must be
    an IP address (ValueError)."""
    check = _Check(lookup, ip, sender, helo, receiver)
    try:
        result = check.evaluate(domain.rstrip("."), explain=True)
    except _Stop as stop:
        return SpfResult(stop.result, domain, stop.reason)
    return result._replace(domain=domain)


def received_spf(result: SpfResult, ip: str, mail_from: str, helo: str,
                 receiver: str) -> str:
    """The Received-SPF header field of RFC 7208 9.1, on one line, without CRLF."""
    mail_from = mail_from.strip("<>")
    identity = IDENTITY_MAILFROM if mail_from else IDENTITY_HELO
    who = mail_from or helo
    comment = _received_comment(result, ip, who)
    comment = f"{receiver}: {comment}" if receiver else comment
    pairs = [("client-ip", ip), ("envelope-from", mail_from), ("helo", helo)]
    if receiver:
        pairs.append(("receiver", receiver))
    pairs.append(("identity", identity))
    values = "; ".join(f"{key}={_header_value(value)}" for key, value in pairs)
    return f"Received-SPF: {result.result} ({_comment_text(comment)}) {values}"


def _received_comment(result, ip, who):
    """RFC 7208 9.1's suggested wording for each result."""
    if result.result == PASS:
        return f"domain of {who} designates {ip} as permitted sender"
    if result.result == FAIL:
        return f"domain of {who} does not designate {ip} as permitted sender"
    if result.result == SOFTFAIL:
        return f"domain of transitioning {who} does not designate {ip} as permitted sender"
    if result.result == NEUTRAL:
        return f"{ip} is neither permitted nor denied by domain of {who}"
    if result.result == NONE:
        return f"{result.domain} does not designate permitted sender hosts"
    return f"error in processing during lookup of {who}: {result.reason}"


def _header_value(value):
    """RFC 7208 9.1: a key's value is a dot-atom or a quoted-string."""
    if _DOT_ATOM.fullmatch(value):
        return value
    text = "".join(ch for ch in value if ch.isprintable() and ch.isascii())
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment_text(text):
    """RFC 5322 3.2.2: ctext, with ( ) \\ as quoted-pairs and nothing unprintable."""
    text = "".join(ch if ch.isprintable() and ch.isascii() else " " for ch in text)
    return re.sub(r"([()\\])", r"\\\1", text)


# Names ----------------------------------------------------------------------------------

def _is_domain(name, multi_label=False):
    """RFC 7208 4.3: labels of 1 to 63 visible ASCII octets, 253 in all, and no address
    literal; a trailing dot is allowed."""
    name = name[:-1] if name.endswith(".") else name
    if not name or len(name) > MAX_NAME_LENGTH or name.startswith("["):
        return False
    if not all(ch.isascii() and ch.isprintable() and ch != " " for ch in name):
        return False
    labels = name.split(".")
    if multi_label and len(labels) < 2:
        return False
    return all(0 < len(label) <= MAX_LABEL_LENGTH for label in labels)


def _query_name(expanded):
    """The name a macro-expanded domain-spec asks DNS about: without its trailing dot,
    shortened from the left to 253 octets (RFC 7208 7.3). None when no query can be made
    of it (empty or over-long labels, non-ASCII): it is treated as a name that does not
    exist (RFC 7208 4.3, 5; the suite's "invalid-domain" tests)."""
    name = expanded[:-1] if expanded.endswith(".") else expanded
    while len(name) > MAX_NAME_LENGTH and "." in name:
        name = name.split(".", 1)[1]
    if not name or not name.isascii() or len(name) > MAX_NAME_LENGTH:
        return None
    if not all(0 < len(label) <= MAX_LABEL_LENGTH for label in name.split(".")):
        return None
    return name


def _name_text(name):
    """A dnspython Name as a lower-case domain without the final dot."""
    return name.to_text(omit_final_dot=True).lower()


def _address(ip):
    """The client address; an IPv4-mapped IPv6 address is the IPv4 one (RFC 7208 5)."""
    parsed = ipaddress.ip_address(ip)
    if parsed.version == 6 and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


# Records --------------------------------------------------------------------------------

def _is_spf_record(text):
    """RFC 7208 4.5: "v=spf1" (any case) followed by a space or the end."""
    head = text[:len(VERSION) + 1].lower()
    return head == VERSION.encode() or head == VERSION.encode() + b" "


def _parse_record(text):
    """A v=spf1 record as a Record; _Stop(permerror) at any syntax error, wherever it is
    (RFC 7208 4.6: the whole record is checked before any of it is evaluated)."""
    mechanisms, modifiers = [], {}
    for term in text[len(VERSION):].split(" "):            # RFC 7208 4.6.1: 1*SP
        if not term:
            continue
        modifier = _MODIFIER.fullmatch(term)
        if modifier:
            _parse_modifier(modifier.group(1).lower(), modifier.group(2), modifiers)
        else:
            mechanisms.append(_parse_mechanism(term))
    return Record(tuple(mechanisms), modifiers.get("redirect"), modifiers.get("exp"))


def _parse_modifier(name, value, modifiers):
    if name in ("redirect", "exp"):
        if name in modifiers:                              # RFC 7208 6: at most once each
            raise _permerror(f"{name}= appears twice")
        _check_domain_spec(value, f"{name}=")
        modifiers[name] = value
        return
    _macro_tokens(value, DOMAIN_MACRO_LETTERS)             # RFC 7208 6: then ignored


def _parse_mechanism(term):
    match = _MECHANISM.fullmatch(term)
    if not match:
        raise _permerror(f"unknown term {term!r}")
    qualifier, name, argument = match.group(1), match.group(2).lower(), match.group(3) or ""
    base = Mechanism(QUALIFIERS[qualifier or "+"], name, text=term)
    if name == "all":
        if argument:
            raise _permerror(f"{term!r}: all takes no argument")
        return base
    if name in ("include", "exists"):
        return base._replace(domain_spec=_required_spec(argument, term))
    if name == "ptr":
        return base._replace(domain_spec=_optional_spec(argument, term))
    if name in ("a", "mx"):
        spec, cidr4, cidr6 = _DUAL_CIDR.fullmatch(argument).groups()
        return base._replace(domain_spec=_optional_spec(spec, term),
                             cidr4=_cidr_length(cidr4, IPV4_BITS, term),
                             cidr6=_cidr_length(cidr6, IPV6_BITS, term))
    if name in ("ip4", "ip6"):
        return base._replace(network=_network(name, argument, term))
    raise _permerror(f"unknown mechanism {term!r}")


def _required_spec(argument, term):
    if not argument.startswith(":") or len(argument) == 1:
        raise _permerror(f"{term!r}: a domain is required")
    _check_domain_spec(argument[1:], term)
    return argument[1:]


def _optional_spec(argument, term):
    return _required_spec(argument, term) if argument else ""


def _cidr_length(digits, maximum, term):
    """RFC 7208 5.6: ip4-cidr-length 0-32, ip6-cidr-length 0-128, no leading zero."""
    if digits is None:
        return maximum
    if (len(digits) > 1 and digits.startswith("0")) or int(digits) > maximum:
        raise _permerror(f"{term!r}: bad prefix length /{digits}")
    return int(digits)


def _network(name, argument, term):
    """ip4:<dotted quad>[/len] or ip6:<address>[/len] (RFC 7208 5.6)."""
    if not argument.startswith(":"):
        raise _permerror(f"{term!r}: an address is required")
    text, digits = _CIDR.fullmatch(argument[1:]).groups()
    address_class = ipaddress.IPv4Address if name == "ip4" else ipaddress.IPv6Address
    try:
        parsed = address_class(text)        # a dotted quad has no leading zeros (5.6)
    except ValueError:
        raise _permerror(f"{term!r}: bad address") from None
    length = _cidr_length(digits, parsed.max_prefixlen, term)
    return ipaddress.ip_network(f"{parsed}/{length}", strict=False)


def _check_domain_spec(spec, where):
    """RFC 7208 7.1: domain-spec = macro-string domain-end, where domain-end is a
    macro-expand or "." toplabel ["."]."""
    tokens = _macro_tokens(spec, DOMAIN_MACRO_LETTERS)
    if tokens and isinstance(tokens[-1], _Macro):
        return
    text = spec[:-1] if spec.endswith(".") else spec
    dot, toplabel = text.rpartition(".")[1:]
    if not dot or not _TOPLABEL.fullmatch(toplabel):
        raise _permerror(f"{where}: bad domain {spec!r}")


def _macro_tokens(text, letters):
    """A macro-string (RFC 7208 7.1) as literal strings and _Macros. Explanation text
    (`letters` with c, r, t) may also hold spaces. _Stop(permerror) on a syntax error."""
    explanation = letters == EXPLANATION_MACRO_LETTERS
    tokens, position = [], 0
    while position < len(text):
        end = text.find("%", position)
        end = len(text) if end < 0 else end
        if end > position:
            tokens.append(_literal(text[position:end], explanation))
            position = end
            continue
        match = _MACRO.match(text, position)
        if not match:
            raise _permerror(f"bad macro in {text!r}")
        tokens.append(_macro(match, letters))
        position = match.end()
    return tokens


def _literal(text, explanation):
    """RFC 7208 7.1: macro-literal = %x21-24 / %x26-7E, and SP in explain-string."""
    lowest = " " if explanation else "!"
    if not all(lowest <= ch <= "~" for ch in text):
        raise _permerror(f"bad character in {text!r}")
    return text


def _macro(match, letters):
    letter, digits, reverse, delimiters, escape = match.groups()
    if escape:
        return _Macro(fixed=_ESCAPES[escape])
    if letter.lower() not in letters:
        raise _permerror(f"macro letter {letter!r} not allowed here")
    if digits and int(digits) == 0:                        # RFC 7208 7.3: nonzero
        raise _permerror("a macro's digit transformer is 0")
    return _Macro(letter, int(digits or 0), bool(reverse), delimiters or ".")


# The check ------------------------------------------------------------------------------

class _Check:
    """One check_host() call and the recursion under it: what the limits count."""

    def __init__(self, lookup, ip, sender, helo, receiver):
        self.lookup = lookup
        self.ip = _address(ip)
        local, at, domain = sender.rpartition("@")
        if not at:
            local, domain = "", sender
        self.local = local or "postmaster"                  # RFC 7208 4.3
        self.sender_domain = domain
        self.helo = helo
        self.receiver = receiver or UNKNOWN
        self.address_type = "A" if self.ip.version == 4 else "AAAA"
        self.deadline = _clock() + TIME_LIMIT
        self.dns_terms = 0
        self.void_lookups = 0

    def evaluate(self, domain, explain):
        """RFC 7208 4.4-4.7 for one domain (the top one, an include's, a redirect's)."""
        if not _is_domain(domain, multi_label=True):       # RFC 7208 4.3
            return SpfResult(NONE, domain, f"{domain!r} is not a domain name")
        text = self._record(domain)
        if text is None:
            return SpfResult(NONE, domain, f"no SPF record for {domain}")
        try:
            record = _parse_record(text)
        except _Stop as stop:
            raise _permerror(f"{domain}: {stop.reason}") from None
        for mechanism in record.mechanisms:
            if self._matches(mechanism, domain):
                return self._matched(mechanism, record, domain, explain)
        if record.redirect is not None:
            return self._redirect(record.redirect, domain, explain)
        return SpfResult(NEUTRAL, domain, f"{domain}: no mechanism matched")   # RFC 7208 4.7

    def _record(self, domain):
        """The text of the domain's one v=spf1 TXT record, or None (RFC 7208 4.4, 4.5)."""
        answer = self._lookup(domain, "TXT")
        texts = [b"".join(record.strings) for record in answer.records]
        found = [text for text in texts if _is_spf_record(text)]
        if len(found) > 1:
            raise _permerror(f"{domain} has {len(found)} v=spf1 records")
        if not found:
            return None
        if not found[0].isascii():                         # RFC 7208 3.1: 7-bit ASCII
            raise _permerror(f"the SPF record of {domain} is not ASCII")
        return found[0].decode("ascii")

    def _matched(self, mechanism, record, domain, explain):
        reason = f"{domain}: {mechanism.text} matched"
        explanation = ""
        if mechanism.result == FAIL and explain and record.exp is not None:
            explanation = self._explanation(record.exp, domain)
        return SpfResult(mechanism.result, domain, reason, explanation)

    def _redirect(self, spec, domain, explain):
        """RFC 7208 6.1: the target's result is ours; none (or a bad name) a permerror."""
        self._count_dns_term()
        target = _query_name(self._expand(spec, domain))
        result = self.evaluate(target, explain) if target else None
        if result is None or result.result == NONE:
            raise _permerror(f"{domain}: redirect={spec}: no SPF record there")
        return result

    def _explanation(self, spec, domain):
        """RFC 7208 6.2: the exp= text, or "" when anything about it goes wrong. Its
        lookup counts against no limit (RFC 7208 4.6.4)."""
        try:
            target = _query_name(self._expand(spec, domain))
            answer = self._query(target, "TXT") if target else None
        except (_Stop, LookupFailed):
            return ""
        if answer is None or len(answer.records) != 1:
            return ""
        text = b"".join(answer.records[0].strings)
        if not text.isascii():
            return ""
        try:
            return self._expand(text.decode("ascii"), domain, EXPLANATION_MACRO_LETTERS)
        except _Stop:
            return ""

    # Mechanisms (RFC 7208 5)

    def _matches(self, mechanism, domain):
        if mechanism.name == "all":
            return True
        if mechanism.name in ("ip4", "ip6"):                # RFC 7208 5.6
            return self.ip in mechanism.network
        self._count_dns_term()
        spec = mechanism.domain_spec
        target = _query_name(self._expand(spec, domain)) if spec else domain
        if mechanism.name == "include":
            return self._include(target, mechanism)
        if target is None:
            return False
        if mechanism.name == "a":
            return self._a(target, mechanism)
        if mechanism.name == "mx":
            return self._mx(target, mechanism)
        if mechanism.name == "ptr":
            return self._ptr(target)
        return self._exists(target)

    def _include(self, target, mechanism):
        """RFC 7208 5.2: pass matches; fail, softfail, neutral do not; none is a permerror
        (temperror and permerror end the whole check)."""
        result = self.evaluate(target, explain=False) if target else None
        if result is None or result.result == NONE:
            raise _permerror(f"{mechanism.text}: no SPF record there")
        return result.result == PASS

    def _a(self, target, mechanism):
        """RFC 7208 5.3: an address of the target within the CIDR length."""
        answer = self._lookup(target, self.address_type)
        self._count_void(answer)
        return self._any_within(answer.records, mechanism)

    def _mx(self, target, mechanism):
        """RFC 7208 5.4: an address of one of the target's MX hosts (no implicit MX)."""
        answer = self._lookup(target, "MX")
        self._count_void(answer)
        if len(answer.records) > MAX_MX_NAMES:             # RFC 7208 4.6.4
            raise _permerror(f"{mechanism.text}: {target} has more than "
                             f"{MAX_MX_NAMES} MX records")
        for record in answer.records:
            host = _name_text(record.exchange)
            if not host or host == ".":                     # a null MX (RFC 7505)
                continue
            if self._any_within(self._lookup(host, self.address_type).records, mechanism):
                return True
        return False

    def _ptr(self, target):
        """RFC 7208 5.5: a validated name of the client that is the target or under it."""
        target = target.lower()
        return any(name == target or name.endswith("." + target)
                   for name in self._validated_names(count_void=True))

    def _exists(self, target):
        """RFC 7208 5.7: any A record, whatever the client's address family."""
        answer = self._lookup(target, "A")
        self._count_void(answer)
        return bool(answer.records)

    def _any_within(self, records, mechanism):
        length = mechanism.cidr4 if self.ip.version == 4 else mechanism.cidr6
        for record in records:
            network = ipaddress.ip_network(f"{record.address}/{length}", strict=False)
            if self.ip in network:
                return True
        return False

    def _validated_names(self, count_void=False):
        """RFC 7208 5.5: names of the client's PTR records (the first 10) that have the
        client's address. A failed PTR lookup gives none; a failed address lookup skips
        that name."""
        try:
            answer = self._query(self.ip.reverse_pointer, "PTR")
        except LookupFailed:
            return []
        if count_void:
            self._count_void(answer)
        names = []
        for record in answer.records[:MAX_PTR_NAMES]:      # RFC 7208 4.6.4
            name = _name_text(record.target)
            try:
                addresses = self._query(name, self.address_type).records
            except LookupFailed:
                continue
            if any(ipaddress.ip_address(found.address) == self.ip for found in addresses):
                names.append(name)
        return names

    # Macros (RFC 7208 7)

    def _expand(self, text, domain, letters=DOMAIN_MACRO_LETTERS):
        return "".join(token if isinstance(token, str) else self._expand_macro(token, domain)
                       for token in _macro_tokens(text, letters))

    def _expand_macro(self, macro, domain):
        """RFC 7208 7.3: split on the delimiters, maybe reverse, keep the rightmost parts,
        join with dots; an upper-case letter URL-escapes the result (RFC 7208 7.3)."""
        if macro.fixed is not None:
            return macro.fixed
        value = self._macro_value(macro.letter.lower(), domain)
        parts = re.split("[" + re.escape(macro.delimiters) + "]", value)
        if macro.reverse:
            parts.reverse()
        if macro.digits:
            parts = parts[-macro.digits:]
        value = ".".join(parts)
        return urllib.parse.quote(value, safe="") if macro.letter.isupper() else value

    def _macro_value(self, letter, domain):
        values = {"s": lambda: f"{self.local}@{self.sender_domain}", "l": lambda: self.local,
                  "o": lambda: self.sender_domain, "d": lambda: domain,
                  "i": self._dotted_ip, "p": lambda: self._validated_name(domain),
                  "v": lambda: "in-addr" if self.ip.version == 4 else "ip6",
                  "h": lambda: self.helo, "c": lambda: str(self.ip),
                  "r": lambda: self.receiver, "t": lambda: str(int(time.time()))}
        return values[letter]()

    def _dotted_ip(self):
        """%{i}: dotted quad, or for IPv6 32 dot-separated nibbles (RFC 7208 7.3)."""
        if self.ip.version == 4:
            return str(self.ip)
        return ".".join(self.ip.exploded.replace(":", ""))

    def _validated_name(self, domain):
        """%{p} (RFC 7208 7.3): a validated name, the domain or under it if one is."""
        names = self._validated_names()
        domain = domain.lower()
        for name in names:
            if name == domain or name.endswith("." + domain):
                return name
        return names[0] if names else UNKNOWN

    # DNS and the limits (RFC 7208 4.6.4)

    def _query(self, name, record_type):
        """lookup(), within the time bound; LookupFailed passes through."""
        if _clock() > self.deadline:
            raise _Stop(TEMPERROR, f"over the {TIME_LIMIT:g} s time limit")
        return self.lookup(name, record_type)

    def _lookup(self, name, record_type):
        """lookup(), where a DNS failure is a temperror (RFC 7208 4.4, 5)."""
        try:
            return self._query(name, record_type)
        except LookupFailed as error:
            raise _Stop(TEMPERROR, f"DNS: {error}") from None

    def _count_dns_term(self):
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_TERMS:
            raise _permerror(f"more than {MAX_DNS_TERMS} DNS-querying terms")

    def _count_void(self, answer):
        if answer.records:
            return
        self.void_lookups += 1
        if self.void_lookups > MAX_VOID_LOOKUPS:
            raise _permerror(f"more than {MAX_VOID_LOOKUPS} void lookups")
