"""authresults.OwnFields (RFC 8601 5): which Authentication-Results fields that came with a
message are ours and go, read in one pass however the field is built: nested or unclosed
comments, a trailing dot, an authserv-id pushed out of the bounded prefix, a field folded
over a megabyte. The sizes are ones a quadratic reading would take minutes over; over the
wire, the stored Maildir file is checked byte for byte."""
import authresults
import tests.test_checks as wire
from tests.test_checks import checked_server, inbox, no_kept_texts, send
from tests.test_wire import assert_reply

key, zone = wire.key, wire.zone     # the loopback DNS zone of the wire tests (fixtures)

OURS = "mail.test.ru"
AFTER = b"Subject: x\r\n"
MEGABYTE = 1 << 20
FOLDED = 4 * MEGABYTE               # held by copying, a field this long costs minutes


def kept(block):
    return authresults.remove_own_fields(block, OURS)


def fed_in_pieces(text, piece_lines=10_000):
    """The text through one OwnFields, a block of whole lines at a time, as Draft feeds it."""
    own = authresults.OwnFields(OURS)
    lines = text.splitlines(keepends=True)
    out = [own.feed(b"".join(lines[at:at + piece_lines]))
           for at in range(0, len(lines), piece_lines)]
    return b"".join(out) + own.finish()


def test_the_authserv_id_is_read_through_comments_quotes_and_a_trailing_dot():
    assert authresults.authserv_id(b"Authentication-Results: (a (nested) one) Mail.Test.Ru.;"
                                   b" spf=pass") == OURS
    assert authresults.authserv_id(b'Authentication-Results: "mail.test.ru" 1; none') == OURS
    assert authresults.authserv_id(b"Authentication-Results: (a \\) in it) mail.test.ru; x") == \
        OURS
    assert authresults.authserv_id(b"Authentication-Results: other.example; x") == \
        "other.example"


def test_a_field_whose_authserv_id_cannot_be_read_goes():
    unclosed = b"Authentication-Results: (never closed mail.test.ru; spf=pass\r\n"
    no_semicolon = b"Authentication-Results: mail.test.ru spf=pass\r\n"
    unclosed_quote = b'Authentication-Results: "mail.test.ru; spf=pass\r\n'
    no_token = b"Authentication-Results: mail.test.ru/1; spf=pass\r\n"
    for field in (unclosed, no_semicolon, unclosed_quote, no_token):
        assert kept(field + AFTER) == AFTER, field
    assert kept(b"Authentication-Results: mail.test.ru.; spf=pass\r\n" + AFTER) == AFTER


def test_an_authserv_id_beyond_the_bounded_prefix_is_not_looked_for():
    comment = b"(" + b"c" * authresults.ID_SCAN_LIMIT + b")"
    pushed_out = b"Authentication-Results: " + comment + b" other.example; spf=pass\r\n"
    assert kept(pushed_out + AFTER) == AFTER
    within = b"Authentication-Results: (short) other.example; spf=pass\r\n"
    assert kept(within + AFTER) == within + AFTER


def test_a_megabyte_of_nested_comments_is_removed_in_one_pass():
    opening = b"".join(b" " + b"(" * 100 + b"\r\n" for _ in range(MEGABYTE // 200))
    closing = b"".join(b" " + b")" * 100 + b"\r\n" for _ in range(MEGABYTE // 200))
    field = b"Authentication-Results:" + opening + closing + b" mail.test.ru; spf=pass\r\n"
    assert fed_in_pieces(field + AFTER + b"\r\nbody\r\n") == AFTER + b"\r\nbody\r\n"


def test_a_folded_field_of_megabytes_of_ours_goes_and_one_of_theirs_stays_whole():
    continuation = b" a\r\n" * (FOLDED // 4)
    ours = b"Authentication-Results: mail.test.ru;\r\n" + continuation
    theirs = b"Authentication-Results: other.example;\r\n" + continuation
    body = b"\r\nAuthentication-Results: mail.test.ru; in the body\r\n"
    assert fed_in_pieces(ours + AFTER + body) == AFTER + body
    assert fed_in_pieces(theirs + AFTER + body) == theirs + AFTER + body
    own = authresults.OwnFields(OURS)
    assert own.feed(ours) == b"" and own.finish() == b""      # no body: the end decides
    assert own.removed == 1


def test_a_megabyte_forged_field_over_the_wire_leaves_the_rest_of_the_file_right(
        tmp_path, start_server, zone):
    server = checked_server(tmp_path, start_server, zone)
    forged = b"Authentication-Results: mail.test.ru;\r\n" + b" (((\r\n" * (MEGABYTE // 6)
    theirs = b"Authentication-Results: other.example; spf=pass\r\n"
    rest = b"From: Bob <bob@reject.test>\r\nTo: alice@test.ru\r\nSubject: big\r\n\r\nhello\r\n"
    assert_reply(send(server, "bob@remote.example", forged + theirs + rest), "250 2.0.0")
    [stored] = inbox(server)
    assert b"(((" not in stored
    assert stored.endswith(b"Authentication-Results: other.example; spf=pass\n"
                           + rest.replace(b"\r\n", b"\n"))
    assert stored.count(b"Authentication-Results: mail.test.ru;") == 1     # the one we added
    assert no_kept_texts(server)
