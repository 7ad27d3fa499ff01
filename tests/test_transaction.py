"""relay.py: one transaction against a fake MX on loopback: what goes over the wire, what
each recipient's outcome is, and that a hostile or slow remote is cut off."""
import time
import tracemalloc

import pytest

from delivery import Status
from relay import BDAT_CHUNK, MAX_REPLY_LINES, Transaction
from spool import text_shape, unstuffed
from resolver import Resolver
from tests.conftest import make_config
from tests.fake_mx import ehlo_offering
from tests.queue_world import a_record, dot_stuff, log_text, make_log, make_spool, write_spool
from tests.queue_world import world_fixture  # noqa: F401  (the `world` fixture)

BOB, CAROL = "bob@remote.test", "carol@remote.test"
PLAIN_EHLO = ("250-fake.mx", "250 PIPELINING")
DSN_EHLO = ("250-fake.mx", "250-SIZE 100000000", "250-8BITMIME", "250-DSN", "250 PIPELINING")
SEVEN_BIT_EHLO = ehlo_offering(eight_bit=False)         # SIZE and PIPELINING only
TWO_MX = {"remote.test": [("MX", "10 mx1.remote.test."), ("MX", "20 mx2.remote.test.")],
          "mx1.remote.test": a_record("127.0.0.2"), "mx2.remote.test": a_record("127.0.0.3")}


@pytest.fixture
def relay(tmp_path, world):
    """relay(recipients, **spool_args) -> [report batches], via a route to 127.0.0.2, or
    through DNS (the MX records `dns`) when it is given."""
    spool = make_spool(tmp_path)

    def run(recipients, domain="remote.test", config_overrides=None, dns=None, **spool_args):
        overrides = {"relay.routes": f"remote.test=127.0.0.2:{world.port}",
                     "relay.port": world.port, "log.trace": "yes"}
        if dns is not None:
            world.resolve(dns)
            overrides = world.overrides(**{"log.trace": "yes"})
        overrides.update(config_overrides or {})
        config = make_config(tmp_path, **overrides)
        log = make_log(tmp_path)
        message = spool.read(write_spool(spool, recipients, **spool_args))
        batches = []
        Transaction(config, Resolver(config, log), log, message, domain,
                    list(message.recipients), batches.append).run()
        return batches

    return run


def outcomes(batches):
    merged = {}
    for batch in batches:
        assert not set(batch) & set(merged), "a recipient reported twice"
        merged.update(batch)
    return merged


def mail_and_rcpt_lines(mx):
    return [line for line in mx.commands if line.startswith(("MAIL", "RCPT"))]


def test_the_recorded_parameters_are_replayed_to_a_hop_that_offers_them(world, relay):
    mx = world.mx("127.0.0.2", ehlo=DSN_EHLO)
    text = b"Subject: 8bit \xd0\xbf\r\n\r\n.dot line\r\n"
    batches = relay([(BOB, {"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;bob@remote.test"})],
                    text=text, parameters={"BODY": "8BITMIME", "RET": "HDRS", "ENVID": "q1"})
    assert outcomes(batches)[BOB].status is Status.DONE
    assert mail_and_rcpt_lines(mx) == [
        f"MAIL FROM:<alice@test.ru> BODY=8BITMIME RET=HDRS ENVID=q1 SIZE={len(text) + 1}",
        "RCPT TO:<bob@remote.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob@remote.test"]
    assert mx.messages[0][2] == text            # streamed, dot-stuffing undone by the MX


def test_parameters_the_hop_does_not_offer_are_left_out_and_said(world, relay, tmp_path):
    mx = world.mx("127.0.0.2")                  # SIZE and 8BITMIME, no DSN
    relay([(BOB, {"NOTIFY": "NEVER"})], parameters={"BODY": "8BITMIME", "RET": "FULL"})
    size = len(b"From: <alice@test.ru>\r\nSubject: relay test\r\n\r\nHello over there.\r\n")
    assert mail_and_rcpt_lines(mx) == [f"MAIL FROM:<alice@test.ru> BODY=8BITMIME SIZE={size}",
                                       "RCPT TO:<bob@remote.test>"]
    log = log_text(tmp_path)
    assert "MAIL: RET left out: the next hop does not offer DSN; its notices stop here " \
           "(RFC 3461 5.2.2)" in log
    assert "RCPT <bob@remote.test>: NOTIFY left out: the next hop does not offer DSN" in log


