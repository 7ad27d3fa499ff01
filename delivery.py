"""The relay's record of one queued message: where each recipient stands, and the notices owed.

    recipient: pending --2xx--> done
               pending --4xx, network, DNS trouble--> pending (next attempt per [relay] retry)
               pending --5xx, or older than max_queue_age--> failed

    notices (RFC 3461, each once, and only for a recipient that wants it, dsn.wants):
               failed                       -> "failed" owed (a bounce)
               done by a hop without DSN    -> "relayed" owed (RFC 3461 5.2.2)
               pending after delay_warning  -> "delayed" owed (RFC 3461 5.2.5)

`DeliveryRecord.apply(outcomes, now)` is the only place a recipient's state changes. A final
state (done, failed) never changes again: the remote is never asked twice for an answer it
has given. A notice is owed until it is stored, and is retried on its own schedule, without
another delivery attempt; a delayed notice still owed when the recipient's final answer comes
is dropped (the final notice says more). Mail from <> owes none (RFC 5321 4.5.5). The record
is saved as JSON beside the spool file (spool.write_state) and read back with strict checks:
a record that is not exactly what `to_json` writes (now, or in an earlier version) is a
`RecordError`, never a guess.
"""
import email.utils
import enum
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import dsn

FORMAT_VERSION = 2
NOTICE_ACTIONS = (dsn.FAILED, dsn.RELAYED, dsn.DELAYED)    # the notices the relay sends
MAX_ERROR_TEXT = 1000      # octets of a remote reply kept (RFC 5321 4.5.3.1.5: 512 a line)


