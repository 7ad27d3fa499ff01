"""The queue runner: delivers what the spool holds, retries, notifies, and forgets nothing.

The spool is the queue. A `Schedule` says when each message is next due. When one is, its
due recipients are grouped by domain and each group is one job for a worker thread: one SMTP
transaction per domain (RFC 5321 4.5.4). Every outcome is applied to the message's
`DeliveryRecord` and the record saved atomically beside the spool file (spool.write_state)
at once, so a crash at any moment neither loses a message nor sends it twice to a recipient
who already answered (when the outcome leaves nothing to do, the spool file is removed
instead, as durably). The workers share a connections.ConnectionCache: a connection to a
next hop stays open for a few seconds for the next message of the same domain. When the pass is over, the notices owed (failed, relayed, delayed:
RFC 3461) are built and submitted, one DSN per action, and the message is removed once
nothing is pending and no notice is owed.

A spool file or record that cannot be used is moved to spool/corrupt/ with one log line;
the rest of the queue goes on.
"""
import functools
import queue
import threading
import time
from typing import NamedTuple, Optional

import dsn
from bounce import Bouncer, Notice
from connections import ConnectionCache
from delivery import (DEFAULT_POLICY, DeliveryRecord, Outcome, RecordError, RetryPolicy,
                      Status, describe, duration)
from relay import Transaction
from resolver import Resolver
from schedule import Schedule
from spool import SPOOL_SUFFIX, STATE_SUFFIX, SpoolError
from storage import StorageError
from tlspolicy import TlsPolicy

LOCAL_ERROR = "451 4.3.0 local error in the relay; trying again later"
# The web view's counter (events.Hub.count) that a recipient's final state adds one to
COUNTERS = {Status.DONE: "relayed", Status.FAILED: "bounced"}


class Attempt:
    """One pass over a message: its record, and how many domain jobs are still running."""

    def __init__(self, name, message, record, forced, jobs):
        self.name = name
        self.message = message
        self.record = record
        self.forced = forced            # a flush: the notices owed are due too
        self.jobs_left = jobs
        self.unsaved = False            # the record changed but could not be saved
        self.removed = False            # finished, and its files are gone from the spool
        self.lock = threading.Lock()

    @property
    def tag(self):
        return f"[{self.message.queue_id}]"

    def job_done(self):
        """Count one job as over; True for the last."""
        with self.lock:
            self.jobs_left -= 1
            return self.jobs_left <= 0


