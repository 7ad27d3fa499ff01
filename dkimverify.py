"""DKIM verification (RFC 6376 6) of every signature of a received message, with dkimpy.

    results = verify(message, resolver.lookup)      # [DkimResult], in header order
    # [] : the message is not signed (RFC 8601 result "none")

`message` is the message as received: CRLF line ends, headers and body. Each DKIM-Signature
field gets one DkimResult whose `result` is an RFC 8601 2.7.1 name:

    pass       the signature verifies with the key published at s=._domainkey.d=
    fail       it does not: the body hash or the signature does not match (RFC 6376 6.1.3)
    neutral    the signature field is broken (tags missing or malformed, expired, a t= in
               the future: RFC 6376 6.1.1), or beyond MAX_SIGNATURES
    temperror  the key could not be looked up now (a timeout, SERVFAIL): try later
    permerror  no key record, or one that is not a usable key (RFC 6376 6.1.2)

Key records are asked through `lookup(name, "TXT")` (resolver.Resolver.lookup: an Answer, or
LookupFailed), handed to dkimpy as its `dnsfunc`, so that every DNS question goes to the
server's own nameservers and a failed lookup is told from a missing record.
"""
import base64
import logging
import re
from typing import NamedTuple

import dkim
import dkim.util

from resolver import LookupFailed

PASS, FAIL, NEUTRAL, TEMPERROR, PERMERROR = "pass", "fail", "neutral", "temperror", "permerror"
SIGNATURE_FIELD = b"dkim-signature"
MAX_SIGNATURES = 10             # RFC 6376 6.1: a verifier may limit the signatures it checks
HEADER_B_CHARACTERS = 12        # RFC 6008 4: header.b, enough to tell signatures apart
MAX_REASON_CHARACTERS = 200

# dkimpy logs what it raises or returns; the results and the server's log say it once
DKIMPY_LOG = logging.getLogger("dkimverify.dkimpy")
DKIMPY_LOG.addHandler(logging.NullHandler())
DKIMPY_LOG.propagate = False


class DkimResult(NamedTuple):
    """One signature's outcome, as an Authentication-Results: dkim= clause needs it."""
    result: str             # PASS ... PERMERROR (RFC 8601 2.7.1)
    domain: str             # d= (header.d)
    selector: str           # s= (header.s)
    reason: str             # one line, for the reason= of the clause and the log
    signature_b: str        # the first HEADER_B_CHARACTERS of b= (header.b, RFC 6008)


class KeyRecords:
    """dkimpy's dnsfunc over `lookup`: what it was asked and found, for telling a missing
    key (permerror) from a bad signature (fail). A LookupFailed goes through dkimpy (which
    catches only its own exceptions) to verify_one."""

    def __init__(self, lookup):
        self.lookup = lookup
        self.asked = None           # the name, once dkimpy asked for the key
        self.missing = False        # no TXT record there
        self.key_error = ""         # a record that is no usable key

    def __call__(self, name, timeout=None):
        self.asked = name.decode("utf-8", "replace").rstrip(".")
        if not name.isascii():              # RFC 6376 3.5: d= and s= are A-labels
            self.key_error = "the name is not ASCII"
            return None
        answer = self.lookup(self.asked, "TXT")
        # RFC 6376 3.6.2.2: one TXT record a selector; more give undefined results, and
        # the first that parses is used, as dkimpy itself does
        texts = [b"".join(record.strings) for record in answer.records]
        if not texts:
            self.missing = True
            return None
        for text in texts:
            try:
                dkim.evaluate_pk(name, text)
                return text
            except Exception as error:      # dkimpy's key parsers raise more than their own
                self.key_error = one_line(error)
        return texts[0]


def verify(message, lookup):
    """[DkimResult] for every DKIM-Signature field of `message`, top to bottom."""
    try:
        checker = dkim.DKIM(message, logger=DKIMPY_LOG)
    except Exception as error:              # dkimpy's RFC 5322 parser: a header it rejects
        return unparsed_message_results(message, one_line(error))
    fields = [value for name, value in checker.headers if name.lower() == SIGNATURE_FIELD]
    results = []
    for index, value in enumerate(fields):
        domain, selector, signature_b = signature_tags(value)
        if index >= MAX_SIGNATURES:
            result, reason = NEUTRAL, f"not checked: more than {MAX_SIGNATURES} signatures"
        else:
            result, reason = verify_one(checker, index, lookup)
        results.append(DkimResult(result, domain, selector, reason[:MAX_REASON_CHARACTERS],
                                  signature_b))
    return results


def verify_one(checker, index, lookup):
    """(result, reason) of signature number `index`."""
    records = KeyRecords(lookup)
    try:
        verified = checker.verify(idx=index, dnsfunc=records)
    except LookupFailed as error:
        return TEMPERROR, f"key lookup failed: {one_line(error)}"
    except dkim.ValidationError as error:
        # Raised before the key is fetched: the tags are bad (RFC 6376 6.1.1); after it,
        # the body hash does not match (6.1.3)
        reason = one_line(error).split(" (")[0]   # not the two hashes it may quote
        return (FAIL if records.asked else NEUTRAL), reason
    except dkim.KeyFormatError as error:
        return PERMERROR, one_line(error)       # e.g. a key shorter than RFC 8301 allows
    except Exception as error:                  # dkimpy: a tag list or message it rejects
        return NEUTRAL, one_line(error)
    if verified:
        return PASS, "good signature"
    if records.missing:
        return PERMERROR, f"no key record at {records.asked}"
    if records.key_error:
        return PERMERROR, f"bad key record at {records.asked}: {records.key_error}"
    return FAIL, "signature does not verify"


def signature_tags(value):
    """(d=, s=, first characters of b=) of a DKIM-Signature value; "" for what is not there."""
    try:
        tags = dkim.util.parse_tag_value(value)
    except Exception:                       # a tag list dkimpy cannot parse
        return "", "", ""
    text = {name: tags.get(name, b"").decode("utf-8", "replace") for name in (b"d", b"s")}
    signature = re.sub(r"\s+", "", tags.get(b"b", b"").decode("ascii", "replace"))
    return text[b"d"], text[b"s"], signature[:HEADER_B_CHARACTERS]


def unparsed_message_results(message, reason):
    """A neutral result for each DKIM-Signature of a header dkimpy cannot parse."""
    head = message.split(b"\r\n\r\n", 1)[0]
    count = len(re.findall(rb"^dkim-signature[ \t]*:", head, re.I | re.M))
    return [DkimResult(NEUTRAL, "", "", f"message not parsed: {reason}"[:MAX_REASON_CHARACTERS],
                       "")] * min(count, MAX_SIGNATURES)


def one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def preload():
    """Import now what a verification would import on first use (dkimpy imports all of it
    with itself; this runs its tag and key parsers once)."""
    dkim.util.parse_tag_value(b"v=1; d=preload.invalid; b=AAAA")
    base64.b64decode(b"AAAA")
