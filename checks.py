"""The checks of incoming mail (`[checks]`): SPF at RCPT, DKIM and DMARC once the text is
whole, the refusals they earn, and the header fields that record them.

    checks = Checks.from_config(config, resolver.lookup, log)  # None when all are off;
                                                    # made before the privilege drop
    session.findings = checks.start(session)        # at MAIL; None: this client is exempt
    refusal = checks.at_recipient(session)          # at each RCPT routed to a local mailbox
    outcome = checks.after_text(session.findings, envelope, draft, header_block)
    # outcome.refusal, or draft.deliver_with(outcome.fields, outcome.junk) and commit

Who is checked: clients that may not relay, that is neither in `[relay] networks` nor
authenticated (transaction.may_relay; issue 15). Their recipients are all local (relaying
for them is refused), so every message checked ends in a Maildir. Clients that may relay
are not checked at all: no DNS, no header, the one-pass path (which still takes fields with
our authserv-id out of the Maildir copies as the text streams, RFC 8601 5; mailsystem.py).

Each check is `off` (not evaluated, not in the header), `tag` (evaluated and recorded in
Authentication-Results, never refuses) or `enforce`:
- SPF (RFC 7208), once per transaction at the first local RCPT: `fail` is 550 5.7.23,
  `temperror` 451 4.7.24 (RFC 7372 3.2; RFC 7208 8.4, 8.6); softfail, neutral, none and
  permerror are recorded only.
- DKIM (RFC 6376): a message with a signature that fails (a hash or signature mismatch)
  and none that passes is 550 5.7.20 (RFC 7372 3.1), or 451 4.7.5 when one of them could
  not have its key looked up (RFC 3463 3.8: "cryptographic failure", the key not
  available); a signature that is broken or unsupported (neutral, permerror) is as none
  (RFC 6376 6.1, 6.3), and an unsigned message is accepted.
- DMARC (RFC 7489): `fail` under p=reject is 550 5.7.1 (RFC 7489 10.3), under
  p=quarantine the copies go to each mailbox's `.Junk/` folder (RFC 7489 6.3); `temperror`
  is 451 4.7.1 (RFC 7489 6.6.3 leaves DNS trouble to the receiver; RFC 3463 3.8 X.7.1);
  several From: fields are 550 5.7.1 (RFC 7489 6.6.1, RFC 5322 3.6). DMARC reads the whole
  header section, beyond the head the text keeps (text.HEAD_KEPT).
DMARC reads the SPF and DKIM results that were evaluated: with SPF or DKIM `off`, it sees
none of that kind, and only the other can pass it.
"""
import ipaddress
import re
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import authresults
import dkimverify
import dmarc
import replies
import spf
from text import HEAD_KEPT
from transaction import may_relay

OFF, TAG, ENFORCE = "off", "tag", "enforce"
MAX_REPLY_DETAIL = 120              # characters of DNS-supplied text a reply may quote
FOLD_AFTER = 78                     # RFC 5322 2.1.1: lines SHOULD be at most 78 characters
# RFC 7208 9.1: the keys of Received-SPF, where a line may be folded after the ';'
SIGNATURE_FIELD = re.compile(rb"(?:^|\r\n)dkim-signature[ \t]*:", re.I)     # RFC 6376 3.5
RECEIVED_SPF_KEY = re.compile(
    r"; (?=(?:client-ip|envelope-from|helo|problem|receiver|identity|mechanism)=)")


@dataclass
class Findings:
    """What the checks of one transaction found so far."""
    client_ip: str
    helo: str
    mail_from: str                  # the reverse path's text, "" for <>
    spf_result: Optional[spf.SpfResult] = None      # once evaluated
    dkim_results: list = field(default_factory=list)
    dmarc_result: Optional[dmarc.DmarcResult] = None


class Outcome(NamedTuple):
    """After the text: a refusal, or the header fields to add and where the copies go."""
    refusal: Optional[replies.Reply] = None
    fields: bytes = b""             # Authentication-Results, Received-SPF (CRLF lines)
    junk: bool = False              # DMARC quarantine: into each mailbox's .Junk/


