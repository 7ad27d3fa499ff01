"""DMARC (RFC 7489): does the From: domain's owner vouch for this message?

    author = dmarc.from_domain(header_block)            # FromDomain(domain, result, reason)
    verdict = dmarc.evaluate(author.domain, spf_result, dkim_results, resolver.lookup)
    verdict.result                  # dmarc.PASS, FAIL, NONE, TEMPERROR, PERMERROR
    verdict.policy                  # "none", "quarantine", "reject", or "" without a record

`from_domain` reads the RFC5322.From domain out of a header block (RFC 7489 6.6.1);
`evaluate` finds the policy record (RFC 7489 6.6.3: `_dmarc.<domain>`, else at the
organisational domain, RFC 7489 3.2), and passes the message when SPF passed for an aligned
MAIL FROM domain or a DKIM signature passed for an aligned d= (RFC 7489 3.1, 4.2).
`evaluate_message` is the two in one, as checks.py calls it.

`spf_result` is an spf.SpfResult (its `domain` is the checked MAIL FROM domain, or the HELO
name for `<>`, RFC 7208 2.4), `dkim_results` a list of dkimverify.DkimResult; only their
`result` and `domain` fields are read (the result names are the same strings in all three
modules: "pass", "temperror"). `lookup(name, "TXT")` is resolver.Resolver.lookup:
an Answer, or LookupFailed, which is a temperror.

Choices where RFC 7489 leaves them to the receiver:
- no From: field, or one without a domain: `none` (nothing to evaluate; RFC 7489 6.6.1);
  several From: fields (RFC 5322 3.6 allows one), a From: that cannot be parsed or whose
  domain is no domain name: `permerror`, with `from_fields` saying how many From: fields
  there were (checks.py refuses several under enforce, RFC 7489 6.6.1).
- a From: with addresses in different domains: each is evaluated and the strictest verdict
  applies (SEVERITY), so that adding an address never gets a message past a policy.
- pct= is read and ignored: the policy applies to every message, as with pct=100 (RFC 7489
  6.6.4 makes sampling the receiver's business; a small server has no sample to take).
- a message that would fail, but whose aligned SPF or DKIM check was a temperror, is a
  `temperror`: a later try may pass.
"""
import email.utils
import threading
from typing import NamedTuple

import publicsuffixlist

import address
from resolver import LookupFailed

PASS, FAIL, NONE, TEMPERROR, PERMERROR = "pass", "fail", "none", "temperror", "permerror"
POLICY_NONE, QUARANTINE, REJECT = "none", "quarantine", "reject"
POLICIES = (POLICY_NONE, QUARANTINE, REJECT)        # RFC 7489 6.3: p= and sp=
RELAXED, STRICT = "r", "s"                          # RFC 7489 6.3: adkim= and aspf=
RECORD_PREFIX = "_dmarc"                            # RFC 7489 6.1
VERSION_TAG = ("v", "DMARC1")                       # RFC 7489 6.3: first, exactly this

NOT_A_DOMAIN = "\0"               # _domain_of: an address whose domain is no domain name
# The strictest verdict first: of a From: with several domains, the one that applies
SEVERITY = ((FAIL, REJECT), (TEMPERROR, None), (FAIL, QUARANTINE), (FAIL, POLICY_NONE),
            (PERMERROR, None), (NONE, None), (PASS, None))

_psl = None
_psl_lock = threading.Lock()


class FromDomain(NamedTuple):
    """The RFC5322.From domain, or why there is none (`result` NONE or PERMERROR)."""
    domain: str
    result: str = ""
    reason: str = ""
    from_fields: int = 1            # From: fields in the header block (RFC 5322 3.6: one)
    domains: tuple = ()             # the domains of a From: with addresses in several


class Record(NamedTuple):
    """A parsed policy record (RFC 7489 6.3) and the name it was found at."""
    found_at: str
    policy: str                 # p=
    subdomain_policy: str       # sp= (p= when absent)
    dkim_alignment: str         # adkim=
    spf_alignment: str          # aspf=


