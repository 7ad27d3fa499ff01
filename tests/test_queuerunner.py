"""queuerunner.py end to end: spool files in, loopback DNS, fake MXs on 127.0.0.x, bounces
through a recording `submit`; what the MX received, what is on disk, what the DSN says."""
import json
import os
import time

import pytest

import relay
from delivery import DeliveryRecord, Outcome, Status
from queuerunner import LOCAL_ERROR, QueueRunner, queue_listing
from spool import Spool
from tests.conftest import make_config
from tests.queue_world import (TEXT, RecordingSubmit, a_record, delivery_status, log_text,
                               make_log, make_router, make_spool, write_spool)
from tests.queue_world import world_fixture  # noqa: F401  (the `world` fixture)

BOB, CAROL = "bob@remote.test", "carol@remote.test"
ONE_MX = {"remote.test": [("MX", "10 mx1.remote.test.")], "mx1.remote.test": a_record("127.0.0.2")}


@pytest.fixture
def spool(tmp_path):
    return make_spool(tmp_path)


@pytest.fixture
def start_runner(tmp_path, world, spool):
    """start_runner(submit=None, **config) -> a started QueueRunner; stopped after the test."""
    runners = []

    def start(submit=None, **overrides):
        config = make_config(tmp_path, **world.overrides(**overrides))
        runner = QueueRunner(config, spool, make_router(), submit or RecordingSubmit(),
                             make_log(tmp_path))
        runners.append(runner)
        return runner.start()

    yield start
    for runner in runners:
        runner.stop(grace=2)


def settle(runner, later=0.0):
    """Wait (on the runner's schedule, not a sleep) until everything due within `later`
    seconds from now has had its attempt."""
    assert runner.wait_for_one_pass(time.time() + later, timeout=20)


def state_of(spool, name, recipient):
    return (spool.read_state(name) or {}).get("recipients", {}).get(recipient)


# ---------------------------------------------------------------------------------------
# Delivery and the choice of host


def test_delivery_through_the_mx(world, spool, start_runner, tmp_path):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2")
    name = write_spool(spool, [BOB])
    settle(start_runner())
    assert mx.messages == [("alice@test.ru", [BOB], TEXT)]
    assert [line for line in mx.commands if line[:4] in ("EHLO", "MAIL", "RCPT")] == [
        "EHLO mail.test.ru", f"MAIL FROM:<alice@test.ru> SIZE={len(TEXT)}", f"RCPT TO:<{BOB}>"]
    assert spool.names() == [] and not os.path.exists(spool.state_path(name))
    log = log_text(tmp_path)
    assert "MX lookup for remote.test: 10 mx1.remote.test" in log
    assert f"<{BOB}>: done: sent" in log and "finished; removed from the queue" in log


def test_the_preferred_mx_first_and_the_next_when_it_is_down(world, spool, start_runner):
    world.resolve({"remote.test": [("MX", "20 backup.remote.test."),
                                   ("MX", "10 primary.remote.test.")],
                   "primary.remote.test": a_record("127.0.0.3"),      # nothing listens
                   "backup.remote.test": a_record("127.0.0.4")})
    backup = world.mx("127.0.0.4")
    write_spool(spool, [BOB])
    settle(start_runner())
    assert backup.messages[0][1] == [BOB]


def test_a_4xx_greeting_moves_on_to_the_next_mx(world, spool, start_runner):
    world.resolve({"remote.test": [("MX", "10 busy.remote.test."), ("MX", "20 ok.remote.test.")],
                   "busy.remote.test": a_record("127.0.0.3"),
                   "ok.remote.test": a_record("127.0.0.4")})
    busy = world.mx("127.0.0.3", greeting="421 4.3.2 too busy")
    working = world.mx("127.0.0.4")
    write_spool(spool, [BOB])
    settle(start_runner())
    assert working.messages[0][1] == [BOB]
    assert busy.sessions == 1 and not busy.messages


