"""relay.py: one transaction against a fake MX on loopback: what goes over the wire, what
each recipient's outcome is, and that a hostile or slow remote is cut off."""
import time
import tracemalloc

import pytest

from delivery import Status
from relay import MAX_REPLY_LINES, Transaction
from resolver import Resolver
from tests.conftest import make_config
from tests.queue_world import log_text, make_log, make_spool, write_spool
from tests.queue_world import world_fixture  # noqa: F401  (the `world` fixture)

BOB, CAROL = "bob@remote.test", "carol@remote.test"
PLAIN_EHLO = ("250-fake.mx", "250 PIPELINING")
DSN_EHLO = ("250-fake.mx", "250-SIZE 100000000", "250-8BITMIME", "250-DSN", "250 PIPELINING")


@pytest.fixture
def relay(tmp_path, world):
    """relay(recipients, **spool_args) -> [report batches], via a route to 127.0.0.2."""
    spool = make_spool(tmp_path)

    def run(recipients, domain="remote.test", config_overrides=None, **spool_args):
        overrides = {"relay.routes": f"remote.test=127.0.0.2:{world.port}",
                     "relay.port": world.port, "log.trace": "yes"}
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
    assert "MAIL: RET left out: the next hop does not offer DSN (RFC 5321 2.2.1)" in log
    assert "RCPT <bob@remote.test>: NOTIFY left out: the next hop does not offer DSN" in log


def test_body_is_dropped_without_8bitmime_and_no_size_without_size(world, relay, tmp_path):
    mx = world.mx("127.0.0.2", ehlo=PLAIN_EHLO)
    batches = relay([BOB], parameters={"BODY": "8BITMIME"})
    assert outcomes(batches)[BOB].status is Status.DONE
    assert mail_and_rcpt_lines(mx) == ["MAIL FROM:<alice@test.ru>", "RCPT TO:<bob@remote.test>"]
    assert "BODY left out: the next hop does not offer 8BITMIME" in log_text(tmp_path)


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
    assert not [line for line in mx.commands if line.startswith(("RCPT", "DATA"))]
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