class QueueRunner:
    def __init__(self, config, spool, router, submit, log, signer=None):
        self.config = config
        self.spool = spool
        self.log = log
        self.policy = RetryPolicy.from_config(config)
        self.resolver = Resolver(config, log)
        # What each Transaction shares: MTA-STS and the TLS memory, the DKIM signer (None:
        # mail goes unsigned)
        self.tls = TlsPolicy.for_config(config, self.resolver, log)
        self.signer = signer
        self.connections = ConnectionCache(log)     # sessions kept open between messages
        self.bouncer = Bouncer(config.hostname, router, self._submit_notice, log)
        self._submit = submit
        self.events = None                  # events.Hub of the web view (watch), or None
        self.schedule = Schedule()
        self.jobs = queue.Queue()           # callables; None stops a worker
        self._records = {}                  # name -> DeliveryRecord, the live copy
        self._records_lock = threading.Lock()
        self._threads = []
        self._stopping = threading.Event()

    # control

    def start(self):
        """Take up every spool file left behind (setting the damaged ones aside), then run."""
        now = time.time()
        for name in self.spool.names():
            try:
                _, record = self._load(name)
            except FileNotFoundError:
                continue
            except (SpoolError, RecordError, OSError) as error:
                self._set_aside(name, error)
                continue
            due = record.next_due()             # None: finished; the pass removes it
            self.schedule.add(name, now if due is None else due)
        self._spawn(self._schedule_loop, "relay-scheduler")
        for number in range(self.config.relay_workers):
            self._spawn(self._work_loop, f"relay-{number + 1}")
        return self

    def _spawn(self, target, name):
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, grace=2.0):
        """Stop taking work; wait up to `grace` seconds for the jobs under way."""
        self._stopping.set()
        self.schedule.stop()
        for _ in range(self.config.relay_workers):
            self.jobs.put(None)
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        cut_off = sum(1 for thread in self._threads if thread.is_alive())
        if cut_off:
            self.log.info("stopping: %d deliveries still under way are cut off; their "
                          "messages stay queued (one sent to its last dot may arrive twice)",
                          cut_off)
        self.connections.close()

    def watch(self, hub):
        """Tell `hub` (events.Hub, the web view) of every change from now on."""
        self.events = hub

    def _changed(self, name):
        if self.events is not None:
            self.events.queue_changed(name)

    def _count(self, counter, amount=1):
        if self.events is not None and counter and amount:
            self.events.count(counter, amount)

    def _submit_notice(self, envelope, message):
        """The bouncer's way in (the system's submit), counting the copies stored here."""
        spool_name = self._submit(envelope, message)
        self._count("local", len(envelope.local_recipients))
        return spool_name

    def enqueue(self, name, due=None):
        """A new spool file (or one to look at again), due now unless told otherwise."""
        self.schedule.add(name, time.time() if due is None else due)
        self._changed(name)

    def flush(self, queue_ids=None):
        """Make every pending recipient and owed notice due now (--flush, SIGUSR1), or only
        those of the messages `queue_ids` (the web view's "deliver now" on one message).
        Returns the time of the flush."""
        names = self.spool.names()
        if queue_ids is not None:
            names = [name for name in names if name.partition("-")[2] in queue_ids]
        flushed_at = time.time()
        self.schedule.flush(names, flushed_at)
        self.log.info("queue flushed: %d message(s) due now", len(names))
        for name in names:
            self._changed(name)
        return flushed_at

    def wait_for_one_pass(self, since, timeout=None):
        """Wait until every message due at `since` has had its attempt. False on timeout."""
        return self.schedule.wait_until_idle(since, timeout)

    # reading a message and its record

    def _load(self, name):
        """(SpooledMessage, DeliveryRecord). Raises SpoolError, RecordError or OSError."""
        message = self.spool.read(name)
        with self._records_lock:
            record = self._records.get(name)
        if record is None:
            data = self.spool.read_state(name)
            if data is None:
                record = DeliveryRecord.new(message, self.policy)
            else:
                record = _record_from(data, name, message, self.policy)
            with self._records_lock:
                self._records[name] = record
        return message, record

    def _set_aside(self, name, reason):
        self._forget(name)
        try:
            moved = self.spool.move_to_corrupt(name)
        except OSError as error:
            self.log.error("[%s] damaged (%s), and cannot be moved aside: %s", name, reason, error)
            return
        self.log.error("[%s] moved to %s: %s (%s)", name, self.spool.corrupt_directory, reason,
                       ", ".join(moved))
        self._changed(name)

    def _forget(self, name):
        with self._records_lock:
            self._records.pop(name, None)
        self.schedule.forget(name)

    # the scheduler: one pass per due message

    def _schedule_loop(self):
        while True:
            name = self.schedule.take()
            if name is None:
                return
            try:
                self._begin(name)
            except Exception:
                self.log.error("[%s] cannot start a delivery attempt; trying again later",
                               name, exc_info=True)
                self.schedule.finish(name, time.time() + self.policy.delays[0])

    def _begin(self, name):
        """Queue one job per domain with due recipients (or only the end of the pass)."""
        try:
            message, record = self._load(name)
        except FileNotFoundError:
            self.log.info("[%s] the spool file is gone; no longer queued", name)
            self._forget(name)
            return
        except (SpoolError, RecordError) as error:
            self._set_aside(name, error)
            return
        except OSError as error:                # perhaps passing (out of descriptors)
            self.log.error("[%s] cannot read %s%s: %s; trying again later", name, name,
                           SPOOL_SUFFIX, error)
            self.schedule.finish(name, time.time() + self.policy.delays[0])
            return
        forced = self.schedule.take_forced(name)
        groups = self._by_domain(message, record.due(time.time(), forced))
        attempt = Attempt(name, message, record, forced, len(groups))
        if not groups:
            self.jobs.put(functools.partial(self._finish, attempt))
            return
        for domain, recipients in groups.items():
            self.jobs.put(functools.partial(self._deliver, attempt, domain, recipients))

    @staticmethod
    def _by_domain(message, keys):
        """{domain: [envelope.Recipient]} of the recipients named by `keys`, each once."""
        wanted, groups = set(keys), {}
        for recipient in message.recipients:
            key = recipient.address.text
            if key in wanted:
                wanted.discard(key)
                groups.setdefault(recipient.address.domain, []).append(recipient)
        return groups

    # the workers

    def _work_loop(self):
        while True:
            job = self.jobs.get()
            if job is None or self._stopping.is_set():
                return              # a job left over is taken up again at the next start
            try:
                job()
            except Exception:
                self.log.error("relay job failed unexpectedly", exc_info=True)

    def _deliver(self, attempt, domain, recipients):
        reported = set()

        def report(outcomes):
            reported.update(outcomes)
            self._record(attempt, outcomes)

        try:
            Transaction(self.config, self.resolver, self.log, attempt.message, domain,
                        recipients, report, tls=self.tls, signer=self.signer,
                        connections=self.connections).run()
        except Exception:
            self.log.error("%s delivery to %s failed unexpectedly; trying again later",
                           attempt.tag, domain, exc_info=True)
            rest = {recipient.address.text: Outcome(Status.PENDING, LOCAL_ERROR)
                    for recipient in recipients if recipient.address.text not in reported}
            self._record(attempt, rest)
        finally:
            if attempt.job_done():
                self._finish(attempt)

    def _record(self, attempt, outcomes):
        """Apply outcomes to the record and save it at once."""
        now = time.time()
        with attempt.lock:
            for key, state, _ in attempt.record.apply(outcomes, now):
                self._log_change(attempt, key, state, now)
                self._count(COUNTERS.get(state.status))
            self._save(attempt)
        self._changed(attempt.name)

    def _log_change(self, attempt, key, state, now):
        text = "sent" if state.status is Status.DONE else state.last_error
        self.log.info("%s <%s>: %s: %s", attempt.tag, key, state.status.value, text)
        if state.status is Status.PENDING and self.config.trace:
            self.log.info("%s    <%s> retried in %ds (RFC 5321 4.5.4.1)", attempt.tag, key,
                          state.next_attempt - now)
        if state.status is Status.FAILED and dsn.FAILED not in attempt.record.wanted[key]:
            if attempt.message.envelope.reverse_path.is_null:
                why = "the sender is <> (RFC 5321 4.5.5)"
            else:
                why = "its NOTIFY does not ask for failures (RFC 3461 4.1)"
            self.log.info("%s <%s> not bounced: %s", attempt.tag, key, why)

    def _save(self, attempt):
        """Write the record; called with the attempt's lock held. A failure is logged and
        the write tried again at the end of the pass (the live copy stays right). A record
        with nothing left to do is not written: the spool file is removed instead, which
        as durably means that no recipient is asked again (and costs one fsync, not three)."""
        if attempt.record.finished:
            try:
                if self._remove_files(attempt):
                    return
            except Exception:               # the record is written instead, as ever
                self.log.error("%s cannot remove the finished message", attempt.tag,
                               exc_info=True)
        try:
            self.spool.write_state(attempt.name, attempt.record.to_json())
            attempt.unsaved = False
        except OSError as error:
            attempt.unsaved = True
            self.log.error("%s cannot save the delivery record: %s", attempt.tag, error)

    # the end of a pass

    def _finish(self, attempt):
        """End the pass. Whatever goes wrong, the message is due again later: it never stays
        marked as under way."""
        try:
            self._end_pass(attempt)
        except Exception:
            self.log.error("%s the end of a delivery attempt failed; trying again later",
                           attempt.tag, exc_info=True)
            self.schedule.finish(attempt.name, time.time() + self.policy.delays[0])

    def _end_pass(self, attempt):
        """Send the notices owed, then remove the message or schedule its next attempt."""
        now = time.time()
        with attempt.lock:
            record = attempt.record
            if record.notices_due(now, attempt.forced):
                self._send_notices(attempt, now)
            if record.finished:
                self._remove(attempt)
                return
            if attempt.unsaved:
                self._save(attempt)
            due = record.next_due()
        self.schedule.finish(attempt.name, due)

    def _send_notices(self, attempt, now):
        """One DSN per action owed; one that cannot be stored is tried again on its own
        schedule, and the recipients are not asked again."""
        record = attempt.record
        for action in record.owed_actions():
            owed = record.owed(action)
            addresses = ", ".join(f"<{key}>" for key in owed)
            try:
                envelope = self.bouncer.send(attempt.message, self._notices(attempt, action,
                                                                            owed), now)
            except Exception as error:
                delay = record.notices_failed(f"{type(error).__name__}: {error}", now)
                self.log.error("%s cannot send the %s notice for %s: %s; trying it again in "
                               "%ds (the recipients are not asked again)", attempt.tag, action,
                               addresses, error, delay,
                               exc_info=not isinstance(error, (OSError, StorageError)))
                break
            record.notices_sent(action, owed)
            if envelope is not None:
                self.log.info("%s %s notice %s for %s sent to <%s>", attempt.tag, action,
                              envelope.queue_id or "", addresses,
                              envelope.recipients[0].address.text)
        self._save(attempt)

    def _notices(self, attempt, action, owed):
        """[Notice] of `action` for the recipients `owed` ({address: RecipientState})."""
        recipients = {recipient.address.text: recipient
                      for recipient in reversed(attempt.message.recipients)}
        retry_until = attempt.record.created + self.policy.max_queue_age \
            if action == dsn.DELAYED else None
        return [Notice.from_reply(recipients[key], action, state.last_error,
                                  state.remote, state.last_attempt or None, retry_until)
                for key, state in owed.items()]

    def _remove_files(self, attempt):
        """The spool file and its record, unlinked durably; True when done (now or
        before). Called with the attempt's lock held."""
        if attempt.removed:
            return True
        try:
            self.spool.remove(attempt.name)
        except OSError as error:
            attempt.unsaved = True
            self.log.error("%s cannot remove the finished message: %s", attempt.tag, error)
            return False
        attempt.removed, attempt.unsaved = True, False
        return True

    def _remove(self, attempt):
        if not self._remove_files(attempt):
            self.schedule.finish(attempt.name, time.time() + self.policy.delays[0])
            return
        self.log.info("%s finished; removed from the queue", attempt.tag)
        with self._records_lock:
            self._records.pop(attempt.name, None)
        self.schedule.finish(attempt.name, None)
        self._changed(attempt.name)


