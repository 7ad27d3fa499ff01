"""The relay's record of one queued message: where each recipient stands, and the bounce owed.

    recipient: pending --2xx--> done
               pending --4xx, network, DNS trouble--> pending (next attempt per [relay] retry)
               pending --5xx, or older than max_queue_age--> failed (a bounce owed, unless <>)

`DeliveryRecord.apply(outcomes, now)` is the only place a recipient's state changes. A final
state (done, failed) never changes again: the remote is never asked twice for an answer it
has given. A failure's bounce is owed until it is stored, and is retried on its own schedule,
without another delivery attempt. The record is saved as JSON beside the spool file
(spool.write_state) and read back with strict checks: a record that is not exactly what
`to_json` writes is a `RecordError`, never a guess.
"""
import email.utils
import enum
import math
from dataclasses import dataclass, field
from typing import NamedTuple

FORMAT_VERSION = 1
MAX_ERROR_TEXT = 1000      # octets of a remote reply kept (RFC 5321 4.5.3.1.5: 512 a line)


class Status(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class Bounce(enum.Enum):
    """Whether a recipient's failure still has to be reported to the sender."""
    NONE = "none"           # not failed, or failed for the null sender (RFC 5321 4.5.5)
    OWED = "owed"
    SENT = "sent"


class Outcome(NamedTuple):
    """What one attempt gave for one recipient."""
    status: Status
    reply: str              # the remote's reply or our own, one line
    remote: str = ""        # the host that gave it, "ip:port"


class RetryPolicy(NamedTuple):
    delays: tuple           # seconds between attempts; the last repeats ([relay] retry)
    max_queue_age: float    # then give up (RFC 5321 4.5.4.1)

    @classmethod
    def from_config(cls, config):
        return cls(tuple(config.retry), config.max_queue_age)

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
    bounce: Bounce = Bounce.NONE


@dataclass
class BounceRetry:
    """The bounce's own retries, when it could not be built or stored."""
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""


@dataclass
class DeliveryRecord:
    queue_id: str
    created: float                  # when the message was accepted
    recipients: dict                # address text -> RecipientState, in RCPT order
    bounce: BounceRetry = field(default_factory=BounceRetry)
    bounce_wanted: bool = True      # False for mail from <> (RFC 5321 4.5.5); not saved
    policy: RetryPolicy = DEFAULT_POLICY                                    # not saved

    @classmethod
    def new(cls, message, policy=DEFAULT_POLICY):
        """The record of a message not tried yet (a spool.SpooledMessage)."""
        return cls(message.queue_id, message.created,
                   {key: RecipientState() for key in recipient_keys(message)},
                   bounce_wanted=not message.envelope.reverse_path.is_null, policy=policy)

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
        if state.status is Status.FAILED and self.bounce_wanted:
            if not self.owed():
                self.bounce = BounceRetry(next_attempt=now)    # a new bounce: due now
            state.bounce = Bounce.OWED

    # The bounce's own progress

    def owed(self):
        """{address: RecipientState} of the failures whose bounce is not stored yet."""
        return {key: state for key, state in self.recipients.items()
                if state.bounce is Bounce.OWED}

    def bounce_due(self, now, forced=False):
        return bool(self.owed()) and (forced or self.bounce.next_attempt <= now)

    def bounce_sent(self, keys):
        for key in keys:
            self.recipients[key].bounce = Bounce.SENT
        self.bounce = BounceRetry()

    def bounce_failed(self, error, now):
        """The bounce could not be built or stored; returns the seconds until its next try."""
        self.bounce.attempts += 1
        self.bounce.last_error = error[:MAX_ERROR_TEXT]
        delay = self.policy.delay(self.bounce.attempts)
        self.bounce.next_attempt = now + delay
        return delay

    # Questions

    def due(self, now, forced=False):
        """The pending recipients due at `now` (all of them when forced: a flush)."""
        return [key for key, state in self.recipients.items()
                if state.status is Status.PENDING and (forced or state.next_attempt <= now)]

    def next_due(self):
        """When something is next due (a recipient or the bounce), or None."""
        times = [state.next_attempt for state in self.recipients.values()
                 if state.status is Status.PENDING]
        if self.owed():
            times.append(self.bounce.next_attempt)
        return min(times) if times else None

    @property
    def finished(self):
        """Nothing pending and no bounce owed: the message can leave the queue."""
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
                                 "bounce": state.bounce.value}
                           for key, state in self.recipients.items()},
            "bounce": {"attempts": self.bounce.attempts,
                       "next_attempt": self.bounce.next_attempt,
                       "last_error": self.bounce.last_error},
        }

    @classmethod
    def from_json(cls, data, message, policy=DEFAULT_POLICY):
        """The record in `data` (parsed JSON) for `message`. RecordError if it is not exactly
        a record of this message as to_json writes it (or as the relay wrote it before the
        format had a version)."""
        if not isinstance(data, dict):
            raise RecordError(f"not a JSON object but {_kind(data)}")
        if "version" not in data:
            record = _from_unversioned(data)
        else:
            record = _from_version_1(data)
        record.bounce_wanted = not message.envelope.reverse_path.is_null
        record.policy = policy
        _check_matches(record, message)
        return record


