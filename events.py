"""What happens inside the server, for whoever watches it: the web view (web.py).

Two places publish here, and only these: the dialogue log of each session (sessionlog.SessionLog
hands every line it writes to that session's `SessionRecord`), and the queue runner, which
says when the queue changed and what the relay did (`Hub.queue_changed`, `Hub.count`).

    hub = Hub()
    record = hub.open_session(session, "127.0.0.1:50344")   # a SessionRunner, at connect
    record.received("MAIL FROM:<bob@test.ru>")               # SessionLog, as it logs
    record.sent(reply, transition)
    hub.close_session(record)
    watcher = hub.watch()          # the web side: watcher.next(timeout) -> Event or None

When nobody watches, a line costs one entry appended to its session's recent lines (kept so
that a page opened in the middle of a session shows how it began) and, for a reply, a counter
for /metrics; nothing is formatted, not even a timestamp taken. A reply is kept as the `replies.Reply` it is and turned into
text only when a page asks for it. With watchers, each gets every event in its own bounded
queue; a watcher that falls too far behind is dropped (its page reconnects and starts from a
fresh snapshot).
"""
import collections
import enum
import queue
import threading
import time
from typing import NamedTuple, Optional

RECENT_LINES = 400          # lines kept per session (the oldest go first)
HISTORY = 20                # finished sessions kept for the page
WATCHER_BACKLOG = 5000      # events a watcher may have unread before it is dropped
REPLY_CLASSES = ("2xx", "3xx", "4xx", "5xx")    # RFC 5321 4.2.1: the first digit


class Direction(enum.Enum):
    RECEIVED = "<-"         # from the client, as the log shows it
    SENT = "->"             # a reply
    MOVED = "=>"            # a state change with no reply line (BDAT reads its octets first)
    NOTE = ".."             # what the server did (TLS established, disconnected)


class Line(NamedTuple):
    """One entry of a session's dialogue, as the web side reads it."""
    number: int             # 1, 2, ... within the session: a page skips what it has seen
    direction: Direction
    content: object         # str (received, note) or replies.Reply (sent)
    transition: object = None   # state.Transition of the command this answers, or None


class _Note:
    """A note or a lone move, as kept: a class of its own, so that a kept entry's type
    says what it is (a str was received, a tuple was sent)."""
    __slots__ = ("direction", "text", "transition")

    def __init__(self, direction, text, transition=None):
        self.direction, self.text, self.transition = direction, text, transition


class Kind(enum.Enum):
    """What an Event says."""
    OPENED = "opened"       # subject: SessionRecord
    LINE = "line"           # subject: SessionRecord, line: Line
    CLOSED = "closed"       # subject: SessionRecord
    QUEUE = "queue"         # subject: the spool name that changed (str)
    MAILBOX = "mailbox"     # subject: "" (a local delivery: the mailbox list changed)


class Event(NamedTuple):
    kind: Kind
    subject: object
    line: Optional[Line] = None


class Totals:
    """The counters of /metrics, besides those the live sessions still hold."""
    COUNTERS = ("accepted", "local", "relayed", "bounced", "octets")

    def __init__(self):
        self.sessions = 0
        self.replies = dict.fromkeys(REPLY_CLASSES, 0)
        self.counts = dict.fromkeys(self.COUNTERS, 0)


def reply_classes(by_digit):
    """{"2xx": n, ...} from counters indexed by a code's first digit (RFC 5321 4.2.1)."""
    return {name: by_digit[int(name[0])] for name in REPLY_CLASSES}