class Checks:
    def __init__(self, hostname, lookup, spf_mode=TAG, dkim_mode=TAG, dmarc_mode=TAG,
                 log=None):
        self.hostname = hostname    # the authserv-id (RFC 8601 2.5) and SPF's receiver
        self.lookup = lookup
        self.spf_mode, self.dkim_mode, self.dmarc_mode = spf_mode, dkim_mode, dmarc_mode
        self.log = log

    @classmethod
    def from_config(cls, config, lookup, log=None):
        modes = (config.check_spf, config.check_dkim, config.check_dmarc)
        if all(mode == OFF for mode in modes):
            return None
        if config.check_dmarc != OFF:
            dmarc.preload()         # now, while the server may still read its own files
        return cls(config.hostname, lookup, *modes, log=log)

    def start(self, session):
        """At MAIL: the Findings of a client that is checked, None for one that is not."""
        if may_relay(session):
            return None
        return Findings(_plain_ip(session.client.ip), session.helo or "",
                        session.envelope.reverse_path.text)

    def at_recipient(self, session):
        """RFC 7208 2.4: SPF of the MAIL FROM domain (the HELO name for <>), once; the
        refusal an enforced fail or temperror earns, for this RCPT and those after it."""
        findings = session.findings
        if findings is None or self.spf_mode == OFF:
            return None
        if findings.spf_result is None:
            findings.spf_result = spf.check_sender(findings.client_ip, findings.mail_from,
                                            findings.helo, self.lookup, self.hostname)
        if self.spf_mode != ENFORCE:
            return None
        result = findings.spf_result
        if result.result == spf.FAIL:
            explanation = f": {_detail(result.explanation)}" if result.explanation else ""
            return replies.SPF_FAILED.format(domain=result.domain, ip=findings.client_ip,
                                             explanation=explanation)
        if result.result == spf.TEMPERROR:
            return replies.SPF_TEMPORARY.format(domain=result.domain,
                                                reason=_detail(result.reason))
        return None

    def after_text(self, findings, draft, header_block, queue_id=""):
        """DKIM and DMARC of the whole text (read back from the draft's file), the refusal
        they earn when enforced, else the fields to add. `header_block` is the head the
        text kept (text.HEAD_KEPT); a longer header section is read whole from the draft."""
        if findings is None:
            return Outcome()
        try:
            header_block = whole_header_section(draft, header_block)
            if self.dkim_mode != OFF and may_be_signed(header_block):
                findings.dkim_results = dkimverify.verify(draft.read_text(), self.lookup)
        except OSError as error:
            if self.log:
                self.log.error("[%s] cannot read the text back for DKIM and DMARC: %s",
                               queue_id, error.strerror or error)
            return Outcome(replies.LOCAL_ERROR)
        if self.dmarc_mode != OFF:
            findings.dmarc_result = dmarc.evaluate_message(
                header_block, findings.spf_result, findings.dkim_results, self.lookup)
        self._log(findings, queue_id)
        refusal = self._dmarc_refusal(findings.dmarc_result) or \
            self._dkim_refusal(findings.dkim_results)
        if refusal:
            return Outcome(refusal)
        return Outcome(None, self.header_fields(findings), self._quarantined(findings))

    def _quarantined(self, findings):
        result = findings.dmarc_result
        return (self.dmarc_mode == ENFORCE and result is not None
                and result.result == dmarc.FAIL and result.policy == dmarc.QUARANTINE)

    def _dmarc_refusal(self, result):
        if self.dmarc_mode != ENFORCE or result is None:
            return None
        if result.from_fields > 1:
            # RFC 7489 6.6.1: a message with several From: fields (RFC 5322 3.6: one) may
            # be rejected; accepting it would let a second From: get past any policy
            return replies.DMARC_SEVERAL_FROM.format(count=result.from_fields)
        if result.result == dmarc.FAIL and result.policy == dmarc.REJECT:
            return replies.DMARC_REJECTED.format(domain=result.domain,
                                                 reason=_detail(result.reason))
        if result.result == dmarc.TEMPERROR:
            return replies.DMARC_TEMPORARY.format(domain=result.domain or "the From: domain",
                                                  reason=_detail(result.reason))
        return None

    def _dkim_refusal(self, results):
        """RFC 6376 6.1, 6.3: a signature that is broken or cannot be checked (neutral,
        permerror) is as no signature, and unsigned mail is accepted; only a signature that
        fails (a hash or signature mismatch), with none passing, refuses."""
        if self.dkim_mode != ENFORCE or \
                any(result.result == dkimverify.PASS for result in results):
            return None
        for result in results:
            if result.result == dkimverify.TEMPERROR:
                return replies.DKIM_TEMPORARY.format(domain=result.domain,
                                                     reason=_detail(result.reason))
        failed = [result for result in results if result.result == dkimverify.FAIL]
        if not failed:
            return None
        return replies.DKIM_FAILED.format(count=len(results), domain=failed[0].domain,
                                          reason=_detail(failed[0].reason))

    def header_fields(self, findings):
        """Authentication-Results (RFC 8601) and Received-SPF (RFC 7208 9.1), CRLF lines,
        of the checks that are on."""
        clauses, lines = [], []
        if self.spf_mode != OFF and findings.spf_result is not None:
            clauses.append(authresults.spf_clause(findings.spf_result, findings.mail_from,
                                                  findings.helo))
        if self.dkim_mode != OFF:
            clauses += authresults.dkim_clauses(findings.dkim_results)
        if self.dmarc_mode != OFF and findings.dmarc_result is not None:
            clauses.append(authresults.dmarc_clause(findings.dmarc_result))
        lines.append(authresults.header_field(self.hostname, clauses))
        if self.spf_mode != OFF and findings.spf_result is not None:
            lines.append(folded(spf.received_spf(findings.spf_result, findings.client_ip,
                                                 findings.mail_from, findings.helo,
                                                 self.hostname)))
        return "".join(line + "\r\n" for line in lines).encode("utf-8")

    def _log(self, findings, queue_id):
        if not self.log:
            return
        said = [f"spf={findings.spf_result.result}"] if findings.spf_result else []
        said += [f"dkim={result.result}({result.domain})" for result in findings.dkim_results]
        verdict = findings.dmarc_result
        if verdict:
            policy = f" p={verdict.policy}" if verdict.policy else ""
            said.append(f"dmarc={verdict.result}({verdict.domain}{policy})")
        self.log.info("[%s] checks of %s: %s", queue_id, findings.client_ip,
                      " ".join(said) or "none")