class Status(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class NoticeState(enum.Enum):
    """Where one notice of one recipient stands (a notice not owed is not in the record)."""
    OWED = "owed"           # to be stored, and retried until it is
    SENT = "sent"           # stored: never again


class Outcome(NamedTuple):
    """What one attempt gave for one recipient."""
    status: Status
    reply: str              # the remote's reply or our own, one line
    remote: str = ""        # the host that gave it, "ip:port"
    dsn_passed_on: bool = False     # done by a hop offering DSN: its notices are its own


class RetryPolicy(NamedTuple):
    delays: tuple           # seconds between attempts; the last repeats ([relay] retry)
    max_queue_age: float    # then give up (RFC 5321 4.5.4.1)
    delay_warning: float = 0.0      # seconds queued before a delayed notice; 0: never

    @classmethod
    def from_config(cls, config):
        return cls(tuple(config.retry), config.max_queue_age, config.delay_warning)

    def delay(self, attempts):
        """The wait after `attempts` attempts (1 or more)."""
        return self.delays[min(attempts, len(self.delays)) - 1]


DEFAULT_POLICY = RetryPolicy((60, 300, 900, 3600), 432000)


class RecordError(Exception):
    """A state file that is not a record of this message; the text says what is wrong."""


@dataclass
class RecipientState:
    status: Status = Status.PENDING
    attempts: int = 0
    next_attempt: float = 0.0       # for pending: when it is due (epoch seconds)
    last_attempt: float = 0.0       # 0: never tried
    last_error: str = ""            # the last reply that was not a success
    remote: str = ""                # the host that gave the last answer
    notices: dict = field(default_factory=dict)     # action (dsn.FAILED...) -> NoticeState


@dataclass
class NoticeRetry:
    """The notices' own retries, when they could not be built or stored."""
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""


@dataclass
class DeliveryRecord:
    queue_id: str
    created: float                  # when the message was accepted
    recipients: dict                # address text -> RecipientState, in RCPT order
    notice_retry: NoticeRetry = field(default_factory=NoticeRetry)
    wanted: dict = field(default_factory=dict)      # address text -> frozenset of the
                                                    # actions it gets notices of; not saved
    policy: RetryPolicy = DEFAULT_POLICY                                    # not saved

    @classmethod
    def new(cls, message, policy=DEFAULT_POLICY):
        """The record of a message not tried yet (a spool.SpooledMessage)."""
        return cls(message.queue_id, message.created,
                   {key: RecipientState() for key in recipient_keys(message)},
                   wanted=wanted_notices(message), policy=policy)

    # What changes a state: only this

    def apply(self, outcomes, now):
        """Record one attempt's {address text: Outcome}. Returns [(address, RecipientState,
        gave_up)] for the recipients it changed; a recipient already final is left alone."""
        changed = []
        too_old = now - self.created >= self.policy.max_queue_age
        for key, outcome in outcomes.items():
            state = self.recipients.get(key)
            if state is None or state.status is not Status.PENDING:
                continue
            gave_up = outcome.status is Status.PENDING and too_old
            self._record_attempt(state, outcome, now, gave_up)
            self._owe_notices(key, state, outcome, now)
            changed.append((key, state, gave_up))
        return changed

    def _record_attempt(self, state, outcome, now, gave_up):
        state.attempts += 1
        state.last_attempt = now
        state.remote = outcome.remote
        state.status = Status.FAILED if gave_up else outcome.status
        state.last_error = "" if state.status is Status.DONE else outcome.reply[:MAX_ERROR_TEXT]
        state.next_attempt = 0.0
        if gave_up:         # RFC 5321 4.5.4.1: give up after 4-5 days
            state.last_error += (" (gave up: in the queue since "
                                 f"{email.utils.formatdate(self.created, localtime=True)})")
        if state.status is Status.PENDING:
            state.next_attempt = now + self.policy.delay(state.attempts)

    def _owe_notices(self, key, state, outcome, now):
        """The notice this attempt makes owed, if the recipient wants it (dsn.wants)."""
        final = state.status is not Status.PENDING
        if final and state.notices.get(dsn.DELAYED) is NoticeState.OWED:
            del state.notices[dsn.DELAYED]             # the final notice says more
        action = None
        if state.status is Status.FAILED:
            action = dsn.FAILED
        elif state.status is Status.DONE and not outcome.dsn_passed_on:
            action = dsn.RELAYED                        # RFC 3461 5.2.2
        elif state.status is Status.PENDING and self._late(now) \
                and dsn.DELAYED not in state.notices:
            action = dsn.DELAYED                        # RFC 3461 5.2.5, once
        if action in self.wanted.get(key, ()):
            if not self.owed():
                self.notice_retry = NoticeRetry(next_attempt=now)   # new notices: due now
            state.notices[action] = NoticeState.OWED

    def _late(self, now):
        warning = self.policy.delay_warning
        return warning > 0 and now - self.created >= warning

    # The notices' own progress

    def owed(self, action=None):
        """{address: RecipientState} of the recipients with a notice (of `action`, or of
        any) not stored yet."""
        return {key: state for key, state in self.recipients.items()
                if any(notice is NoticeState.OWED and action in (None, kind)
                       for kind, notice in state.notices.items())}

    def owed_actions(self):
        """The actions with a notice owed, in NOTICE_ACTIONS order."""
        return [action for action in NOTICE_ACTIONS if self.owed(action)]

    def notices_due(self, now, forced=False):
        return bool(self.owed()) and (forced or self.notice_retry.next_attempt <= now)

    def notices_sent(self, action, keys):
        for key in keys:
            self.recipients[key].notices[action] = NoticeState.SENT
        if not self.owed():
            self.notice_retry = NoticeRetry()

    def notices_failed(self, error, now):
        """A notice could not be built or stored; returns the seconds until the next try."""
        retry = self.notice_retry
        retry.attempts += 1
        retry.last_error = error[:MAX_ERROR_TEXT]
        delay = self.policy.delay(retry.attempts)
        retry.next_attempt = now + delay
        return delay

    # Questions

    def due(self, now, forced=False):
        """The pending recipients due at `now` (all of them when forced: a flush)."""
        return [key for key, state in self.recipients.items()
                if state.status is Status.PENDING and (forced or state.next_attempt <= now)]

    def next_due(self):
        """When something is next due (a recipient or the notices), or None."""
        times = [state.next_attempt for state in self.recipients.values()
                 if state.status is Status.PENDING]
        if self.owed():
            times.append(self.notice_retry.next_attempt)
        return min(times) if times else None

    @property
    def finished(self):
        """Nothing pending and no notice owed: the message can leave the queue."""
        return not self.owed() and all(state.status is not Status.PENDING
                                       for state in self.recipients.values())

    # JSON

    def to_json(self):
        return {
            "version": FORMAT_VERSION,
            "queue_id": self.queue_id,
            "created": self.created,
            "recipients": {key: {"status": state.status.value, "attempts": state.attempts,
                                 "next_attempt": state.next_attempt,
                                 "last_attempt": state.last_attempt,
                                 "last_error": state.last_error, "remote": state.remote,
                                 "notices": {action: notice.value
                                             for action, notice in state.notices.items()}}
                           for key, state in self.recipients.items()},
            "notices": {"attempts": self.notice_retry.attempts,
                        "next_attempt": self.notice_retry.next_attempt,
                        "last_error": self.notice_retry.last_error},
        }

    @classmethod
    def from_json(cls, data, message, policy=DEFAULT_POLICY):
        """The record in `data` (parsed JSON) for `message`. RecordError if it is not exactly
        a record of this message as to_json writes it (or as an earlier relay wrote it:
        version 1, with a bounce instead of notices, or the record before versions)."""
        if not isinstance(data, dict):
            raise RecordError(f"not a JSON object but {_kind(data)}")
        version = data.get("version")
        if "version" not in data:
            record = _from_unversioned(data)
        elif version == 1:
            record = _from_version_1(data)
        else:
            record = _from_version_2(data)
        record.wanted = wanted_notices(message)
        record.policy = policy
        _check_matches(record, message)
        return record


def recipient_keys(message):
    """The address texts of a spooled message's recipients, in RCPT order, each once."""
    return list(dict.fromkeys(recipient.address.text for recipient in message.recipients))


def wanted_notices(message):
    """{address text: frozenset of the actions (NOTICE_ACTIONS) it gets a notice of}: the
    rule is dsn.wants; mail from <> gets none (RFC 5321 4.5.5). RecordError for a NOTIFY
    that is not RFC 3461 syntax (a spool file not written by the server)."""
    wanted = {}
    null_sender = message.envelope.reverse_path.is_null
    for recipient in message.recipients:
        key = recipient.address.text
        try:
            actions = frozenset() if null_sender else frozenset(
                action for action in NOTICE_ACTIONS if dsn.wants(recipient, action))
        except dsn.ParameterError as error:
            raise RecordError(f"recipient {key} in the spool file: {error}") from None
        wanted.setdefault(key, actions)
    return wanted


# ---------------------------------------------------------------------------------------
# Reading a record back: every field present, of its type, nothing else


RECIPIENT_FIELDS = ("status", "attempts", "next_attempt", "last_attempt", "last_error",
                    "remote", "notices")
RETRY_FIELDS = ("attempts", "next_attempt", "last_error")
# Version 1: one bounce per recipient ("none", "owed", "sent") and one bounce retry
VERSION_1_RECIPIENT_FIELDS = RECIPIENT_FIELDS[:-1] + ("bounce",)
VERSION_1_BOUNCES = {"none": None, "owed": NoticeState.OWED, "sent": NoticeState.SENT}
# The record of the relay before the format had a version: failures had been bounced
# before they were saved as failed
UNVERSIONED_FIELDS = ("queue_id", "created", "recipients")
UNVERSIONED_RECIPIENT_FIELDS = ("status", "attempts", "next_attempt", "last_error")
# The status a final notice stands beside (a delayed one: any, and owed only while pending)
STATUS_OF_NOTICE = {dsn.FAILED: Status.FAILED, dsn.RELAYED: Status.DONE}


def _from_version_2(data):
    _exact_fields(data, ("version",) + UNVERSIONED_FIELDS + ("notices",), "the record")
    if data["version"] != FORMAT_VERSION:
        raise RecordError(f"version: {data['version']!r}, not 1 or {FORMAT_VERSION}")
    recipients = {}
    for key, fields in _recipient_items(data):
        where = f"recipient {key}"
        _exact_fields(fields, RECIPIENT_FIELDS, where)
        state = _recipient_state(fields, where)
        state.notices = _notices(fields["notices"], state.status, where)
        recipients[key] = state
    return DeliveryRecord(_text(data, "queue_id", "the record"),
                          _time(data, "created", "the record"), recipients,
                          _retry(data["notices"], "notices"))


def _from_version_1(data):
    _exact_fields(data, ("version",) + UNVERSIONED_FIELDS + ("bounce",), "the record")
    recipients = {}
    for key, fields in _recipient_items(data):
        where = f"recipient {key}"
        _exact_fields(fields, VERSION_1_RECIPIENT_FIELDS, where)
        state = _recipient_state(fields, where)
        bounce = fields["bounce"]
        if bounce not in VERSION_1_BOUNCES:
            raise RecordError(f"{where}: bounce is {bounce!r}, not one of none, owed, sent")
        if VERSION_1_BOUNCES[bounce] is not None:
            state.notices = _notices({dsn.FAILED: bounce}, state.status, where)
        recipients[key] = state
    return DeliveryRecord(_text(data, "queue_id", "the record"),
                          _time(data, "created", "the record"), recipients,
                          _retry(data["bounce"], "bounce"))


def _recipient_state(fields, where):
    return RecipientState(
        status=_choice(fields, "status", Status, where),
        attempts=_count(fields, "attempts", where),
        next_attempt=_time(fields, "next_attempt", where),
        last_attempt=_time(fields, "last_attempt", where),
        last_error=_text(fields, "last_error", where),
        remote=_text(fields, "remote", where))


def _notices(data, status, where):
    """{action: NoticeState} from {"failed": "owed", ...}, each beside a status it may have."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: notices is {_kind(data)}, not an object")
    notices = {}
    for action in data:
        if action not in NOTICE_ACTIONS:
            raise RecordError(f"{where}: a notice {action!r}, not one of "
                              f"{', '.join(NOTICE_ACTIONS)}")
        notice = _choice(data, action, NoticeState, where)
        if action == dsn.DELAYED:
            fits = notice is NoticeState.SENT or status is Status.PENDING
        else:
            fits = status is STATUS_OF_NOTICE[action]
        if not fits:
            raise RecordError(f"{where}: {action} notice {notice.value!r} but status "
                              f"{status.value!r}")
        notices[action] = notice
    return notices


def _retry(data, where):
    _exact_fields(data, RETRY_FIELDS, where)
    return NoticeRetry(_count(data, "attempts", where), _time(data, "next_attempt", where),
                       _text(data, "last_error", where))


def _from_unversioned(data):
    _exact_fields(data, UNVERSIONED_FIELDS, "the record")
    recipients = {}
    for key, fields in _recipient_items(data):
        where = f"recipient {key}"
        _exact_fields(fields, UNVERSIONED_RECIPIENT_FIELDS, where)
        status = _choice(fields, "status", Status, where)
        recipients[key] = RecipientState(
            status=status, attempts=_count(fields, "attempts", where),
            next_attempt=_time(fields, "next_attempt", where),
            last_error=_text(fields, "last_error", where),
            notices={dsn.FAILED: NoticeState.SENT} if status is Status.FAILED else {})
    return DeliveryRecord(_text(data, "queue_id", "the record"),
                          _time(data, "created", "the record"), recipients)


def _check_matches(record, message):
    if record.queue_id != message.queue_id:
        raise RecordError(f"queue_id {record.queue_id!r} is not this message's "
                          f"({message.queue_id})")
    expected = recipient_keys(message)
    extra = [key for key in record.recipients if key not in expected]
    if extra:
        raise RecordError(f"names <{extra[0]}>, who is not a recipient in the spool file")
    missing = [key for key in expected if key not in record.recipients]
    if missing:
        raise RecordError(f"lacks <{missing[0]}>, a recipient in the spool file")
    record.recipients = {key: record.recipients[key] for key in expected}    # RCPT order


def _recipient_items(data):
    recipients = data["recipients"]
    if not isinstance(recipients, dict):
        raise RecordError(f"recipients: {_kind(recipients)}, not an object")
    if not recipients:
        raise RecordError("recipients: none")
    for key, fields in recipients.items():
        if not isinstance(fields, dict):
            raise RecordError(f"recipient {key}: {_kind(fields)}, not an object")
        yield key, fields


def _exact_fields(data, names, where):
    if not isinstance(data, dict):
        raise RecordError(f"{where}: {_kind(data)}, not an object")
    missing = [name for name in names if name not in data]
    if missing:
        raise RecordError(f"{where}: {missing[0]!r} is missing")
    unknown = [name for name in data if name not in names]
    if unknown:
        raise RecordError(f"{where}: unknown field {unknown[0]!r}")


def _choice(data, name, kind, where):
    value = data[name]
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise RecordError(f"{where}: {name} is {value!r}, not one of {choices}") from None


def _count(data, name, where):
    value = data[name]
    if type(value) is not int or value < 0:
        raise RecordError(f"{where}: {name} is {_kind(value)}, not a count")
    return value


def _time(data, name, where):
    value = data[name]
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise RecordError(f"{where}: {name} is {_kind(value)}, not a time")
    return float(value)


def _text(data, name, where):
    value = data[name]
    if not isinstance(value, str):
        raise RecordError(f"{where}: {name} is {_kind(value)}, not a string")
    return value


def _kind(value):
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float)):
        return repr(value)
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), repr(value))


def describe(state, now):
    """One recipient's state in words, for --queue."""
    text = f"{state.status.value}, {state.attempts} attempt(s)"
    if state.status is Status.PENDING:
        wait = state.next_attempt - now
        text += ", next now" if wait <= 0 else f", next in {duration(wait)}"
    if state.last_error:
        text += f", last error: {state.last_error}"
    for action, notice in state.notices.items():
        text += ", " + NOTICE_WORDS[action, notice]
    return text


NOTICE_WORDS = {(dsn.FAILED, NoticeState.OWED): "bounce owed",
                (dsn.FAILED, NoticeState.SENT): "bounced",
                (dsn.RELAYED, NoticeState.OWED): "relayed notice owed",
                (dsn.RELAYED, NoticeState.SENT): "relayed notice sent",
                (dsn.DELAYED, NoticeState.OWED): "delay notice owed",
                (dsn.DELAYED, NoticeState.SENT): "delay notice sent"}


def duration(seconds):
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"