class SessionRecord:
    """One session as the web view sees it. Written by the session's own thread only, and
    as cheaply as it can be: an entry is the str received, the (Reply, Transition) sent or
    a _Note, kept as it is; the web side turns copies of them into Lines (`lines()`)."""

    def __init__(self, hub, session, peer):
        self._hub = hub
        self.session = session          # state.Session while it lasts; None once closed
        self.id = session.id
        self.peer = peer
        self.opened = time.time()
        self.closed = None              # epoch seconds, once over
        self.final_state = None
        self.helo_name = None
        self.by_digit = [0] * 10        # replies sent, by the first digit of the code
        self.counts = dict.fromkeys(Totals.COUNTERS, 0)
        self._entries = collections.deque(maxlen=RECENT_LINES)
        self._numbered = 0              # entries ever added: the last one's number

    # what the session's thread calls, once per line: keep it short

    def received(self, text):
        self._numbered += 1
        self._entries.append(text)
        if self._hub.watchers:
            self._publish()

    def sent(self, reply, transition=None):
        self.by_digit[reply.code // 100] += 1
        self._numbered += 1
        self._entries.append((reply, transition))
        if self._hub.watchers:
            self._publish()

    def moved(self, transition):
        self._add(_Note(Direction.MOVED, "", transition))

    def note(self, text):
        self._add(_Note(Direction.NOTE, text))

    def accepted(self, local_copies, octets):
        """A message was accepted (250 after its text) with `local_copies` Maildir copies."""
        self.counts["accepted"] += 1
        self.counts["local"] += local_copies
        self.counts["octets"] += octets
        if local_copies:
            self._hub.publish(Event(Kind.MAILBOX, ""))

    def _add(self, entry):
        self._numbered += 1
        self._entries.append(entry)
        if self._hub.watchers:
            self._publish()

    def _publish(self):
        number = self._numbered
        self._hub.publish(Event(Kind.LINE, self, as_line(number, self._entries[-1])))

    # what the web side reads

    @property
    def state(self):
        session = self.session
        return self.final_state if session is None else session.state

    @property
    def helo(self):
        session = self.session
        return self.helo_name if session is None else session.helo

    @property
    def replies(self):
        return reply_classes(self.by_digit)

    @property
    def last_transition(self):
        for entry in reversed(self._copy()):
            transition = entry[1] if type(entry) is tuple else getattr(entry, "transition",
                                                                          None)
            if transition is not None:
                return transition
        return None

    def lines(self):
        """The recent entries as Lines, numbered (the session's thread may be adding one)."""
        entries = self._copy()
        first = self._numbered - len(entries) + 1
        return [as_line(first + index, entry) for index, entry in enumerate(entries)]

    def _copy(self):
        for _ in range(3):
            try:
                return list(self._entries)
            except RuntimeError:            # "deque mutated during iteration"
                continue
        return []

    def finish(self):
        session = self.session
        self.helo_name, self.final_state = session.helo, session.state
        self.closed = time.time()
        self.session = None


def as_line(number, entry):
    """A kept entry as a Line."""
    if type(entry) is str:
        return Line(number, Direction.RECEIVED, entry)
    if type(entry) is tuple:
        return Line(number, Direction.SENT, entry[0], entry[1])
    return Line(number, entry.direction, entry.text, entry.transition)


class Watcher:
    """One page's view of the events: a bounded queue of its own."""

    def __init__(self):
        self.events = queue.Queue(maxsize=WATCHER_BACKLOG)
        self.dropped = False

    def offer(self, event):
        try:
            self.events.put_nowait(event)
        except queue.Full:
            self.dropped = True             # the page reconnects and takes a new snapshot

    def next(self, timeout):
        """The next Event; None after `timeout` seconds, or when the hub closed or dropped
        this watcher (then `closed` is true)."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def pending(self, limit):
        """Up to `limit` more events that are already waiting, without blocking."""
        found = []
        while len(found) < limit:
            try:
                found.append(self.events.get_nowait())
            except queue.Empty:
                break
        return found

    def close(self):
        self.dropped = True
        try:
            self.events.put_nowait(None)    # wakes a next() that waits
        except queue.Full:
            pass

    @property
    def closed(self):
        return self.dropped


class Hub:
    def __init__(self):
        self.watchers = ()              # replaced whole (a tuple), never changed in place
        self.live = {}                  # session id -> SessionRecord
        self.history = collections.deque(maxlen=HISTORY)
        self.totals = Totals()
        self.started = time.time()
        self._lock = threading.Lock()

    # the sessions

    def open_session(self, session, peer):
        record = SessionRecord(self, session, peer)
        with self._lock:
            self.live[record.id] = record
            self.totals.sessions += 1
        if self.watchers:
            self.publish(Event(Kind.OPENED, record))
        return record

    def close_session(self, record):
        record.finish()
        with self._lock:
            self.live.pop(record.id, None)
            self.history.append(record)
            for key, count in record.replies.items():
                self.totals.replies[key] += count
            for key, count in record.counts.items():
                self.totals.counts[key] += count
        if self.watchers:
            self.publish(Event(Kind.CLOSED, record))

    def sessions(self):
        """(live records, finished records), oldest first."""
        with self._lock:
            return list(self.live.values()), list(self.history)

    def find(self, session_id):
        with self._lock:
            return self.live.get(session_id) or next(
                (record for record in self.history if record.id == session_id), None)

    # the queue

    def queue_changed(self, name):
        if self.watchers:
            self.publish(Event(Kind.QUEUE, name))

    def count(self, counter, amount=1):
        """A counter outside any session: relayed, bounced, local (a notice stored here)."""
        with self._lock:
            self.totals.counts[counter] += amount
        if counter == "local" and self.watchers:
            self.publish(Event(Kind.MAILBOX, ""))

    # /metrics

    def snapshot_totals(self):
        """(sessions, {class: replies}, {counter: n}): the finished and the live added up."""
        with self._lock:
            live = list(self.live.values())
            sessions = self.totals.sessions
            replies = dict(self.totals.replies)
            counts = dict(self.totals.counts)
        for record in live:
            for key, count in record.replies.items():
                replies[key] += count
            for key, count in list(record.counts.items()):
                counts[key] += count
        return sessions, replies, counts

    # watchers

    def watch(self):
        watcher = Watcher()
        with self._lock:
            self.watchers = self.watchers + (watcher,)
        return watcher

    def unwatch(self, watcher):
        with self._lock:
            self.watchers = tuple(other for other in self.watchers if other is not watcher)

    def publish(self, event):
        for watcher in self.watchers:
            watcher.offer(event)
            if watcher.dropped:
                self.unwatch(watcher)
                watcher.close()

    def close(self):
        """The server is stopping: every watcher's next() returns None."""
        with self._lock:
            watchers, self.watchers = self.watchers, ()
        for watcher in watchers:
            watcher.close()
