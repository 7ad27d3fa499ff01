"""text.py: the message text read as it arrives, whatever pieces the network cuts it into."""
import random

import pytest

from text import HEAD_KEPT, MAX_TEXT_LINE, MessageText, count_received_headers


class Recorder:
    """A writer that keeps what it is given, and how (the Draft's side of the seam)."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    @property
    def text(self):
        return b"".join(self.writes)


def read(wire, pieces=None, max_size=10_000_000):
    """Feed `wire` (what follows the DATA command) in `pieces` (lengths), or whole."""
    writer = Recorder()
    text = MessageText(writer, max_size)
    rest = None
    position = 0
    for length in pieces or [len(wire)]:
        rest = text.feed(wire[position:position + length])
        position += length
        if rest is not None:
            rest += wire[position:]
            break
    return text, writer, rest


def every_split(wire):
    """The wire cut in two at every position, and one octet at a time."""
    yield [len(wire)]
    yield [1] * len(wire)
    for cut in range(1, len(wire)):
        yield [cut, len(wire) - cut]


@pytest.mark.parametrize("wire, expected", [
    (b"Subject: x\r\n\r\nhello\r\n.\r\n", b"Subject: x\r\n\r\nhello\r\n"),
    (b".\r\n", b""),                                            # an empty message
    (b"..leading dot\r\n.\r\n", b".leading dot\r\n"),           # RFC 5321 4.5.2
    (b"a\r\n..\r\n...x\r\n.\r\n", b"a\r\n.\r\n..x\r\n"),
    (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n"),                       # a lone stuffing period
])
def test_end_and_transparency_in_any_split(wire, expected):
    for pieces in every_split(wire):
        text, writer, rest = read(wire, pieces)
        assert text.ended and rest == b"", pieces
        assert writer.text == expected, pieces
        assert text.size == len(expected)
        assert not text.refused


def test_the_writer_gets_whole_lines_only():
    wire = b"line one\r\nline two\r\n..three\r\n.\r\n"
    for pieces in every_split(wire):
        _, writer, _ = read(wire, pieces)
        assert all(piece.endswith(b"\r\n") for piece in writer.writes), (pieces, writer.writes)


def test_what_follows_the_final_dot_is_given_back():
    text, writer, rest = read(b"hi\r\n.\r\nQUIT\r\nNOOP\r\n")
    assert writer.text == b"hi\r\n"
    assert rest == b"QUIT\r\nNOOP\r\n"


@pytest.mark.parametrize("wire", [
    b"a\n.\nb\r\n.\r\n",            # bare LF around a dot line
    b"a\r\n.\nMAIL\r\n.\r\n",
    b"a\n.\r\nb\r\n.\r\n",          # <LF>.<CRLF> is not the end (SMTP smuggling)
    b"a\r.\r\nb\r\n.\r\n",          # bare CR
    b"a\rb\r\n.\r\n",
])
def test_bare_line_endings_never_end_the_text_and_are_flagged(wire):
    for pieces in every_split(wire):
        text, writer, rest = read(wire, pieces)
        assert text.ended and rest == b"", pieces
        assert text.bare_line_ending and text.refused


def test_a_long_line_is_flagged_and_the_buffer_stays_small():
    line = b"x" * (MAX_TEXT_LINE - 2)
    ok, _, _ = read(line + b"\r\n.\r\n")
    assert not ok.line_too_long                     # 998 octets + CRLF: the limit itself
    long_one, _, _ = read(line + b"y\r\n.\r\n")
    assert long_one.line_too_long
    writer = Recorder()
    endless = MessageText(writer, 10_000_000)
    for _ in range(200):                            # 2 MB without a line end
        assert endless.feed(b"z" * 10000) is None
        assert len(endless._partial) < MAX_TEXT_LINE
    assert endless.line_too_long and writer.text == b""
    assert endless.feed(b"\r\n.\r\n") == b""        # the end still ends it


def test_over_the_size_limit_the_writer_gets_nothing_more():
    body = b"".join(b"line %04d of the text\r\n" % n for n in range(100))
    text, writer, rest = read(body + b".\r\n", pieces=[230] * 20, max_size=1000)
    assert text.ended and text.oversize and text.refused
    assert len(writer.text) <= 1000 + 230
    assert text.size == len(body)


def test_random_splits_of_a_large_message_give_the_same_text():
    generator = random.Random(5)
    lines = [b"." * generator.randrange(3) + bytes(generator.randrange(97, 123)
                                                   for _ in range(generator.randrange(80)))
             for _ in range(3000)]
    original = b"".join(line + b"\r\n" for line in lines)
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"
    for _ in range(5):
        pieces = [generator.randrange(1, 5000) for _ in range(len(wire))]
        text, writer, rest = read(wire, pieces)
        assert text.ended and rest == b"" and writer.text == original
        assert text.stuffed_lines == sum(line.startswith(b".") for line in lines)
        assert bytes(text.head) == original[:HEAD_KEPT]


def test_received_headers_are_counted_in_the_header_block_only():
    header = b"Received: a\r\nreceived: b\r\nSubject: s\r\n"
    text, _, _ = read(header + b"\r\nReceived: in the body\r\n.\r\n")
    assert text.received_headers() == 2
    assert count_received_headers(b"") == 0
    no_header, _, _ = read(b"\r\nReceived: body only\r\n.\r\n")
    assert no_header.received_headers() == 0
