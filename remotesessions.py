"""The web view's sessions when they run in other processes ([server] processes).

The web view lives in the queue process (processes.py); sessions run in the accepting
processes. There, a `ForwardingHub` stands where events.Hub would: sessionlog.SessionLog
writes each line to a `ForwardedRecord`, which sends it on as (session id, Operation,
arguments, state, helo). In the queue process `RemoteSessions` replays each into the web
view's own Hub, on an events.SessionRecord whose session is a `RemoteSession` stand-in that
carries the state and HELO name as they were at that line.
"""
import enum
from dataclasses import dataclass
from typing import Optional

LINE_LIMIT = 4096               # characters of a command line or note forwarded


class Operation(enum.Enum):
    """What happened in a forwarded session: events.SessionRecord's method of that name."""
    OPEN = "open"
    RECEIVED = "received"
    SENT = "sent"
    MOVED = "moved"
    NOTE = "note"
    ACCEPTED = "accepted"
    CLOSE = "close"


# What an Outbox may drop when the queue process falls behind: a line, not a session's start
# or end, nor its counters
DROPPABLE = frozenset({Operation.RECEIVED, Operation.SENT, Operation.MOVED, Operation.NOTE})


class ForwardingHub:
    """events.Hub's session side in an accepting process: each session's lines go to the
    queue process, where the web view's Hub keeps them (RemoteSessions). `send(session id,
    Operation, arguments, state, helo)` is the way there."""

    def __init__(self, send):
        self.send = send

    def open_session(self, session, peer):
        record = ForwardedRecord(self.send, session)
        record.forward(Operation.OPEN, peer)
        return record

    def close_session(self, record):
        record.forward(Operation.CLOSE)


class ForwardedRecord:
    """What sessionlog.SessionLog writes to, as it would to an events.SessionRecord."""

    def __init__(self, send, session):
        self.send = send
        self.session = session

    def forward(self, operation, *arguments):
        session = self.session
        self.send(session.id, operation, arguments, session.state, session.helo)

    def received(self, text):
        self.forward(Operation.RECEIVED, text[:LINE_LIMIT])

    def sent(self, reply, transition=None):
        self.forward(Operation.SENT, reply, transition)

    def moved(self, transition):
        self.forward(Operation.MOVED, transition)

    def note(self, text):
        self.forward(Operation.NOTE, text[:LINE_LIMIT])

    def accepted(self, local_copies, octets):
        self.forward(Operation.ACCEPTED, local_copies, octets)


@dataclass
class RemoteSession:
    """What events.SessionRecord reads of a session that runs in another process."""
    id: str
    state: str
    helo: Optional[str]


class RemoteSessions:
    """In the queue process: the sessions of the accepting processes, in the web view's Hub."""

    def __init__(self, hub):
        self.hub = hub
        self.records = {}       # (process number, session id) -> (RemoteSession, SessionRecord)

    def apply(self, number, session_id, operation, arguments, state, helo):
        key = (number, session_id)
        if operation is Operation.OPEN:
            session = RemoteSession(session_id, state, helo)
            self.records[key] = (session, self.hub.open_session(session, *arguments))
            return
        if key not in self.records:
            return
        session, record = self.records[key]
        session.state, session.helo = state, helo
        if operation is Operation.CLOSE:
            del self.records[key]
            self.hub.close_session(record)
            return
        getattr(record, operation.value)(*arguments)

    def process_ended(self, number):
        for key in [key for key in self.records if key[0] == number]:
            _, record = self.records.pop(key)
            self.hub.close_session(record)