class DmarcResult(NamedTuple):
    result: str                 # PASS ... PERMERROR
    policy: str                 # the p= or sp= that applies; "" when no record applies
    domain: str                 # the From: domain
    reason: str                 # one line, for the log and the header's comment
    from_fields: int = 1        # several: a message RFC 5322 3.6 does not allow


def public_suffix_list():
    """The Public Suffix List, built once (it takes a while) for every thread."""
    global _psl
    with _psl_lock:
        if _psl is None:
            _psl = publicsuffixlist.PublicSuffixList()
        return _psl


def preload():
    """Build the Public Suffix List now, and parse one From: field: both read files of the
    Python installation, which a server that drops its privileges may not read later."""
    public_suffix_list()
    from_domain(b"From: preload@preload.invalid")


def organizational_domain(domain):
    """RFC 7489 3.2: the public suffix and one label more; a public suffix is its own."""
    return public_suffix_list().privatesuffix(domain) or domain


def aligned(identifier, author, mode):
    """RFC 7489 3.1.1, 3.1.2: strict is the same name; relaxed the same organisational
    domain."""
    identifier, author = identifier.lower().rstrip("."), author.lower().rstrip(".")
    if not identifier or not author:
        return False
    if identifier == author:
        return True
    return mode == RELAXED and \
        organizational_domain(identifier) == organizational_domain(author)


# The From: domain -------------------------------------------------------------------------

def from_domain(header_block):
    """RFC 7489 6.6.1: the domain of the From: field of a header block (bytes, CRLF). With
    addresses in several domains, `domains` has them all and `domain` is ""."""
    fields = [value for name, value in _fields(header_block) if name == "from"]
    if not fields:
        return FromDomain("", NONE, "no From: field")
    if len(fields) > 1:
        # RFC 5322 3.6: exactly one From: field
        return FromDomain("", PERMERROR, f"{len(fields)} From: fields", from_fields=len(fields))
    try:
        mailboxes = email.utils.getaddresses(fields)
    except Exception:               # RecursionError on nested comments, and the like
        return FromDomain("", PERMERROR, "From: not parsable")
    domains = {_domain_of(mailbox) for _, mailbox in mailboxes}
    if NOT_A_DOMAIN in domains:
        return FromDomain("", PERMERROR, "From: domain is not a domain name")
    domains.discard("")
    if not domains:
        return FromDomain("", NONE, "no domain in the From: field")
    if len(domains) > 1:
        return FromDomain("", domains=tuple(sorted(domains)))
    return FromDomain(domains.pop())


def _fields(header_block):
    """(lower-cased name, unfolded value) of each header field."""
    fields = []
    for line in header_block.decode("utf-8", "replace").split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1][1].append(line)
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append([name.strip().lower(), [value]])
    return [(name, "".join(value)) for name, value in fields]


def _domain_of(mailbox):
    """The domain of an address, as DNS is asked for it; "" for none, NOT_A_DOMAIN for text
    that is no domain name (which would otherwise go to DNS as it is)."""
    domain = mailbox.rpartition("@")[2].strip().rstrip(".") if "@" in mailbox else ""
    if not domain:
        return ""
    try:
        return address.domain_name(domain)
    except address.AddressError:
        return NOT_A_DOMAIN


# The policy record ------------------------------------------------------------------------

def find_record(author, lookup):
    """RFC 7489 6.6.3: the record at _dmarc.<author>, else at its organisational domain;
    None when neither has one. Raises LookupFailed."""
    record = _record_at(author, lookup)
    organizational = organizational_domain(author)
    if record is None and organizational != author:
        record = _record_at(organizational, lookup)
    return record