def test_body_is_dropped_without_8bitmime_and_no_size_without_size(world, relay, tmp_path):
    mx = world.mx("127.0.0.2", ehlo=PLAIN_EHLO)
    batches = relay([BOB], parameters={"BODY": "8BITMIME"})
    assert outcomes(batches)[BOB].status is Status.DONE
    assert mail_and_rcpt_lines(mx) == ["MAIL FROM:<alice@test.ru>", "RCPT TO:<bob@remote.test>"]
    assert "BODY left out: the next hop does not offer 8BITMIME; the text is 7-bit after " \
           "all, so it goes without BODY (RFC 6152 3)" in log_text(tmp_path)


def test_helo_when_ehlo_is_refused(world, relay):
    mx = world.mx("127.0.0.2", ehlo=("502 5.5.1 EHLO not implemented",))
    batches = relay([BOB], parameters={"BODY": "8BITMIME"})
    assert outcomes(batches)[BOB].status is Status.DONE
    assert mx.commands[:3] == ["EHLO mail.test.ru", "HELO mail.test.ru",
                               "MAIL FROM:<alice@test.ru>"]


def test_the_remote_size_limit_fails_the_message_before_mail(world, relay):
    mx = world.mx("127.0.0.2", ehlo=("250-fake.mx", "250 SIZE 100"))
    batches = relay([BOB, CAROL], text=b"Subject: big\r\n\r\n" + b"x" * 200 + b"\r\n")
    result = outcomes(batches)
    assert {key: outcome.status for key, outcome in result.items()} == {
        BOB: Status.FAILED, CAROL: Status.FAILED}
    assert result[BOB].reply.startswith("552 5.3.4")
    assert not [line for line in mx.commands if line.startswith("MAIL")]


@pytest.mark.parametrize("reply, status", [("550 5.7.1 you are not welcome", Status.FAILED),
                                           ("451 4.3.0 come back later", Status.PENDING)])
def test_mail_refused_by_the_remote(world, relay, reply, status):
    mx = world.mx("127.0.0.2", mail_reply=reply)
    result = outcomes(relay([BOB, CAROL]))
    assert {outcome.status for outcome in result.values()} == {status}
    assert result[CAROL].reply == reply
    assert result[CAROL].remote == f"127.0.0.2:{world.port}"
    # RFC 2920 3.1: to a PIPELINING host the RCPTs went with MAIL; no text follows a refusal
    assert [line for line in mx.commands if line.startswith("RCPT")] == [
        "RCPT TO:<bob@remote.test>", "RCPT TO:<carol@remote.test>"]
    assert not [line for line in mx.commands if line.startswith("DATA")]
    assert mx.sessions == 1                     # not another host: the transaction began


def test_refused_recipients_are_reported_before_data(world, relay):
    mx = world.mx("127.0.0.2", rcpt=["550 5.1.1 no such user", "250 2.1.5 ok"])
    batches = relay([BOB, CAROL])
    assert [{key: outcome.status for key, outcome in batch.items()} for batch in batches] == [
        {BOB: Status.FAILED}, {CAROL: Status.DONE}]
    assert mx.messages[0][1] == [CAROL]


def test_a_connection_lost_after_mail_leaves_the_rest_pending(world, relay):
    world.mx("127.0.0.2", rcpt=["250 2.1.5 ok", "CLOSE"])
    result = outcomes(relay([BOB, CAROL]))
    assert {outcome.status for outcome in result.values()} == {Status.PENDING}
    assert result[BOB].reply == "451 4.4.2 remote closed the connection"


def test_an_address_literal_is_its_own_next_hop(world, relay):
    mx = world.mx("127.0.0.3")
    result = outcomes(relay(["bob@[127.0.0.3]"], domain="[127.0.0.3]"))
    assert result["bob@[127.0.0.3]"].status is Status.DONE
    assert mx.messages[0][1] == ["bob@[127.0.0.3]"]


def test_tls_required_but_not_offered_sends_nothing(world, relay):
    mx = world.mx("127.0.0.2")
    result = outcomes(relay([BOB], config_overrides={"relay.tls": "require"}))
    assert result[BOB].status is Status.PENDING
    assert result[BOB].reply.startswith("451 4.7.10")
    assert not [line for line in mx.commands if line.startswith("MAIL")]