def _record_from(data, name, message, policy=DEFAULT_POLICY):
    """DeliveryRecord.from_json, its complaint naming the file."""
    try:
        return DeliveryRecord.from_json(data, message, policy)
    except RecordError as error:
        raise RecordError(f"state file {name}{STATE_SUFFIX}: {error}") from None


# ---------------------------------------------------------------------------------------
# Queue inspection: python smtpd.py --queue


class QueuedMessage(NamedTuple):
    """One message of the queue as --queue and the web view show it."""
    name: str                       # the spool name (<port>-<queue id>)
    message: Optional[object]       # spool.SpooledMessage; None when the file is damaged
    record: Optional[DeliveryRecord]    # None when the message or its record is damaged
    problem: str = ""               # what is damaged, in words

    @property
    def queue_id(self):
        return self.name.partition("-")[2]


def queue_entries(spool):
    """[QueuedMessage] of every spool file, read from the disk as --queue reads it (a file
    gone meanwhile, because the relay finished it, is left out)."""
    entries = []
    for name in spool.names():
        try:
            message = spool.read(name)
        except FileNotFoundError:
            continue
        except (SpoolError, OSError) as error:
            entries.append(QueuedMessage(name, None, None, f"damaged: {error}"))
            continue
        try:
            data = spool.read_state(name)
            record = (DeliveryRecord.new(message) if data is None
                      else _record_from(data, name, message))
        except (SpoolError, RecordError, OSError) as error:
            entries.append(QueuedMessage(name, message, None, f"damaged record: {error}"))
            continue
        entries.append(QueuedMessage(name, message, record))
    return entries


