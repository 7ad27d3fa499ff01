"""Reverse-paths, forward-paths and ESMTP parameters, parsed as RFC 5321 4.1.2 writes them.

    Path        = "<" [ A-d-l ":" ] Mailbox ">"
    Mailbox     = Local-part "@" ( Domain / address-literal )
    Local-part  = Dot-string / Quoted-string

Pure functions over strings: `parse_path` returns an `Address` or raises `AddressError` with
a short reason that the reply quotes. An `Address` is the one type for a mailbox everywhere in
the server: the envelope, the routing decision, the spool and the relay.
"""
import ipaddress
import re
import unicodedata
from typing import NamedTuple

import idna

# RFC 5321 4.5.3.1.1-3: size limits
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# RFC 5322 3.2.3: atext, the characters of an unquoted local part
ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
DOT_STRING = re.compile(rf"{ATOM}(?:\.{ATOM})*")
# RFC 5321 4.1.2: qtextSMTP (32-33, 35-91, 93-126) or a quoted pair (backslash, 32-126)
QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
# RFC 6531 3.3: with SMTPUTF8, atext and qtextSMTP also take any non-ASCII character
UTF8 = "\u0080-\U0010ffff"
ATOM_UTF8 = rf"[A-Za-z0-9!#$%&'*+\-/=?^_`{{|}}~{UTF8}]+"
DOT_STRING_UTF8 = re.compile(rf"{ATOM_UTF8}(?:\.{ATOM_UTF8})*")
QUOTED_STRING_UTF8 = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{UTF8}]|\\[\x20-\x7e])*"')
# RFC 5321 4.1.2: sub-domain = Let-dig [Ldh-str]
SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"    # RFC 1035 2.3.4: 63 octets
DOMAIN = re.compile(rf"{SUB_DOMAIN}(?:\.{SUB_DOMAIN})*")
# RFC 5321 4.1.2: esmtp-keyword and esmtp-value
ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")


class AddressError(ValueError):
    """The path is not RFC 5321 syntax; the message says why, in a few words."""


class NeedsSmtputf8(AddressError):
    """A non-ASCII address in a transaction that did not say SMTPUTF8 (RFC 6531 3.2)."""


class Address(NamedTuple):
    local_part: str     # as written, quotes removed ("a b"@x has local part `a b`); NFC
    domain: str         # lower-cased A-labels (bücher.test is xn--bcher-kva.test); an
                        # address literal keeps its brackets: [127.0.0.1]

    @property
    def text(self):
        """The mailbox as RFC 5321 writes it, without angle brackets; "" for <>."""
        if self.is_null:
            return ""
        return f"{quote_local_part(self.local_part)}@{self.domain}"

    def __str__(self):
        return self.text

    @property
    def is_null(self):
        return self.local_part == "" and self.domain == ""

    @property
    def is_literal(self):
        return self.domain.startswith("[")

    @property
    def is_ascii(self):
        """Whether it can travel without SMTPUTF8: the domain always can (A-labels)."""
        return self.local_part.isascii()

    @classmethod
    def parse(cls, text, utf8=True):
        """`local@domain` without brackets (a users or config file); raises AddressError."""
        return parse_mailbox(text, utf8)


NULL_ADDRESS = Address("", "")      # the reverse path <> (RFC 5321 4.5.5)


def parse_path(text, allow_null=False, allow_bare_postmaster=False, utf8=False):
    """Parse `<...>` into an Address. `<>` only where allowed (a reverse path);
    `<Postmaster>` without a domain only where allowed (RCPT, RFC 5321 4.1.1.3); UTF-8 only
    with `utf8` (the transaction said SMTPUTF8), else NeedsSmtputf8."""
    if not text.isascii() and not utf8:
        raise NeedsSmtputf8("a non-ASCII address needs MAIL FROM:<...> SMTPUTF8")
    if len(text.encode()) > MAX_PATH:
        raise AddressError(f"path longer than {MAX_PATH} octets")
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("angle brackets required, as in <user@example.org>")
    inner = text[1:-1]
    if inner == "":
        if allow_null:
            return NULL_ADDRESS
        raise AddressError("empty path")
    if allow_bare_postmaster and inner.lower() == "postmaster":
        return Address("postmaster", "")
    mailbox = _strip_source_route(inner)
    return parse_mailbox(mailbox, utf8)


