"""delivery.py: the per-message record, its one `apply`, notices owed, strict JSON."""
import copy
import json

import pytest

import dsn
from delivery import (DeliveryRecord, NoticeState, Outcome, RecordError, RetryPolicy, Status,
                      describe)
from tests.queue_world import make_spool, write_spool

POLICY = RetryPolicy((60, 300, 900), 3600)
NOW = 1_800_000_000.0
BOB, CAROL = "bob@remote.test", "carol@remote.test"


@pytest.fixture
def spool(tmp_path):
    return make_spool(tmp_path)


@pytest.fixture
def message(spool):
    return spool.read(write_spool(spool, [BOB, CAROL], created=NOW))


def new_record(message):
    return DeliveryRecord.new(message, POLICY)


def test_a_new_record_has_every_recipient_pending_and_due(message):
    record = new_record(message)
    assert list(record.recipients) == [BOB, CAROL]
    assert record.due(NOW) == [BOB, CAROL]
    assert record.next_due() == 0.0
    assert not record.finished


def test_retries_follow_the_policy_and_the_last_delay_repeats(message):
    record = new_record(message)
    waits = []
    for attempt in range(5):
        now = NOW + attempt
        record.apply({BOB: Outcome(Status.PENDING, "451 4.3.0 busy", "127.0.0.2:25")}, now)
        waits.append(record.recipients[BOB].next_attempt - now)
    assert waits == [60, 300, 900, 900, 900]
    state = record.recipients[BOB]
    assert (state.attempts, state.last_error, state.remote) == (5, "451 4.3.0 busy",
                                                                "127.0.0.2:25")
    assert record.due(NOW + 10) == [CAROL]
    assert record.due(NOW + 10, forced=True) == [BOB, CAROL]


def test_a_final_answer_is_never_changed(message):
    record = new_record(message)
    record.apply({BOB: Outcome(Status.DONE, "250 ok"), CAROL: Outcome(Status.FAILED, "550 no")},
                 NOW)
    changed = record.apply({BOB: Outcome(Status.FAILED, "550 late"),
                            CAROL: Outcome(Status.DONE, "250 late")}, NOW + 1)
    assert changed == []
    assert record.recipients[BOB].status is Status.DONE
    assert record.recipients[CAROL].status is Status.FAILED
    assert record.due(NOW + 1, forced=True) == []


def test_a_failure_owes_a_bounce_until_it_is_sent(message):
    record = new_record(message)
    record.apply({BOB: Outcome(Status.FAILED, "550 5.1.1 no such user", "127.0.0.2:25")}, NOW)
    assert list(record.owed()) == [BOB] and record.owed_actions() == [dsn.FAILED]
    assert record.notices_due(NOW)
    assert not record.finished                      # carol pending
    record.apply({CAROL: Outcome(Status.DONE, "250 ok")}, NOW)
    assert not record.finished                      # the bounce is still owed
    assert record.notices_failed("OSError: disk full", NOW) == 60
    assert not record.notices_due(NOW + 59) and record.notices_due(NOW + 60)
    assert record.notices_due(NOW + 1, forced=True)
    assert record.next_due() == NOW + 60
    record.notices_sent(dsn.FAILED, [BOB])
    assert record.recipients[BOB].notices == {dsn.FAILED: NoticeState.SENT}
    assert record.owed() == {} and record.finished and record.next_due() is None


def test_a_later_failure_gets_its_own_bounce(message):
    record = new_record(message)
    record.apply({BOB: Outcome(Status.FAILED, "550 no")}, NOW)
    record.notices_sent(dsn.FAILED, record.owed())
    record.apply({CAROL: Outcome(Status.FAILED, "554 no")}, NOW + 5)
    assert list(record.owed()) == [CAROL]


def test_no_bounce_for_the_null_sender(spool):
    record = new_record(spool.read(write_spool(spool, [BOB], sender="")))
    record.apply({BOB: Outcome(Status.FAILED, "550 no")}, NOW)
    assert record.recipients[BOB].notices == {}
    assert record.finished


def test_giving_up_after_max_queue_age(message):
    record = new_record(message)
    record.apply({BOB: Outcome(Status.PENDING, "451 4.3.0 busy")}, NOW + 3599)
    assert record.recipients[BOB].status is Status.PENDING
    changed = record.apply({BOB: Outcome(Status.PENDING, "451 4.3.0 busy")}, NOW + 3600)
    assert [(key, gave_up) for key, _, gave_up in changed] == [(BOB, True)]
    state = record.recipients[BOB]
    assert state.status is Status.FAILED and state.notices == {dsn.FAILED: NoticeState.OWED}
    assert state.last_error.startswith("451 4.3.0 busy (gave up: in the queue since ")