def notice_retry_line(record, now):
    """The notices' own retry, in words, or "" when none has failed."""
    retry = record.notice_retry
    if not (record.owed() and retry.attempts):
        return ""
    wait = retry.next_attempt - now
    return (f"notices: {retry.attempts} failed attempt(s), next "
            f"{'now' if wait <= 0 else 'in ' + duration(wait)}, last error: {retry.last_error}")


def queue_listing(spool, now=None, entries=None):
    """Lines describing every queued message, like Postfix's mailq, then what corrupt/ holds
    (`entries`: the queue_entries already read)."""
    now = now or time.time()
    lines = []
    entries = queue_entries(spool) if entries is None else entries
    for entry in entries:
        lines += _listing_entry(entry, now)
    count = len(entries)
    lines.append(f"-- {count} message(s) in the queue" if count else "Mail queue is empty")
    corrupt = spool.corrupt()
    for file_name in corrupt:
        lines.append(f"{file_name}  corrupt (set aside in {spool.corrupt_directory})")
    if corrupt:
        lines.append(f"-- {len(corrupt)} corrupt file(s); the log says what is wrong")
    return lines


def _listing_entry(entry, now):
    message, record = entry.message, entry.record
    if message is None:
        return [f"{entry.name}{SPOOL_SUFFIX}  {entry.problem}"]
    lines = [f"{message.queue_id}  age {duration(now - message.created)}  "
             f"{message.text_size} octets  from <{message.envelope.reverse_path.text}>  "
             f"({entry.name}{SPOOL_SUFFIX})"]
    if record is None:
        return lines + [f"    {entry.problem}"]
    lines += [f"    <{key}>  {describe(state, now)}" for key, state in record.recipients.items()]
    notices = notice_retry_line(record, now)
    if notices:
        lines.append(f"    {notices}")
    return lines
