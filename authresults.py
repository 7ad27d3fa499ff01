"""The Authentication-Results header field (RFC 8601): what this server checked, and how it
came out, for the mail reader and the filters after it.

    field = header_field("mail.test.ru", [spf_clause(spf_result, "bob@remote.test", helo),
                                          *dkim_clauses(dkim_results),
                                          dmarc_clause(dmarc_result)])
    # "Authentication-Results: mail.test.ru;\r\n\tspf=pass smtp.mailfrom=...;\r\n\t..."

    own = OwnFields("mail.test.ru")       # RFC 8601 5: forged (or old) fields of ours
    kept = own.feed(lines) + own.finish()   # whole lines of a message in, the same out
                                            # without them
    remove_own_fields(header_block, "mail.test.ru")     # the same, on a header block

The authserv-id is the server's hostname (RFC 8601 2.5). The field has no version (1 is
the default, RFC 8601 2.2) and one method result a line, folded with a tab (RFC 5322 2.2.3).
`OwnFields` looks only at the header section (up to the first empty line), keeps every other
field as it came, and holds back at most the one Authentication-Results field it is reading.
"""
import re
from typing import NamedTuple

FIELD_NAME = "Authentication-Results"
NO_RESULT = "none"                  # RFC 8601 2.2: no method was applied
FOLD = "\r\n\t"
# RFC 2045 5.1: a token is any visible ASCII but these (tspecials); anything else is quoted
TSPECIALS = set('()<>@,;:\\"/[]?=')
_FIELD_START = re.compile(rb"authentication-results[ \t]*:", re.I)
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


class MethodResult(NamedTuple):
    """One resinfo (RFC 8601 2.2): `spf=pass smtp.mailfrom=bob@remote.test`."""
    method: str                     # spf, dkim, dmarc
    result: str                     # pass, fail, ...
    properties: tuple = ()          # ((ptype.property, value), ...)
    reason: str = ""                # RFC 8601 2.7: reason="..."; "" for none
    comment: str = ""               # a comment after the result, e.g. "p=reject"


def header_field(authserv_id, results):
    """The whole field, folded, without a final CRLF (RFC 8601 2.2)."""
    clauses = [_clause(result) for result in results] or [NO_RESULT]
    return f"{FIELD_NAME}: {authserv_id};" + FOLD + (";" + FOLD).join(clauses)


def _clause(result):
    text = f"{result.method}={result.result}"
    if result.comment:
        text += f" ({_comment_text(result.comment)})"
    if result.reason:
        text += f" reason={_quoted(result.reason)}"
    for name, value in result.properties:
        text += f" {name}={_property_value(value)}"
    return text


def spf_clause(spf_result, mail_from, helo):
    """RFC 8601 2.7.2: smtp.mailfrom, or smtp.helo when the HELO name was the identity
    checked (a null reverse path, RFC 7208 2.4)."""
    mail_from = mail_from.strip("<>")
    prop = ("smtp.mailfrom", mail_from) if mail_from else ("smtp.helo", helo)
    reason = spf_result.reason if spf_result.result not in ("pass", "none") else ""
    return MethodResult("spf", spf_result.result, (prop,), reason)


def dkim_clauses(dkim_results):
    """RFC 8601 2.7.1 and RFC 6008: one dkim= a signature, none= when there was none."""
    if not dkim_results:
        return [MethodResult("dkim", NO_RESULT)]
    return [MethodResult("dkim", result.result,
                         tuple((name, value) for name, value in
                               (("header.d", result.domain), ("header.s", result.selector),
                                ("header.b", result.signature_b)) if value),
                         result.reason if result.result != "pass" else "")
            for result in dkim_results]


def dmarc_clause(dmarc_result):
    """RFC 7489 11.2: dmarc= with header.from; the policy that applied as a comment."""
    properties = (("header.from", dmarc_result.domain),) if dmarc_result.domain else ()
    comment = f"p={dmarc_result.policy}" if dmarc_result.policy else ""
    reason = dmarc_result.reason if dmarc_result.result != "pass" else ""
    return MethodResult("dmarc", dmarc_result.result, properties, reason, comment)


def _property_value(value):
    """RFC 8601 2.2 pvalue: a token, local-part@domain, or else a quoted-string."""
    local_part, at, domain = value.rpartition("@")
    if at and _DOMAIN.fullmatch(domain) and (not local_part or _DOT_ATOM.fullmatch(local_part)):
        return value
    if value and value.isascii() and value.isprintable() and \
            not any(c in TSPECIALS or c == " " for c in value):
        return value
    return _quoted(value)


def _quoted(text):
    """RFC 5322 3.2.4: a quoted-string of the printable part of `text`."""
    text = "".join(c if c.isprintable() else " " for c in text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment_text(text):
    text = "".join(c if c.isprintable() else " " for c in text)
    return re.sub(r"([()\\])", r"\\\1", text)


# Fields of ours that came with the message ------------------------------------------------

def authserv_id(field):
    """The authserv-id of one Authentication-Results field (bytes, folded or not), lower-
    cased: the first word before ';' once comments and folding are gone (RFC 8601 2.2)."""
    value = field.split(b":", 1)[1].decode("utf-8", "replace")
    value = re.sub(r"\s+", " ", value)
    while _COMMENT.search(value):
        value = _COMMENT.sub(" ", value)
    value = value.split(";", 1)[0].strip()
    if value.startswith('"'):
        quoted = re.match(r'"((?:[^"\\]|\\.)*)"', value)
        return re.sub(r"\\(.)", r"\1", quoted.group(1)).lower() if quoted else ""
    return value.split(" ", 1)[0].lower()


class OwnFields:
    """Drops, from a message fed in whole lines, every Authentication-Results field of the
    header section whose authserv-id is ours (RFC 8601 5), continuation lines and all."""

    def __init__(self, authserv_id_):
        self.ours = authserv_id_.lower()
        self.in_header = True
        self.held = None            # the Authentication-Results field being read
        self.removed = 0

    def feed(self, lines):
        """Whole lines (each ending in LF) in; what is kept of them out."""
        if not self.in_header:
            return lines
        kept = []
        for line in lines.splitlines(keepends=True):
            if not self.in_header:
                kept.append(line)
            elif self.held is not None and line[:1] in (b" ", b"\t"):
                self.held += line
            else:
                kept.append(self._release())
                if line in (b"\r\n", b"\n"):
                    self.in_header = False      # RFC 5322 2.1: the body follows
                    kept.append(line)
                elif _FIELD_START.match(line):
                    self.held = line
                else:
                    kept.append(line)
        return b"".join(kept)

    def finish(self):
        """The end of the text: a field still held (a message with no body)."""
        return self._release()

    def _release(self):
        held, self.held = self.held, None
        if held is None:
            return b""
        if authserv_id(held) == self.ours:
            self.removed += 1
            return b""
        return held


def remove_own_fields(header_block, authserv_id_):
    """A header block (CRLF lines; the last may lack its CRLF) without our fields."""
    own = OwnFields(authserv_id_)
    return own.feed(header_block) + own.finish()