def test_an_endless_reply_moves_on_to_the_next_mx(world, spool, start_runner):
    world.resolve({"remote.test": [("MX", "10 flood.remote.test."), ("MX", "20 ok.remote.test.")],
                   "flood.remote.test": a_record("127.0.0.3"),
                   "ok.remote.test": a_record("127.0.0.4")})
    flood = world.mx("127.0.0.3", ehlo_flood=True)
    working = world.mx("127.0.0.4")
    write_spool(spool, [BOB])
    settle(start_runner())
    assert working.messages[0][1] == [BOB]
    assert flood.sessions == 1


def test_the_implicit_mx(world, spool, start_runner):
    world.resolve({"remote.test": a_record("127.0.0.7")})
    mx = world.mx("127.0.0.7")
    write_spool(spool, [BOB])
    settle(start_runner())
    assert mx.messages[0][1] == [BOB]


def test_a_route_by_host_name(world, spool, start_runner):
    mx = world.mx("127.0.0.1")
    write_spool(spool, [BOB])
    settle(start_runner(**{"relay.routes": f"remote.test=localhost:{world.port}"}))
    assert mx.messages[0][1] == [BOB]


def test_recipients_of_one_domain_share_one_transaction(world, spool, start_runner):
    world.resolve({"remote.test": a_record("127.0.0.2"), "other.test": a_record("127.0.0.3")})
    remote, other = world.mx("127.0.0.2"), world.mx("127.0.0.3")
    write_spool(spool, ["a@remote.test", "b@remote.test", "c@remote.test", "d@other.test"])
    settle(start_runner())
    assert remote.sessions == 1
    assert remote.messages[0][1] == ["a@remote.test", "b@remote.test", "c@remote.test"]
    assert other.messages[0][1] == ["d@other.test"]


def test_the_recorded_parameters_are_replayed(world, spool, start_runner):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2")                  # 8BITMIME, no DSN
    write_spool(spool, [(BOB, {"NOTIFY": "FAILURE"})], parameters={"BODY": "8BITMIME"})
    settle(start_runner())
    assert [line for line in mx.commands if line[:4] in ("MAIL", "RCPT")] == [
        f"MAIL FROM:<alice@test.ru> BODY=8BITMIME SIZE={len(TEXT)}", f"RCPT TO:<{BOB}>"]


# ---------------------------------------------------------------------------------------
# Temporary and permanent failures


@pytest.mark.parametrize("records", [{"remote.test": "SERVFAIL"}, {"remote.test": "TIMEOUT"},
                                     {"remote.test": [("A", "TIMEOUT")]}],
                         ids=["servfail", "timeout", "empty-mx-then-a-timeout"])
def test_a_dns_problem_waits_and_never_bounces(world, spool, start_runner, records):
    world.resolve(records)
    submit = RecordingSubmit()
    name = write_spool(spool, [BOB])
    settle(start_runner(submit, **{"relay.connect_timeout": "0.5", "relay.retry": "3600"}))
    state = state_of(spool, name, BOB)
    assert (state["status"], state["attempts"]) == ("pending", 1)
    assert state["last_error"].startswith("451 4.4.3")
    assert submit.calls == 0 and spool.names() == [name]


@pytest.mark.parametrize("first_reply", ["450 4.2.1 try later", "CLOSE"],
                         ids=["450-then-250", "connection-lost-after-MAIL"])
def test_a_temporary_failure_then_success(world, spool, start_runner, first_reply, tmp_path):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2", rcpt=[first_reply, "250 2.1.5 ok"])
    submit = RecordingSubmit()
    write_spool(spool, [BOB])
    runner = start_runner(submit)
    assert mx.wait_for(1)
    settle(runner)
    assert mx.sessions == 2 and len(mx.messages) == 1
    assert submit.calls == 0 and spool.names() == []
    assert f"<{BOB}>: pending: " in log_text(tmp_path)


