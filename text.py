"""The message text, read as it arrives (after DATA, or in BDAT chunks), and the trace line
this server adds.

The socket layer feeds `MessageText` the octets it receives, in whatever pieces they come.
It finds the end of the text, undoes dot-stuffing, checks every line, counts the size and
hands the text on, in whole lines, to a writer (storage.Draft) that puts it on disk at once:
no message is ever held whole in memory. It keeps only a partial line (at most 1000 octets)
and the first 64 KiB of the text, which hold the header block for the checks at the end.
"""
import datetime
import email.utils
import re

# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF: a run of 1000
# octets without a LF (a CR counts) is one octet too many
MAX_TEXT_LINE = 1000
# RFC 5321 4.1.1.4: <CRLF>.<CRLF> ends the text, and nothing else does (2.3.8)
END_OF_DATA = b"\r\n.\r\n"
BARE_LINE_END = re.compile(rb"\r\n|\r|\n")        # every line end, to make each CRLF
HEAD_KEPT = 65536
# RFC 5321 6.3: a message with this many Received: headers has looped
MAX_RECEIVED_HEADERS = 50


class _Text:
    """What the two ways of sending a text share: the size, the line checks, the head kept
    for the checks at the end, and the writer that gets whole lines."""

    def __init__(self, writer, max_size):
        self.writer = writer            # .write(octets): whole lines, CRLF, unstuffed
        self.max_size = max_size        # RFC 1870: the SIZE the server advertised
        self.size = 0                   # octets of text (dot-stuffing undone)
        self.bare_line_ending = False   # a CR or LF not in a CRLF (RFC 5321 2.3.8)
        self.line_too_long = False      # RFC 5321 4.5.3.1.6
        self.head = bytearray()         # the first HEAD_KEPT octets of the text
        self._partial = b""             # the start of a line whose LF has not arrived

    @property
    def oversize(self):
        return self.size > self.max_size

    def _keep_partial(self, partial):
        if len(partial) < MAX_TEXT_LINE:
            self._partial = partial
            return
        # A line already too long: keep only its last octet, which may be the CR of the
        # CRLF that comes before the final dot.
        self.line_too_long = True
        self._partial = partial[-1:]

    def _check(self, lines):
        """Whole lines (ending in LF) as they came: bare line ends, long lines."""
        crlf = lines.count(b"\r\n")
        if lines.count(b"\n") != crlf or lines.count(b"\r") != crlf:
            self.bare_line_ending = True
        # RFC 5321 4.5.3.1.6: no line over 1000 octets with its CRLF. Splitting is a
        # single pass in C; a regex for a long run of non-LF octets rescans each line
        # from every position (40 times the CPU on a 10 KB text: issue 17's profile)
        if len(lines) >= MAX_TEXT_LINE and max(map(len, lines.split(b"\n"))) >= MAX_TEXT_LINE:
            self.line_too_long = True

    def _pass_on(self, text):
        self.size += len(text)
        if len(self.head) < HEAD_KEPT:
            self.head += text[:HEAD_KEPT - len(self.head)]
        if not self.refused:
            self.writer.write(text)

    def header_block(self):
        """The header section as far as it was kept (RFC 5322 2.1: up to the empty line)."""
        head = bytes(self.head)
        if head.startswith(b"\r\n"):
            return b""
        return head.split(b"\r\n\r\n", 1)[0]

    def received_headers(self):
        return count_received_headers(self.header_block())


class MessageText(_Text):
    """The text of one DATA command while it arrives (RFC 5321 4.1.1.4): dot-stuffed, ended
    by <CRLF>.<CRLF>; a bare CR or LF refuses it whole."""

    refuses_bare_line_endings = True

    def __init__(self, writer, max_size):
        super().__init__(writer, max_size)
        self.stuffed_lines = 0          # lines that began with an added period
        self.ended = False
        # The text so far ends with CRLF: a line that begins now begins after a CRLF. The
        # CRLF that ended the DATA command counts, so an empty text is just ".".
        self._after_crlf = True

    @property
    def refused(self):
        """Already known to be refused: the writer gets nothing more."""
        return self.oversize or self.line_too_long or self.bare_line_ending

    def feed(self, data):
        """Take received octets. Returns None while the text goes on, or, once the end has
        come, the octets that followed it (commands pipelined after the final dot)."""
        pending = self._partial + data
        last_line_end = pending.rfind(b"\n")
        if last_line_end < 0:
            self._keep_partial(pending)
            return None
        lines, self._partial = pending[:last_line_end + 1], b""
        rest = pending[last_line_end + 1:]
        if self._after_crlf and lines.startswith(b".\r\n"):
            end = 0                     # the final dot is the first line
        else:
            found = lines.find(END_OF_DATA)
            end = found + 2 if found >= 0 else -1
        if end < 0:
            self._take(lines)
            self._keep_partial(rest)
            return None
        self._take(lines[:end])
        self.ended = True
        return lines[end + 3:] + rest

    def _take(self, lines):
        """Whole lines of wire text: check, unstuff, pass on."""
        if not lines:
            return
        self._check(lines)
        # RFC 5321 4.5.2: transparency. A line's leading period is removed.
        first_stuffed = self._after_crlf and lines.startswith(b".")
        self.stuffed_lines += lines.count(b"\r\n.") + first_stuffed
        text = lines.replace(b"\r\n.", b"\r\n")
        if first_stuffed:
            text = text[1:]
        self._after_crlf = lines.endswith(b"\r\n")
        self._pass_on(text)


class ChunkedText(_Text):
    """The text of BDAT chunks (RFC 3030 2): exact octet counts, no dot-stuffing, no end
    marker. A bare CR or LF ends nothing here, so it is not refused: it is stored with its
    line end made CRLF (CONTRACT.md), so that a DATA replay cannot be split by it."""

    refuses_bare_line_endings = False

    @property
    def refused(self):
        return self.oversize or self.line_too_long

    def feed(self, data):
        pending = self._partial + data
        last_line_end = pending.rfind(b"\n")
        if last_line_end < 0:
            self._keep_partial(pending)
            return
        lines, self._partial = pending[:last_line_end + 1], b""
        self._take(lines)
        self._keep_partial(pending[last_line_end + 1:])

    def finish(self):
        """The last chunk is in: what is left of a last line gets its CRLF."""
        if self._partial:
            partial, self._partial = self._partial, b""
            self._take(partial + b"\r\n")

    def _take(self, lines):
        self._check(lines)
        if self.bare_line_ending:
            lines = BARE_LINE_END.sub(b"\r\n", lines)
        self._pass_on(lines)


def count_received_headers(header_block):
    return sum(1 for line in header_block.split(b"\r\n") if line[:9].lower() == b"received:")


def received_header(helo, client_literal, hostname, protocol, queue_id, recipients, now=None):
    """RFC 5321 4.4: the trace line this server adds, with RFC 3848's protocol name."""
    for_clause = f"\r\n\tfor <{recipients[0].text}>" if len(recipients) == 1 else ""
    date = email.utils.format_datetime(now or datetime.datetime.now().astimezone())
    line = (f"Received: from {helo} ({client_literal})\r\n"
            f"\tby {hostname} (smtpd) with {protocol} id {queue_id}"
            f"{for_clause};\r\n\t{date}\r\n")
    return line.encode("ascii", "replace")