def test_a_long_reply_is_kept_short(message):
    record = new_record(message)
    record.apply({BOB: Outcome(Status.PENDING, "451 " + "x" * 100000)}, NOW)
    assert len(record.recipients[BOB].last_error) == 1000


def test_json_round_trip(message):
    record = new_record(message)
    record.apply({BOB: Outcome(Status.FAILED, "550 no", "127.0.0.2:25")}, NOW)
    record.notices_failed("OSError: full", NOW)
    data = json.loads(json.dumps(record.to_json()))
    assert data["version"] == 2 and data["recipients"][BOB]["notices"] == {"failed": "owed"}
    again = DeliveryRecord.from_json(data, message, POLICY)
    assert again.to_json() == record.to_json()
    assert again.recipients[BOB].status is Status.FAILED
    assert again.recipients[BOB].notices == {dsn.FAILED: NoticeState.OWED}
    assert again.notice_retry.attempts == 1


def saved(message):
    record = new_record(message)
    record.apply({BOB: Outcome(Status.PENDING, "451 busy")}, NOW)
    return record.to_json()


def changed_copy(data, path, value):
    """A copy of `data` with the field at `path` set to `value` (or removed: ...)."""
    data = copy.deepcopy(data)
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


@pytest.mark.parametrize("path, value, reason", [
    (("recipients", BOB, "next_attempt"), ..., "'next_attempt' is missing"),
    (("recipients", BOB, "attempts"), None, "attempts is null"),
    (("recipients", BOB, "attempts"), "1", "attempts is a string"),
    (("recipients", BOB, "attempts"), True, "attempts is True"),
    (("recipients", BOB, "attempts"), -1, "attempts is -1"),
    (("recipients", BOB, "next_attempt"), float("nan"), "not a time"),
    (("recipients", BOB, "last_error"), 451, "last_error is 451"),
    (("recipients", BOB, "status"), "weird", "status is 'weird', not one of"),
    (("recipients", BOB, "notices"), [], "notices is a list, not an object"),
    (("recipients", BOB, "notices"), {"failed": "maybe"}, "failed is 'maybe'"),
    (("recipients", BOB, "notices"), {"failed": "owed"}, "failed notice 'owed' but status "
                                                         "'pending'"),
    (("recipients", BOB, "notices"), {"relayed": "sent"}, "relayed notice 'sent' but status"),
    (("recipients", BOB, "notices"), {"expanded": "sent"}, "a notice 'expanded', not one of"),
    (("recipients", BOB, "bounce"), "none", "unknown field 'bounce'"),
    (("recipients", BOB, "colour"), "blue", "unknown field 'colour'"),
    (("recipients", BOB), [], "a list, not an object"),
    (("recipients",), {}, "recipients: none"),
    (("recipients", "dave@remote.test"), None, "dave@remote.test: null, not an object"),
    (("notices",), None, "notices: null"),
    (("notices", "attempts"), ..., "notices: 'attempts' is missing"),
    (("created",), "yesterday", "created is a string"),
    (("queue_id",), "someone-else", "queue_id 'someone-else' is not this message's"),
    (("version",), 3, "version: 3, not 1 or 2"),
    (("extra",), 1, "unknown field 'extra'"),
])
def test_a_bad_record_is_refused_with_its_reason(message, path, value, reason):
    data = changed_copy(saved(message), path, value)
    with pytest.raises(RecordError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        DeliveryRecord.from_json(data, message, POLICY)


def test_a_record_naming_a_stranger_or_missing_a_recipient_is_refused(message):
    data = saved(message)
    stranger = changed_copy(data, ("recipients", "dave@remote.test"),
                            data["recipients"][BOB])
    with pytest.raises(RecordError, match="names <dave@remote.test>, who is not a recipient"):
        DeliveryRecord.from_json(stranger, message, POLICY)
    missing = changed_copy(data, ("recipients", CAROL), ...)
    with pytest.raises(RecordError, match="lacks <carol@remote.test>, a recipient"):
        DeliveryRecord.from_json(missing, message, POLICY)


@pytest.mark.parametrize("data", [None, [], "text", 3])
def test_a_record_that_is_not_an_object_is_refused(message, data):
    with pytest.raises(RecordError, match="not a JSON object"):
        DeliveryRecord.from_json(data, message, POLICY)


def test_the_issue_s_damaged_records_are_refused(message):
    """The two records of issue 11: a KeyError at start-up, and a message dropped silently."""
    with pytest.raises(RecordError, match="'attempts' is missing"):
        DeliveryRecord.from_json({"queue_id": message.queue_id, "created": NOW, "recipients":
                                  {BOB: {"status": "pending"}, CAROL: {"status": "pending"}}},
                                 message, POLICY)
    weird = changed_copy(saved(message), ("recipients", BOB, "status"), "weird")
    with pytest.raises(RecordError, match="weird"):
        DeliveryRecord.from_json(weird, message, POLICY)


def test_a_record_of_the_earlier_format_is_read(message):
    """What the relay wrote before the format had a version (a failure was bounced first)."""
    old = {"queue_id": message.queue_id, "created": NOW, "recipients": {
        BOB: {"status": "failed", "attempts": 1, "next_attempt": NOW, "last_error": "550 no"},
        CAROL: {"status": "pending", "attempts": 2, "next_attempt": NOW + 60,
                "last_error": "451 busy"}}}
    record = DeliveryRecord.from_json(old, message, POLICY)
    assert record.recipients[BOB].notices == {dsn.FAILED: NoticeState.SENT}
    assert record.owed() == {}
    assert record.recipients[CAROL].attempts == 2
    assert record.due(NOW + 60) == [CAROL]
    with pytest.raises(RecordError, match="unknown field 'bounce'"):
        DeliveryRecord.from_json(changed_copy(old, ("recipients", BOB, "bounce"), "sent"),
                                 message, POLICY)


def test_describe_for_the_listing(message):
    record = new_record(message)
    record.apply({BOB: Outcome(Status.PENDING, "451 busy"),
                  CAROL: Outcome(Status.FAILED, "550 no")}, NOW)
    assert describe(record.recipients[BOB], NOW) == (
        "pending, 1 attempt(s), next in 60s, last error: 451 busy")
    assert describe(record.recipients[CAROL], NOW) == (
        "failed, 1 attempt(s), last error: 550 no, bounce owed")


def version_1(message):
    """A record as the relay wrote it in format version 1: one bounce per recipient."""
    return {"version": 1, "queue_id": message.queue_id, "created": NOW, "recipients": {
        BOB: {"status": "failed", "attempts": 1, "next_attempt": 0.0, "last_attempt": NOW,
              "last_error": "550 no", "remote": "127.0.0.2:25", "bounce": "owed"},
        CAROL: {"status": "done", "attempts": 1, "next_attempt": 0.0, "last_attempt": NOW,
                "last_error": "", "remote": "127.0.0.2:25", "bounce": "none"}},
        "bounce": {"attempts": 2, "next_attempt": NOW + 300, "last_error": "OSError: full"}}


def test_a_record_of_version_1_is_read(message):
    record = DeliveryRecord.from_json(version_1(message), message, POLICY)
    assert record.recipients[BOB].notices == {dsn.FAILED: NoticeState.OWED}
    assert record.recipients[CAROL].notices == {}
    assert (record.notice_retry.attempts, record.notice_retry.next_attempt) == (2, NOW + 300)
    assert record.to_json()["version"] == 2            # written back in the new format
    owed_for_carol = changed_copy(version_1(message), ("recipients", CAROL, "bounce"), "owed")
    with pytest.raises(RecordError, match="failed notice 'owed' but status 'done'"):
        DeliveryRecord.from_json(owed_for_carol, message, POLICY)
    with pytest.raises(RecordError, match="bounce is 'maybe'"):
        DeliveryRecord.from_json(changed_copy(version_1(message),
                                              ("recipients", BOB, "bounce"), "maybe"),
                                 message, POLICY)


WARNING_POLICY = RetryPolicy((60,), 3600 * 24, delay_warning=600)


def notify_message(spool, notify):
    """A message to BOB with NOTIFY=`notify` (None: absent) and CAROL without NOTIFY."""
    bob = (BOB, {"NOTIFY": notify}) if notify else BOB
    return spool.read(write_spool(spool, [bob, CAROL], created=NOW))


@pytest.mark.parametrize("notify, warned", [(None, True), ("DELAY", True),
                                            ("FAILURE,DELAY", True), ("FAILURE", False),
                                            ("NEVER", False)])
def test_a_delayed_notice_is_owed_once_after_the_warning_time(spool, notify, warned):
    record = DeliveryRecord.new(notify_message(spool, notify), WARNING_POLICY)
    busy = Outcome(Status.PENDING, "451 4.3.0 busy")
    record.apply({BOB: busy}, NOW + 599)
    assert record.owed() == {}                          # not late yet
    record.apply({BOB: busy}, NOW + 600)
    assert (BOB in record.owed(dsn.DELAYED)) is warned
    if warned:
        record.notices_sent(dsn.DELAYED, [BOB])
    record.apply({BOB: busy}, NOW + 1200)
    assert record.owed() == {}                          # never twice
    assert record.recipients[BOB].notices == ({dsn.DELAYED: NoticeState.SENT} if warned else {})


def test_no_delayed_notice_when_the_warning_is_off(spool):
    record = DeliveryRecord.new(notify_message(spool, None),
                                WARNING_POLICY._replace(delay_warning=0))
    record.apply({BOB: Outcome(Status.PENDING, "451 busy")}, NOW + 80000)
    assert record.recipients[BOB].status is Status.PENDING and record.owed() == {}


def test_a_delayed_notice_still_owed_gives_way_to_the_final_answer(spool):
    record = DeliveryRecord.new(notify_message(spool, None), WARNING_POLICY)
    record.apply({BOB: Outcome(Status.PENDING, "451 busy")}, NOW + 700)
    assert record.owed_actions() == [dsn.DELAYED]
    record.apply({BOB: Outcome(Status.DONE, "250 ok")}, NOW + 800)
    assert record.recipients[BOB].notices == {} and record.owed() == {}


@pytest.mark.parametrize("notify, passed_on, owed", [
    ("SUCCESS", False, True), ("SUCCESS,FAILURE", False, True), ("SUCCESS", True, False),
    (None, False, False), ("FAILURE", False, False)])
def test_a_relayed_notice_when_the_next_hop_cannot_pass_notify_on(spool, notify, passed_on,
                                                                  owed):
    record = DeliveryRecord.new(notify_message(spool, notify), POLICY)
    record.apply({BOB: Outcome(Status.DONE, "250 ok", "127.0.0.2:25", passed_on)}, NOW)
    assert record.recipients[BOB].status is Status.DONE
    assert record.owed_actions() == ([dsn.RELAYED] if owed else [])


def test_notify_never_fails_without_a_bounce(spool):
    record = DeliveryRecord.new(notify_message(spool, "NEVER"), POLICY)
    record.apply({BOB: Outcome(Status.FAILED, "550 no"), CAROL: Outcome(Status.DONE, "250")},
                 NOW)
    assert record.recipients[BOB].status is Status.FAILED
    assert record.owed() == {} and record.finished


def test_a_delayed_notice_owed_beside_a_final_status_is_refused(spool):
    message = notify_message(spool, None)
    data = DeliveryRecord.new(message, POLICY).to_json()
    data["recipients"][BOB].update(status="done", notices={"delayed": "owed"})
    with pytest.raises(RecordError, match="delayed notice 'owed' but status 'done'"):
        DeliveryRecord.from_json(data, message, POLICY)
    data["recipients"][BOB]["notices"] = {"delayed": "sent", "relayed": "owed"}
    assert DeliveryRecord.from_json(data, message, POLICY).owed_actions() == [dsn.RELAYED]


def test_a_spool_file_with_a_bad_notify_is_a_record_error(spool):
    message = spool.read(write_spool(spool, [(BOB, {"NOTIFY": "SOMETIMES"})]))
    with pytest.raises(RecordError, match="recipient bob@remote.test in the spool file: "
                                          "NOTIFY=SOMETIMES"):
        DeliveryRecord.new(message, POLICY)


def test_describe_names_every_notice(spool):
    record = DeliveryRecord.new(notify_message(spool, "SUCCESS,DELAY"), WARNING_POLICY)
    record.apply({BOB: Outcome(Status.PENDING, "451 busy")}, NOW + 700)
    record.notices_sent(dsn.DELAYED, [BOB])
    record.apply({BOB: Outcome(Status.DONE, "250 ok")}, NOW + 800)
    assert describe(record.recipients[BOB], NOW) == (
        "done, 2 attempt(s), delay notice sent, relayed notice owed")