def test_a_550_bounces_once_and_the_mx_is_never_asked_again(world, spool, start_runner):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2", rcpt=["550 5.1.1 no such user here", "450 4.2.1 later",
                                     "250 2.1.5 ok"])
    submit = RecordingSubmit()
    name = write_spool(spool, [BOB, CAROL])
    runner = start_runner(submit, **{"relay.retry": "3600"})
    assert submit.wait_for(1)
    settle(runner)
    assert state_of(spool, name, BOB)["status"] == "failed"
    assert state_of(spool, name, BOB)["notices"] == {"failed": "sent"}
    fields = delivery_status(submit.report())[1]
    assert fields["Status"] == "5.1.1" and fields["Final-Recipient"] == f"rfc822; {BOB}"
    runner.wait_for_one_pass(runner.flush(), timeout=20)      # as --flush does
    assert [line for line in mx.commands if line.startswith("RCPT")] == [
        f"RCPT TO:<{BOB}>", f"RCPT TO:<{CAROL}>", f"RCPT TO:<{CAROL}>"]
    assert mx.messages == [("alice@test.ru", [CAROL], TEXT)]
    assert len(submit.submitted) == 1 and spool.names() == []


def test_a_bounce_that_cannot_be_stored_is_retried_alone(world, spool, start_runner, tmp_path):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2", rcpt=["550 5.1.1 no such user"])
    saved_before = {}                           # the record on disk as each try begins
    submit = RecordingSubmit(failures=2, on_call=lambda number: saved_before.setdefault(
        number, spool.read_state(name)))
    name = write_spool(spool, [BOB])
    runner = start_runner(submit)
    assert submit.wait_for(1)
    settle(runner)
    for number, failed_tries in ((1, 0), (2, 1), (3, 2)):
        record = saved_before[number]
        assert record["recipients"][BOB]["status"] == "failed"      # recorded first
        assert record["recipients"][BOB]["notices"] == {"failed": "owed"}
        assert record["notices"]["attempts"] == failed_tries
    assert submit.calls == 3 and len(submit.submitted) == 1
    assert mx.sessions == 1 and [l for l in mx.commands if l.startswith("RCPT")] == [
        f"RCPT TO:<{BOB}>"]
    assert log_text(tmp_path).count("cannot send the failed notice for <bob@remote.test>") == 2
    assert spool.names() == []


def test_a_message_too_old_bounces(world, spool, start_runner):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2", rcpt=["451 4.3.0 always busy"])
    submit = RecordingSubmit()
    write_spool(spool, [BOB], created=time.time() - 7200)
    settle(start_runner(submit, **{"relay.max_queue_age": "3600"}))
    fields = delivery_status(submit.report())[1]
    assert fields["Status"] == "4.3.0" and "gave up" in fields["Diagnostic-Code"]
    assert mx.sessions == 1 and spool.names() == []


@pytest.mark.parametrize("records, status", [({"remote.test": [("MX", "0 .")]}, "5.1.10"),
                                             ({}, "5.1.2")], ids=["null-mx", "nxdomain"])
def test_a_domain_that_takes_no_mail_bounces_at_once(world, spool, start_runner, records,
                                                     status):
    world.resolve(records)
    submit = RecordingSubmit()
    write_spool(spool, [BOB])
    settle(start_runner(submit))
    envelope, _ = submit.submitted[0]
    assert [r.address.text for r in envelope.recipients] == ["alice@test.ru"]
    assert delivery_status(submit.report())[1]["Status"] == status
    assert spool.names() == []


def test_no_bounce_for_the_null_sender(world, spool, start_runner, tmp_path):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2", rcpt=["550 5.1.1 no"])
    submit = RecordingSubmit()
    write_spool(spool, [BOB], sender="")
    settle(start_runner(submit))
    assert submit.calls == 0 and mx.sessions == 1 and spool.names() == []
    assert "not bounced: the sender is <>" in log_text(tmp_path)