def _record_at(domain, lookup):
    answer = lookup(f"{RECORD_PREFIX}.{domain}", "TXT")
    texts = [b"".join(record.strings).decode("utf-8", "replace") for record in answer.records]
    records = [text for text in texts if _tags(text)[:1] == [VERSION_TAG]]
    # RFC 7489 6.6.3: several records are as none
    return parse_record(records[0], domain) if len(records) == 1 else None


def _tags(text):
    """[(name, value)] of a tag list (RFC 7489 6.4), names lower-cased, values stripped."""
    tags = []
    for part in text.split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags.append((name.strip().lower(), value.strip()))
    return tags


def parse_record(text, found_at):
    """A Record, or None for one DMARC does not apply (RFC 7489 6.6.3 step 6)."""
    tags = dict(_tags(text)[1:])
    policy = tags.get("p", "").lower()
    subdomain_policy = tags.get("sp", policy).lower()
    if policy not in POLICIES or subdomain_policy not in POLICIES:
        # RFC 7489 6.6.3: a bad p= or sp= with a rua= is read as p=none, else no DMARC
        if not tags.get("rua"):
            return None
        policy = subdomain_policy = POLICY_NONE
    # RFC 7489 6.3: adkim and aspf are "r" (the default) or "s"; anything else is "r"
    return Record(found_at, policy, subdomain_policy,
                  STRICT if tags.get("adkim", "").lower() == STRICT else RELAXED,
                  STRICT if tags.get("aspf", "").lower() == STRICT else RELAXED)


def applicable_policy(record, author):
    """RFC 7489 6.3: sp= for a subdomain of the organisational domain that has the record."""
    return record.subdomain_policy if author != record.found_at else record.policy


# Evaluation -------------------------------------------------------------------------------

def evaluate(header_from_domain, spf_result, dkim_results, lookup):
    """The DMARC result of a message from `header_from_domain`."""
    author = header_from_domain.lower().rstrip(".")
    try:
        record = find_record(author, lookup)
    except LookupFailed as error:
        return DmarcResult(TEMPERROR, "", author, f"policy lookup failed: {error}")
    if record is None:
        return DmarcResult(NONE, "", author, f"no DMARC record for {author}")
    policy = applicable_policy(record, author)
    spf_aligned = spf_result is not None and aligned(spf_result.domain, author,
                                                    record.spf_alignment)
    if spf_aligned and spf_result.result == PASS:
        return DmarcResult(PASS, policy, author, f"SPF passed for aligned {spf_result.domain}")
    dkim_aligned = [result for result in dkim_results
                    if aligned(result.domain, author, record.dkim_alignment)]
    for result in dkim_aligned:
        if result.result == PASS:
            return DmarcResult(PASS, policy, author,
                               f"DKIM signature of aligned {result.domain} passed")
    if (spf_aligned and spf_result.result == TEMPERROR) or \
            any(result.result == TEMPERROR for result in dkim_aligned):
        return DmarcResult(TEMPERROR, policy, author,
                           "an aligned SPF or DKIM check could not be completed")
    return DmarcResult(FAIL, policy, author,
                       f"neither SPF nor DKIM passed for a domain aligned with {author}")


def evaluate_message(header_block, spf_result, dkim_results, lookup):
    """from_domain and evaluate in one: the DMARC result of a header block. A From: with
    addresses in several domains gets the strictest of their verdicts (RFC 7489 6.6.1 does
    not say whose policy applies; none of them may be bypassed by adding another)."""
    author = from_domain(header_block)
    if author.result:
        return DmarcResult(author.result, "", "", author.reason, author.from_fields)
    if not author.domains:
        return evaluate(author.domain, spf_result, dkim_results, lookup)
    verdicts = [evaluate(domain, spf_result, dkim_results, lookup) for domain in author.domains]
    return min(verdicts, key=_severity)


def _severity(verdict):
    """Where a verdict stands in SEVERITY (0: the strictest)."""
    for rank, (result, policy) in enumerate(SEVERITY):
        if verdict.result == result and policy in (None, verdict.policy):
            return rank
    return len(SEVERITY)
