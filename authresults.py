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
field as it came, and holds back at most the start of the one Authentication-Results field
it is reading (MAX_HELD_LINES lines, ID_SCAN_LIMIT octets): its cost is linear in the text,
however the field is folded or nested. A field whose authserv-id cannot be read there (an
unclosed comment, no ';') is removed, as one of ours may be (RFC 8601 5).
"""
import re
from typing import NamedTuple

FIELD_NAME = "Authentication-Results"
NO_RESULT = "none"                  # RFC 8601 2.2: no method was applied
FOLD = "\r\n\t"
# RFC 2045 5.1: a token is any visible ASCII but these (tspecials); anything else is quoted
TSPECIALS = set('()<>@,;:\\"/[]?=')
_FIELD_START = re.compile(rb"authentication-results[ \t]*:", re.I)
# RFC 8601 2.2: the authserv-id is read from this many octets of the value at most; a field
# whose id is not found there is removed (see OwnFields), so that no field costs more
ID_SCAN_LIMIT = 2048
MAX_HELD_LINES = 64                 # continuation lines held before the field is decided
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
    cased, without a trailing dot: the first word before ';' once comments and folding are
    gone (RFC 8601 2.2). "" when it cannot be read in the first ID_SCAN_LIMIT octets of the
    value (an unclosed comment or quote, no ';'). One pass: linear in what it looks at."""
    value = field.split(b":", 1)[1][:ID_SCAN_LIMIT].decode("utf-8", "replace")
    words, word, depth, quoted, escaped = [], [], 0, False, False
    for character in value:
        if escaped:
            escaped = False
            if depth == 0:
                word.append(character)
        elif character == "\\" and (depth or quoted):
            escaped = True
        elif quoted:
            word.append(character)
            quoted = character != '"'
        elif character == "(":
            depth += 1
        elif character == ")" and depth:
            depth -= 1
        elif depth:
            continue
        elif character == ";":
            words.append("".join(word))
            return _authserv_id_of(words)
        elif character.isspace() or character == ")":
            words.append("".join(word))
            word = []
        else:
            word.append(character)
            quoted = character == '"'
    return ""                       # RFC 8601 2.2: no ';' after the authserv-id we can see


def _authserv_id_of(words):
    """The first word before the ';', unquoted (RFC 5322 3.2.4), lower-cased, without a
    trailing dot (an absolute domain name is the same name); "" for one that is neither a
    token nor a quoted-string."""
    words = [word for word in words if word]
    if not words:
        return ""
    first = words[0]
    if first.startswith('"'):
        if len(first) < 2 or not first.endswith('"'):
            return ""
        first = first[1:-1]
    elif any(character in TSPECIALS for character in first):
        return ""                   # RFC 8601 2.2: a value is a token or a quoted-string
    return first.lower().rstrip(".")


class OwnFields:
    """Drops, from a message fed in whole lines, every Authentication-Results field of the
    header section whose authserv-id is ours (RFC 8601 5), continuation lines and all, and
    every one whose authserv-id cannot be read (it may be ours: RFC 8601 5 lets a receiver
    remove what it cannot trust). Only the first MAX_HELD_LINES lines of a field are held:
    the rest of a longer field goes with it if it is removed, and is kept if it is not."""

    def __init__(self, authserv_id_):
        self.ours = authserv_id_.lower().rstrip(".")
        self.in_header = True
        self.held = None            # the lines of the Authentication-Results field being read
        self.held_size = 0          # their octets
        self.dropping = False       # the rest of a long field already found to be removed
        self.removed = 0

    def feed(self, lines):
        """Whole lines (each ending in LF) in; what is kept of them out."""
        if not self.in_header:
            return lines
        kept = []
        for line in lines.splitlines(keepends=True):
            if not self.in_header:
                kept.append(line)
            elif line[:1] in (b" ", b"\t") and (self.held is not None or self.dropping):
                self._continue(line, kept)
            else:
                self.dropping = False
                kept.append(self._release())
                if line in (b"\r\n", b"\n"):
                    self.in_header = False      # RFC 5322 2.1: the body follows
                    kept.append(line)
                elif _FIELD_START.match(line):
                    self.held, self.held_size = [line], len(line)
                else:
                    kept.append(line)
        return b"".join(kept)

    def _continue(self, line, kept):
        """A continuation line of the field held (or being dropped)."""
        if self.dropping:
            return
        self.held.append(line)
        self.held_size += len(line)
        if len(self.held) < MAX_HELD_LINES and self.held_size < ID_SCAN_LIMIT:
            return
        # Enough of the field to read its authserv-id: decide now, stream the rest
        ours = self._is_ours(b"".join(self.held))
        released = self._release()
        kept.append(released)
        self.dropping = ours

    def finish(self):
        """The end of the text: a field still held (a message with no body)."""
        return self._release()

    def _is_ours(self, field):
        return authserv_id(field) in (self.ours, "")

    def _release(self):
        held, self.held = self.held, None
        if held is None:
            return b""
        field = b"".join(held)
        if self._is_ours(field):
            self.removed += 1
            return b""
        return field


def remove_own_fields(header_block, authserv_id_):
    """A header block (CRLF lines; the last may lack its CRLF) without our fields."""
    own = OwnFields(authserv_id_)
    return own.feed(header_block) + own.finish()