def test_a_bounce_to_a_remote_sender_goes_through_submit(world, spool, start_runner):
    world.resolve(ONE_MX)
    world.mx("127.0.0.2", rcpt=["550 5.1.1 no"])
    submit = RecordingSubmit()
    write_spool(spool, [BOB], sender="dave@elsewhere.test")
    settle(start_runner(submit))
    envelope, _ = submit.submitted[0]
    assert envelope.reverse_path.is_null and envelope.client is None
    assert [(r.address.text, r.mailbox) for r in envelope.recipients] == [
        ("dave@elsewhere.test", None)]


# ---------------------------------------------------------------------------------------
# Crashes: of a worker, of the whole process


def test_a_worker_crash_is_retried_without_loss_or_duplicate(world, spool, start_runner,
                                                             monkeypatch, tmp_path):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2")
    real_send_text = relay.SmtpClient.send_text
    crashes = []

    def crash_once(self, message):
        if not crashes:
            crashes.append(message.name)
            raise RuntimeError("a bug in the middle of DATA")
        return real_send_text(self, message)

    monkeypatch.setattr(relay.SmtpClient, "send_text", crash_once)
    name = write_spool(spool, [BOB])
    runner = start_runner()
    assert mx.wait_for(1)
    settle(runner)
    assert crashes == [name]
    assert mx.sessions == 2 and len(mx.messages) == 1 and spool.names() == []
    log = log_text(tmp_path)
    assert "delivery to remote.test failed unexpectedly" in log
    assert f"<{BOB}>: pending: {LOCAL_ERROR}" in log


def test_after_a_restart_a_recipient_done_is_not_sent_again(world, spool, start_runner):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2")
    name = write_spool(spool, [BOB, CAROL])
    record = DeliveryRecord.new(spool.read(name))
    record.apply({BOB: Outcome(Status.DONE, "250 ok")}, time.time())
    spool.write_state(name, record.to_json())
    settle(start_runner())
    assert mx.messages[0][1] == [CAROL]
    assert [line for line in mx.commands if line.startswith("RCPT")] == [f"RCPT TO:<{CAROL}>"]


def test_done_is_saved_before_quit(world, spool, start_runner):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2", hang_on_quit=True, rcpt=["250 2.1.5 ok", "450 4.2.0 busy"])
    name = write_spool(spool, [BOB, CAROL])
    start_runner(**{"relay.command_timeout": "1"})
    assert mx.wait_for_quit()
    # QUIT is out and unanswered: the transaction is not over, yet the record says done
    assert state_of(spool, name, BOB)["status"] == "done"
    assert state_of(spool, name, CAROL)["status"] == "pending"
    assert spool.names() == [name]


def test_a_message_done_leaves_the_spool_before_quit(world, spool, start_runner):
    """Nothing left to do: the spool file is removed (durably) instead of a record written,
    and that too comes before QUIT."""
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2", hang_on_quit=True)
    name = write_spool(spool, [BOB])
    start_runner(**{"relay.command_timeout": "1"})
    assert mx.wait_for_quit()
    assert mx.messages[0][1] == [BOB]
    assert spool.names() == []
    assert not os.path.exists(spool.state_path(name))


# ---------------------------------------------------------------------------------------
# A damaged queue


def good_record(spool, name):
    return DeliveryRecord.new(spool.read(name)).to_json()


def damage(spool, kind):
    """A spool pair damaged in one way; returns its name."""
    name = write_spool(spool, ["x@remote.test"])
    record = good_record(spool, name)
    entry = record["recipients"]["x@remote.test"]
    if kind == "issue-record":
        record = {"recipients": {"x@remote.test": {"status": "pending"}}}
    elif kind == "weird-status":
        entry["status"] = "weird"
    elif kind == "null-field":
        entry["attempts"] = None
    elif kind == "unknown-field":
        entry["colour"] = "blue"
    elif kind == "stranger":
        record["recipients"]["y@remote.test"] = dict(entry)
    elif kind == "not-json":
        with open(spool.state_path(name), "w") as state_file:
            state_file.write("{\"recipients\": ")
        return name
    elif kind == "unparseable-spool":
        with open(spool.path(name), "wb") as spool_file:
            spool_file.write(b"GET / HTTP/1.0\r\n\r\n")
        return name
    spool.write_state(name, record)
    return name