def _strip_source_route(inner):
    """RFC 5321 4.1.2 and C: a source route `@a,@b:user@c` is accepted and ignored."""
    if not inner.startswith("@"):
        return inner
    route, colon, mailbox = inner.partition(":")
    if not colon:
        raise AddressError("source route without ':'")
    for hop in route.split(","):
        if not hop.startswith("@") or not DOMAIN.fullmatch(hop[1:]):
            raise AddressError("bad source route")
    return mailbox


def parse_mailbox(text, utf8=False):
    if not text.isascii() and not utf8:
        raise NeedsSmtputf8("a non-ASCII address needs MAIL FROM:<...> SMTPUTF8")
    local_part, domain = _split_mailbox(text, utf8)
    # RFC 6532 3.1: UTF-8 text in NFC, so that the same name is the same octets
    local_part = unicodedata.normalize("NFC", local_part)
    if len(local_part.encode()) > MAX_LOCAL_PART:
        raise AddressError(f"local part longer than {MAX_LOCAL_PART} octets")
    domain = _parse_domain(domain)
    if len(domain) > MAX_DOMAIN:
        raise AddressError(f"domain longer than {MAX_DOMAIN} octets")
    return Address(_unquote(local_part), domain)


def _split_mailbox(text, utf8):
    quoted, dot_string = (QUOTED_STRING_UTF8, DOT_STRING_UTF8) if utf8 \
        else (QUOTED_STRING, DOT_STRING)
    if text.startswith('"'):
        match = quoted.match(text)
        if not match:
            raise AddressError("bad quoted local part")
        local_part, rest = match.group(), text[match.end():]
    else:
        local_part, at, rest = text.rpartition("@")
        if not at:
            raise AddressError("no @domain")
        rest = "@" + rest
        if not dot_string.fullmatch(local_part):
            raise AddressError("bad local part")
    if not rest.startswith("@") or len(rest) == 1:
        raise AddressError("no @domain")
    return local_part, rest[1:]


def _parse_domain(text):
    if text.startswith("["):
        return _parse_address_literal(text)
    return domain_name(text)


def domain_name(text):
    """A domain as this server keeps it: lower-cased A-labels (RFC 5890 2.3.2.1), so that
    U-labels and A-labels are one domain and DNS is asked in A-labels (IDNA 2008, the
    `idna` package). AddressError if it is not a domain name."""
    if not text.isascii() or "xn--" in text.lower():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise AddressError("bad domain") from None
    if not DOMAIN.fullmatch(text):
        raise AddressError("bad domain")
    return text.lower()


def _parse_address_literal(text):
    """RFC 5321 4.1.3: [1.2.3.4] or [IPv6:...]; the general form is not accepted."""
    if not text.endswith("]"):
        raise AddressError("bad address literal")
    body = text[1:-1]
    try:
        if body[:5].lower() == "ipv6:":
            if "%" in body:         # IPv6-addr has no zone id (RFC 5321 4.1.3)
                raise ValueError(body)
            return f"[IPv6:{ipaddress.IPv6Address(body[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(body)}]"
    except ValueError:
        raise AddressError("bad address literal") from None


def _unquote(local_part):
    if not local_part.startswith('"'):
        return local_part
    return re.sub(r"\\(.)", r"\1", local_part[1:-1])


def quote_local_part(local_part):
    """The shortest RFC 5321 form: a Dot-string when it is one, else a Quoted-string."""
    if DOT_STRING.fullmatch(local_part) or DOT_STRING_UTF8.fullmatch(local_part):
        return local_part
    return '"' + re.sub(r'(["\\])', r"\\\1", local_part) + '"'


def parse_parameters(text):
    """`SIZE=1000 BODY=8BITMIME` -> {"SIZE": "1000", "BODY": "8BITMIME"} (RFC 5321 4.1.2).
    Keywords are case-insensitive (upper-cased here); a keyword without a value maps to None."""
    parameters = {}
    for item in text.split():
        keyword, equals, value = item.partition("=")
        if not ESMTP_KEYWORD.fullmatch(keyword) or (equals and not ESMTP_VALUE.fullmatch(value)):
            raise AddressError(f"bad parameter {ascii(item)}")
        parameters[keyword.upper()] = value if equals else None
    return parameters


def split_path_and_parameters(text):
    """`<a@b> SIZE=10` -> ("<a@b>", "SIZE=10"). The path ends at the first `>` outside quotes."""
    in_quotes = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return text[:index + 1], text[index + 1:].strip()
    return text, ""