def recipient_keys(message):
    """The address texts of a spooled message's recipients, in RCPT order, each once."""
    return list(dict.fromkeys(recipient.address.text for recipient in message.recipients))


# ---------------------------------------------------------------------------------------
# Reading a record back: every field present, of its type, nothing else


RECIPIENT_FIELDS = ("status", "attempts", "next_attempt", "last_attempt", "last_error",
                    "remote", "bounce")
BOUNCE_FIELDS = ("attempts", "next_attempt", "last_error")
# The record of the relay before the format had a version: failures had been bounced
# before they were saved as failed
UNVERSIONED_FIELDS = ("queue_id", "created", "recipients")
UNVERSIONED_RECIPIENT_FIELDS = ("status", "attempts", "next_attempt", "last_error")


def _from_version_1(data):
    _exact_fields(data, ("version",) + UNVERSIONED_FIELDS + ("bounce",), "the record")
    if data["version"] != FORMAT_VERSION:
        raise RecordError(f"version: {data['version']!r}, not {FORMAT_VERSION}")
    recipients = {}
    for key, fields in _recipient_items(data):
        where = f"recipient {key}"
        _exact_fields(fields, RECIPIENT_FIELDS, where)
        state = RecipientState(
            status=_choice(fields, "status", Status, where),
            attempts=_count(fields, "attempts", where),
            next_attempt=_time(fields, "next_attempt", where),
            last_attempt=_time(fields, "last_attempt", where),
            last_error=_text(fields, "last_error", where),
            remote=_text(fields, "remote", where),
            bounce=_choice(fields, "bounce", Bounce, where))
        if state.status is not Status.FAILED and state.bounce is not Bounce.NONE:
            raise RecordError(f"{where}: bounce {state.bounce.value!r} but status "
                              f"{state.status.value!r}")
        recipients[key] = state
    bounce_fields = data["bounce"]
    _exact_fields(bounce_fields, BOUNCE_FIELDS, "bounce")
    bounce = BounceRetry(_count(bounce_fields, "attempts", "bounce"),
                         _time(bounce_fields, "next_attempt", "bounce"),
                         _text(bounce_fields, "last_error", "bounce"))
    return DeliveryRecord(_text(data, "queue_id", "the record"),
                          _time(data, "created", "the record"), recipients, bounce)


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
            bounce=Bounce.SENT if status is Status.FAILED else Bounce.NONE)
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
    if state.bounce is Bounce.OWED:
        text += ", bounce owed"
    elif state.bounce is Bounce.SENT:
        text += ", bounced"
    return text


def duration(seconds):
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"