DAMAGES = ["issue-record", "weird-status", "null-field", "unknown-field", "stranger",
           "not-json", "unparseable-spool", "unreadable-spool"]


def test_a_damaged_queue_is_set_aside_and_the_rest_delivered(world, spool, start_runner,
                                                             monkeypatch, tmp_path):
    world.resolve({"remote.test": a_record("127.0.0.2")})
    mx = world.mx("127.0.0.2")
    damaged = {kind: damage(spool, kind) for kind in DAMAGES}
    unreadable = damaged["unreadable-spool"]
    real_read = Spool.read

    def read(self, name):
        if name == unreadable:
            raise PermissionError(13, "Permission denied", self.path(name))
        return real_read(self, name)

    monkeypatch.setattr(Spool, "read", read)
    good = write_spool(spool, [BOB])
    settle(start_runner())                      # does not raise
    assert mx.messages == [("alice@test.ru", [BOB], TEXT)]
    assert spool.names() == []
    expected = set()
    for kind, name in damaged.items():
        expected.add(f"{name}.smtp")
        if kind != "unparseable-spool":
            expected.add(f"{name}.state")
    assert set(spool.corrupt()) == expected
    log = log_text(tmp_path)
    for name in damaged.values():
        assert log.count(f"[{name}] moved to {spool.corrupt_directory}") == 1
    assert "weird" in log and "'queue_id' is missing" in log
    assert f"[{good}] moved" not in log
    listing = queue_listing(spool)
    assert listing[0] == "Mail queue is empty"
    assert {line.split()[0] for line in listing if "  corrupt (set aside in " in line} == expected
    assert listing[-1] == f"-- {len(expected)} corrupt file(s); the log says what is wrong"


def test_the_listing_shows_states_and_the_bounce_owed(world, spool, start_runner):
    world.resolve(ONE_MX)
    world.mx("127.0.0.2", rcpt=["450 4.2.1 later", "550 5.1.1 no such user"])
    submit = RecordingSubmit(failures=100)
    name = write_spool(spool, [BOB, CAROL])
    runner = start_runner(submit, **{"relay.retry": "3600"})
    settle(runner)
    runner.stop()
    listing = queue_listing(spool, now=time.time())
    queue_id = name.partition("-")[2]
    assert listing[0].startswith(f"{queue_id}  age ")
    assert listing[0].endswith(f"octets  from <alice@test.ru>  ({name}.smtp)")
    assert listing[1].startswith(f"    <{BOB}>  pending, 1 attempt(s), next in 59m, "
                                 "last error: 450 4.2.1 later")
    assert listing[2] == (f"    <{CAROL}>  failed, 1 attempt(s), last error: "
                          "550 5.1.1 no such user, bounce owed")
    assert listing[3].startswith("    notices: 1 failed attempt(s), next in 59m, "
                                 "last error: OSError: ")
    assert listing[-1] == "-- 1 message(s) in the queue"


def test_a_spool_file_that_vanishes_while_listed_is_skipped(spool):
    kept = write_spool(spool, [BOB])
    vanishing = write_spool(spool, [CAROL])
    real_names = spool.names

    def names_then_vanish():
        found = real_names()
        os.unlink(spool.path(vanishing))        # the relay finished it meanwhile
        return found

    spool.names = names_then_vanish
    listing = queue_listing(spool)
    assert vanishing.partition("-")[2] not in "\n".join(listing)
    assert kept.partition("-")[2] in listing[0]
    assert listing[-1] == "-- 1 message(s) in the queue"


def test_an_empty_queue_lists_as_empty(spool):
    assert queue_listing(spool) == ["Mail queue is empty"]


def test_a_damaged_state_is_shown_in_the_listing(spool):
    name = write_spool(spool, [BOB])
    with open(spool.state_path(name), "w") as state_file:
        json.dump({"recipients": {BOB: {"status": "weird"}}}, state_file)
    listing = queue_listing(spool)
    assert listing[1].startswith("    damaged record: ")