def whole_header_section(draft, header_block):
    """The header section of checked mail whole (RFC 5322 2.1: up to the first empty line):
    the head kept, or read from the draft's file when the head was cut at text.HEAD_KEPT
    (RFC 7489 6.6.1: a From: field after it counts as much as one before). The section is
    bounded by the message size limit. Raises OSError."""
    if len(header_block) < HEAD_KEPT:
        return header_block
    return draft.read_header_section()


def may_be_signed(header_block):
    """Whether the text has to be read back for DKIM: a DKIM-Signature field in the header
    block, or a header section too long to have been kept whole (text.HEAD_KEPT). Unsigned
    mail, the most of it, is never read into memory."""
    return len(header_block) >= HEAD_KEPT or bool(SIGNATURE_FIELD.search(header_block))


def folded(received_spf):
    """RFC 7208 9.1 (CFWS after each ';'), RFC 5322 2.2.3: Received-SPF folded before the
    key-value pairs that follow its comment, one pair a line, when it is long."""
    if len(received_spf) <= FOLD_AFTER:
        return received_spf
    comment_end = received_spf.rfind(") client-ip=")
    if comment_end < 0:
        return received_spf
    head, pairs = received_spf[:comment_end + 1], received_spf[comment_end + 2:]
    return head + "\r\n\t" + RECEIVED_SPF_KEY.sub(";\r\n\t", pairs)


def _plain_ip(ip):
    """An IPv4-mapped IPv6 address as the IPv4 address it is (RFC 7208 5: the client)."""
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def _detail(text):
    """Text from DNS or a library, fit for a reply line: printable ASCII, cut short."""
    text = " ".join("".join(c if c.isascii() and c.isprintable() else " "
                            for c in text).split())
    return text[:MAX_REPLY_DETAIL] or "no details"