def test_done_is_reported_before_quit(world, tmp_path):
    """The report callback runs before QUIT goes out: the MX has not seen QUIT yet then."""
    mx = world.mx("127.0.0.2", hang_on_quit=True)
    config = make_config(tmp_path, **{"relay.routes": f"remote.test=127.0.0.2:{world.port}",
                                      "relay.command_timeout": "1"})
    log = make_log(tmp_path)
    spool = make_spool(tmp_path)
    message = spool.read(write_spool(spool, [BOB]))
    quit_seen = []
    Transaction(config, Resolver(config, log), log, message, "remote.test",
                list(message.recipients),
                lambda batch: quit_seen.append(("QUIT" in mx.commands, batch))).run()
    assert [(seen, {k: o.status for k, o in batch.items()}) for seen, batch in quit_seen] == [
        (False, {BOB: Status.DONE})]
    assert mx.wait_for_quit(timeout=1)          # QUIT went out after, and was never answered


def test_an_endless_reply_is_cut_off_with_memory_bounded(world, relay, tmp_path):
    mx = world.mx("127.0.0.2", ehlo_flood=True)
    tracemalloc.start()
    started = time.monotonic()
    try:
        result = outcomes(relay([BOB]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 3
    assert result[BOB].status is Status.PENDING
    assert f"longer than {MAX_REPLY_LINES} lines" in result[BOB].reply
    assert peak < 2 << 20
    assert mx.sessions == 1 and not mx.messages
    assert log_text(tmp_path).count("<- 250-flood") <= MAX_REPLY_LINES


def test_a_dribbled_reply_is_cut_off_by_its_deadline(world, relay):
    world.mx("127.0.0.2", dribble=0.05)         # every byte well within any recv timeout
    started = time.monotonic()
    result = outcomes(relay([BOB], config_overrides={"relay.command_timeout": "1"}))
    elapsed = time.monotonic() - started
    assert result[BOB].status is Status.PENDING
    assert result[BOB].reply.startswith("451 4.4.2 remote reply too slow")
    assert 1 <= elapsed < 3


# ---------------------------------------------------------------------------------------
# SMTPUTF8 (RFC 6531 3.2) and 8BITMIME (RFC 6152 3): only to a host that offers them

JORG = "jörg@remote.test"
UTF8_TEXT = "From: <alice@test.ru>\r\nSubject: grüße\r\n\r\nHallo.\r\n".encode()


def test_a_utf8_address_fails_with_5_6_7_where_no_host_offers_smtputf8(world, relay, tmp_path):
    first, second = world.mx("127.0.0.2"), world.mx("127.0.0.3")      # neither offers it
    result = outcomes(relay([JORG], dns=TWO_MX, parameters={"SMTPUTF8": None}))
    assert result[JORG].status is Status.FAILED
    assert result[JORG].reply.startswith("550 5.6.7 ")
    assert result[JORG].remote == f"127.0.0.2:{world.port}"
    for mx in (first, second):                   # each was asked, and given nothing
        assert mx.sessions == 1 and not mail_and_rcpt_lines(mx) and "QUIT" in mx.commands
    log = log_text(tmp_path)
    assert "needs SMTPUTF8 (a non-ASCII address) and 127.0.0.2" in log
    assert "does not offer it: not sent there (RFC 6531 3.2)" in log


def test_a_second_mx_that_offers_smtputf8_is_used_instead(world, relay):
    first = world.mx("127.0.0.2")
    second = world.mx("127.0.0.3", ehlo=ehlo_offering("SMTPUTF8"))
    result = outcomes(relay([JORG], dns=TWO_MX, parameters={"SMTPUTF8": None}))
    assert result[JORG].status is Status.DONE
    assert not mail_and_rcpt_lines(first)
    assert second.messages[0][1] == [JORG]


def test_smtputf8_offered_the_parameter_and_the_utf8_address_go_on_the_wire(world, relay,
                                                                          tmp_path):
    mx = world.mx("127.0.0.2", ehlo=ehlo_offering("SMTPUTF8"))
    result = outcomes(relay([JORG], sender="böb@test.ru", text=UTF8_TEXT,
                            parameters={"SMTPUTF8": None, "BODY": "8BITMIME"}))
    assert result[JORG].status is Status.DONE
    mail = [line for line in mx.raw_commands if line.startswith(b"MAIL")][0]
    assert mail == (f"MAIL FROM:<böb@test.ru> SMTPUTF8 BODY=8BITMIME "
                    f"SIZE={len(UTF8_TEXT)}").encode()
    assert f"RCPT TO:<{JORG}>".encode() in mx.raw_commands
    assert mx.messages[0][2] == UTF8_TEXT
    assert f"127.0.0.2:{world.port} offers SMTPUTF8: MAIL says SMTPUTF8 (RFC 6531 3.4)" in \
        log_text(tmp_path)


def test_utf8_in_the_header_of_a_smtputf8_message_needs_smtputf8(world, relay):
    world.mx("127.0.0.2")                       # 8BITMIME, no SMTPUTF8
    result = outcomes(relay([BOB], text=UTF8_TEXT,
                            parameters={"SMTPUTF8": None, "BODY": "8BITMIME"}))
    assert result[BOB].status is Status.FAILED
    assert result[BOB].reply.startswith("550 5.6.7 ") and "UTF-8 in its header" in \
        result[BOB].reply


def test_an_ascii_message_with_smtputf8_goes_without_it(world, relay, tmp_path):
    mx = world.mx("127.0.0.2")                  # no SMTPUTF8
    result = outcomes(relay([BOB], parameters={"SMTPUTF8": None}))
    assert result[BOB].status is Status.DONE
    assert mail_and_rcpt_lines(mx)[0].startswith("MAIL FROM:<alice@test.ru> SIZE=")
    assert "MAIL: SMTPUTF8 left out: the next hop does not offer SMTPUTF8; the message is " \
           "all ASCII, so it goes without (RFC 6531 3.2)" in log_text(tmp_path)


@pytest.mark.parametrize("parameters", [{"BODY": "8BITMIME"}, {}],
                         ids=["declared", "undeclared"])
def test_8bit_text_fails_with_5_6_3_at_a_7bit_host(world, relay, tmp_path, parameters):
    mx = world.mx("127.0.0.2", ehlo=SEVEN_BIT_EHLO)
    text = b"Subject: plain\r\n\r\nbody \xd0\xbf\r\n"
    result = outcomes(relay([BOB, CAROL], text=text, parameters=parameters))
    assert {outcome.status for outcome in result.values()} == {Status.FAILED}
    assert result[BOB].reply.startswith("554 5.6.3 ")
    assert not mail_and_rcpt_lines(mx) and not mx.messages
    assert "not converted to quoted-printable (RFC 6152 3)" in log_text(tmp_path)


def test_one_host_unsuitable_and_one_down_waits(world, relay):
    world.mx("127.0.0.2", ehlo=SEVEN_BIT_EHLO)  # mx2 (127.0.0.3): nobody listens
    result = outcomes(relay([BOB], dns=TWO_MX, text=b"Subject: x\r\n\r\n\xff\r\n"))
    assert result[BOB].status is Status.PENDING
    assert result[BOB].reply.startswith("451 4.4.1 cannot connect to 127.0.0.3")


def test_the_text_shape_is_found_across_pieces():
    assert text_shape([b"Subject: a\r\n\r", b"\nbody \xff\r\n"]) == (False, True)
    assert text_shape([b"Subject: \xff", b"\r\n\r\nbody\r\n"]) == (True, True)
    assert text_shape([b"\r\nbody \xff\r\n"]) == (False, True)      # an empty header block
    assert text_shape([b"Subject: a\r\n", b"\r\n", b"plain\r\n"]) == (False, False)
    assert text_shape([b"X: no empty line \xc3\xa9\r\n"]) == (True, True)


def test_size_within_the_remote_limit_is_said(world, relay, tmp_path):
    world.mx("127.0.0.2", ehlo=("250-fake.mx", "250 SIZE 100000"))
    assert outcomes(relay([BOB]))[BOB].status is Status.DONE
    assert "is within the SIZE 100000 of 127.0.0.2" in log_text(tmp_path)


# ---------------------------------------------------------------------------------------
# DSN: whether the next hop takes the notices on (RFC 3461 5.2.1, 5.2.2)


@pytest.mark.parametrize("ehlo, passed_on", [(DSN_EHLO, True), (PLAIN_EHLO, False)],
                         ids=["dsn", "no-dsn"])
def test_a_done_outcome_says_whether_the_hop_took_the_notices_on(world, relay, tmp_path,
                                                                ehlo, passed_on):
    world.mx("127.0.0.2", ehlo=ehlo)
    result = outcomes(relay([(BOB, {"NOTIFY": "SUCCESS"})]))
    assert (result[BOB].status, result[BOB].dsn_passed_on) == (Status.DONE, passed_on)
    assert ("NOTIFY=SUCCESS cannot be passed on: a 'relayed' notice goes to the sender"
            in log_text(tmp_path)) is not passed_on


# ---------------------------------------------------------------------------------------
# CHUNKING (RFC 3030): BDAT out


CHUNKING_EHLO = ehlo_offering("CHUNKING")
DOTTED = (b"Subject: dots\r\n\r\n.one dot\r\n..two dots\r\n.\r\nend\r\n"
          b"a line ending in a dot.\r\n")


def test_bdat_to_a_chunking_host_carries_the_text_unstuffed(world, relay, tmp_path):
    mx = world.mx("127.0.0.2", ehlo=CHUNKING_EHLO)
    result = outcomes(relay([BOB, CAROL], text=DOTTED))
    assert {outcome.status for outcome in result.values()} == {Status.DONE}
    assert mx.messages == [("alice@test.ru", [BOB, CAROL], DOTTED)]
    assert mx.chunks == [(f"BDAT {len(DOTTED)} LAST", DOTTED)]
    assert "DATA" not in mx.commands
    assert "offers CHUNKING: the text goes unstuffed with BDAT" in log_text(tmp_path)
    assert "(RFC 3030 2)" in log_text(tmp_path)


def test_a_large_text_goes_in_several_chunks(world, relay):
    mx = world.mx("127.0.0.2", ehlo=CHUNKING_EHLO)
    line = b"." + b"x" * 76 + b"\r\n"           # every line stuffed in the spool file
    text = b"Subject: big\r\n\r\n" + line * 2000
    assert outcomes(relay([BOB], text=text))[BOB].status is Status.DONE
    assert mx.messages[0][2] == text
    commands = [command for command, _ in mx.chunks]
    assert len(commands) >= 3 and commands[-1].endswith(" LAST")
    assert not any(command.endswith(" LAST") for command in commands[:-1])
    assert all(len(octets) <= BDAT_CHUNK for _, octets in mx.chunks)
    assert all(command == f"BDAT {len(octets)}" + (" LAST" if command.endswith("LAST") else "")
               for command, octets in mx.chunks)


def test_an_empty_text_is_bdat_0_last(world, relay):
    mx = world.mx("127.0.0.2", ehlo=CHUNKING_EHLO)
    assert outcomes(relay([BOB], text=b""))[BOB].status is Status.DONE
    assert mx.chunks == [("BDAT 0 LAST", b"")]
    assert mx.messages[0][2] == b""


def test_data_when_chunking_is_off(world, relay, tmp_path):
    mx = world.mx("127.0.0.2", ehlo=CHUNKING_EHLO)
    result = outcomes(relay([BOB], text=DOTTED, config_overrides={"relay.chunking": "no"}))
    assert result[BOB].status is Status.DONE
    assert "DATA" in mx.commands and mx.chunks == []
    assert mx.messages[0][2] == DOTTED
    assert "offers CHUNKING, but [relay] chunking = no: DATA" in log_text(tmp_path)


@pytest.mark.parametrize("reply, status", [("554 5.6.0 no thanks", Status.FAILED),
                                           ("452 4.3.1 full", Status.PENDING)])
def test_a_refused_chunk_ends_the_transaction(world, relay, reply, status):
    mx = world.mx("127.0.0.2", ehlo=CHUNKING_EHLO, bdat_reply=reply)
    text = b"Subject: big\r\n\r\n" + (b"y" * 76 + b"\r\n") * 2000
    result = outcomes(relay([BOB], text=text))
    assert (result[BOB].status, result[BOB].reply) == (status, reply)
    assert len(mx.chunks) == 1 and not mx.messages      # nothing sent after the refusal
    assert mx.commands[-1] == "QUIT"


def test_unstuffing_a_line_split_across_pieces():
    text = b"a\r\n.b\r\n..c\r\n.\r\n"
    stuffed = dot_stuff(text)
    for cut in range(1, len(stuffed)):
        pieces = [stuffed[:cut], stuffed[cut:]]
        assert b"".join(unstuffed(pieces)) == text, cut