def test_stop_ends_every_thread(world, spool, tmp_path):
    config = make_config(tmp_path, **world.overrides(**{"relay.workers": "3"}))
    runner = QueueRunner(config, spool, make_router(), RecordingSubmit(), make_log(tmp_path))
    runner.start()
    runner.stop(grace=5)
    assert len(runner._threads) == 4 and not any(t.is_alive() for t in runner._threads)


def test_a_failure_at_the_end_of_a_pass_is_retried_not_stuck(world, spool, start_runner,
                                                             monkeypatch, tmp_path):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2")
    real_remove = Spool.remove
    failures = []

    def remove_fails_twice(self, name):
        # once as the last outcome is recorded (the record is saved instead), once at the
        # end of the pass
        if len(failures) < 2:
            failures.append(name)
            raise RuntimeError("a bug while removing")
        return real_remove(self, name)

    monkeypatch.setattr(Spool, "remove", remove_fails_twice)
    name = write_spool(spool, [BOB])
    runner = start_runner()
    assert mx.wait_for(1)
    settle(runner, later=1.5)                   # due again after the first retry delay
    assert failures == [name, name] and spool.names() == []
    assert len(mx.messages) == 1 and mx.sessions == 1
    assert "the end of a delivery attempt failed" in log_text(tmp_path)


# ---------------------------------------------------------------------------------------
# What the next hop lacks, and the notices of RFC 3461


def returned(report):
    return list(report.iter_parts())[2]


@pytest.mark.parametrize("recipient, text, parameters, status", [
    ("jörg@remote.test", TEXT, {"SMTPUTF8": None}, "5.6.7"),
    (BOB, b"Subject: x\r\n\r\n8-bit \xff\r\n", {"BODY": "8BITMIME"}, "5.6.3")],
    ids=["smtputf8", "8bitmime"])
def test_a_message_no_host_can_take_bounces(world, spool, start_runner, recipient, text,
                                            parameters, status):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2", ehlo=("250-fake.mx", "250 PIPELINING"))
    submit = RecordingSubmit()
    write_spool(spool, [recipient], text=text, parameters=parameters)
    settle(start_runner(submit))
    fields = delivery_status(submit.report())[1]
    assert fields["Action"] == "failed" and fields["Status"] == status
    assert not mx.messages and spool.names() == []


def test_notify_never_fails_without_a_bounce(world, spool, start_runner, monkeypatch,
                                            tmp_path):
    world.resolve(ONE_MX)
    world.mx("127.0.0.2", rcpt=["550 5.1.1 no such user"])
    records_at_removal = []
    real_remove = Spool.remove

    def remove(self, name):
        records_at_removal.append(self.read_state(name))
        return real_remove(self, name)

    monkeypatch.setattr(Spool, "remove", remove)
    submit = RecordingSubmit()
    write_spool(spool, [(BOB, {"NOTIFY": "NEVER"})])
    settle(start_runner(submit))
    assert submit.calls == 0 and spool.names() == []
    # failed, no notice owed: nothing left to do, so it left the queue with no record written
    assert records_at_removal == [None]
    assert "not bounced: its NOTIFY does not ask for failures (RFC 3461 4.1)" in \
        log_text(tmp_path)


def test_ret_full_bounces_the_whole_message_with_envid_and_orcpt(world, spool, start_runner):
    world.resolve(ONE_MX)
    world.mx("127.0.0.2", rcpt=["550 5.1.1 no such user"])
    submit = RecordingSubmit()
    text = b"Subject: whole\r\n\r\n.a dot line\r\nthe body\r\n"
    write_spool(spool, [(BOB, {"ORCPT": "rfc822;bob@remote.test"})], text=text,
                parameters={"RET": "FULL", "ENVID": "QQ314159"})
    settle(start_runner(submit))
    report = submit.report()
    per_message, fields = delivery_status(report)
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert fields["Original-Recipient"] == "rfc822;bob@remote.test"
    assert returned(report).get_content_type() == "message/rfc822"
    assert b"\r\n\r\n" + text + b"\r\n--" in submit.submitted[0][1]


@pytest.mark.parametrize("ehlo, notices", [
    (("250-fake.mx", "250 PIPELINING"), 1),
    (("250-fake.mx", "250-DSN", "250 PIPELINING"), 0)], ids=["no-dsn", "dsn"])
def test_success_relayed_to_a_hop_without_dsn_sends_a_relayed_notice(world, spool,
                                                                     start_runner, ehlo,
                                                                     notices):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2", ehlo=ehlo)
    submit = RecordingSubmit()
    name = write_spool(spool, [(BOB, {"NOTIFY": "SUCCESS"}), CAROL])
    settle(start_runner(submit))
    assert len(mx.messages) == 1 and spool.names() == []
    assert len(submit.submitted) == notices
    rcpt = [line for line in mx.commands if line.startswith("RCPT")][0]
    assert rcpt == f"RCPT TO:<{BOB}>" + (" NOTIFY=SUCCESS" if not notices else "")
    if notices:
        report = submit.report()
        assert report["Subject"] == "Successful Mail Delivery Report"
        per_message, fields = delivery_status(report)[0], delivery_status(report)[1:]
        assert per_message["X-Queue-ID"] == name.partition("-")[2]
        assert [(block["Final-Recipient"], block["Action"], block["Status"])
                for block in fields] == [(f"rfc822; {BOB}", "relayed", "2.0.0")]
        assert returned(report).get_content_type() == "text/rfc822-headers"


def test_a_relayed_notice_that_cannot_be_stored_is_retried_alone(world, spool, start_runner):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2")
    submit = RecordingSubmit(failures=1)
    write_spool(spool, [(BOB, {"NOTIFY": "SUCCESS"})])
    runner = start_runner(submit)
    assert submit.wait_for(1)
    settle(runner)
    assert submit.calls == 2 and len(submit.submitted) == 1
    assert mx.sessions == 1 and len(mx.messages) == 1       # the message went once
    assert spool.names() == []


@pytest.mark.parametrize("notify, warned", [(None, True), ("DELAY", True),
                                            ("FAILURE", False)])
def test_a_delayed_notice_once_after_delay_warning(world, spool, start_runner, notify,
                                                   warned):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2", rcpt=["451 4.3.0 busy"])
    submit = RecordingSubmit()
    bob = (BOB, {"NOTIFY": notify}) if notify else BOB
    name = write_spool(spool, [bob], created=time.time() - 120)
    runner = start_runner(submit, **{"relay.delay_warning": "60", "relay.retry": "3600"})
    settle(runner)
    runner.wait_for_one_pass(runner.flush(), timeout=20)      # a second attempt
    assert mx.sessions == 2
    assert len(submit.submitted) == (1 if warned else 0)     # never twice
    state = state_of(spool, name, BOB)
    assert state["status"] == "pending"
    assert state["notices"] == ({"delayed": "sent"} if warned else {})
    if warned:
        report = submit.report()
        assert report["Subject"] == "Delayed Mail (still being retried)"
        fields = delivery_status(report)[1]
        assert (fields["Action"], fields["Status"]) == ("delayed", "4.3.0")
        assert fields["Will-Retry-Until"] is not None
        assert fields["Diagnostic-Code"] == "smtp; 451 4.3.0 busy"


def test_no_delayed_notice_before_delay_warning(world, spool, start_runner):
    world.resolve(ONE_MX)
    mx = world.mx("127.0.0.2", rcpt=["451 4.3.0 busy"])
    submit = RecordingSubmit()
    write_spool(spool, [BOB], created=time.time() - 120)
    settle(start_runner(submit, **{"relay.delay_warning": "3600", "relay.retry": "3600"}))
    assert mx.sessions == 1 and submit.calls == 0
