"""The relay's connection cache: an SMTP session to a next hop, kept open after its
transaction for the next message to the same domain through the same hop (as Postfix's
scache(8) does).

    cache = ConnectionCache(log)
    session = cache.take(key)           # a CachedSession, or None: connect as usual
    ...one transaction on session.client...
    cache.give_back(key, session)       # only after a transaction ended cleanly
    cache.close()                       # on shutdown: QUIT to every idle session

    why_not = reset(session)            # None: RSET answered (or goes with MAIL, below)
    send_after_reset(client, ["RSET", "MAIL FROM:<...>", ...], timeout)   # PIPELINING

A session is in the cache only while no worker uses it (`take` removes it), so it is never
shared between two transactions at once. The key holds the domain, the hop and the TLS level
asked for, so what a session reached (STARTTLS, a checked certificate) is only ever reused
for the domain whose rules accepted it. A session idle for more than `idle_limit` seconds is
closed (QUIT) by a reaper thread, and one older than `age_limit` is not given back. The
caller sends RSET before reusing one (RFC 5321 4.1.1.5): alone, or to a host offering
PIPELINING in one write with MAIL and every RCPT (RFC 2920 3.1). Any failure there is a
session the remote closed or timed out: nothing of the message was sent, so a new connection
loses or doubles nothing.
"""
import threading
import time
from typing import NamedTuple

from resolver import DeliveryError

IDLE_LIMIT = 2.0            # seconds a session waits unused (Postfix: 2 s)
AGE_LIMIT = 300.0           # seconds from connect after which a session is not reused
MAX_IDLE_PER_KEY = 32       # idle sessions kept for one key; beyond that, QUIT
QUIT_TIMEOUT = 2.0          # seconds the reaper waits for the reply to QUIT


class StaleConnection(DeliveryError):
    """A cached connection did not answer the RSET before a transaction: the remote closed
    it or timed out. Nothing of the message went over it; a new connection is made."""


class CacheKey(NamedTuple):
    """What a cached session may be reused for."""
    domain: str             # the recipients' domain: its TLS rules accepted the session
    hop: object             # resolver.Hop (compared by address and port)
    level: str              # the TLS level the transaction asked for (tlsmemory)


class CachedSession(NamedTuple):
    """An open connection after a finished transaction, and what its EHLO said."""
    client: object          # smtpclient.SmtpClient
    extensions: dict        # from the last EHLO
    reached: str            # the TLS level the connection has (tlsmemory)
    opened: float           # time.monotonic() of the connect
    idle_since: float = 0.0


class ConnectionCache:
    def __init__(self, log, idle_limit=IDLE_LIMIT, age_limit=AGE_LIMIT):
        self.log = log
        self.idle_limit = idle_limit
        self.age_limit = age_limit
        self._idle = {}                     # CacheKey -> [CachedSession], newest last
        self._changed = threading.Condition()
        self._closed = False
        self._reaper = None

    def take(self, key):
        """The newest idle session for `key`, now the caller's alone; None if there is
        none. An expired one found on the way is closed."""
        expired, found = [], None
        with self._changed:
            sessions = self._idle.get(key, [])
            now = time.monotonic()
            while sessions and found is None:
                session = sessions.pop()
                if self._expired(session, now):
                    expired.append(session)
                else:
                    found = session
            if not sessions:
                self._idle.pop(key, None)
        self._quit_all(expired)
        return found

    def give_back(self, key, session):
        """Keep `session` for the next transaction of `key` (or QUIT it when the cache is
        closed, full for that key, or the session too old)."""
        now = time.monotonic()
        with self._changed:
            sessions = self._idle.setdefault(key, [])
            keep = not self._closed and len(sessions) < MAX_IDLE_PER_KEY \
                and now - session.opened < self.age_limit
            if keep:
                # The reaper is not woken: it wakes at the latest when the idle limit has
                # passed since its last look, before this session can have expired
                sessions.append(session._replace(idle_since=now))
                self._start_reaper()
            elif not sessions:
                del self._idle[key]
        if not keep:
            self._quit_all([session])

    def idle_keys(self):
        """The keys with an idle session."""
        with self._changed:
            return list(self._idle)

    def idle_count(self):
        with self._changed:
            return sum(len(sessions) for sessions in self._idle.values())

    def close(self):
        """QUIT every idle session; give_back QUITs from now on."""
        with self._changed:
            self._closed = True
            sessions = [session for group in self._idle.values() for session in group]
            self._idle.clear()
            self._changed.notify_all()
        self._quit_all(sessions)

    # the reaper

    def _expired(self, session, now):
        return now - session.idle_since >= self.idle_limit or \
            now - session.opened >= self.age_limit

    def _start_reaper(self):
        """Called with the lock held."""
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name="relay-connections",
                                            daemon=True)
            self._reaper.start()

    def _reap(self):
        while True:
            with self._changed:
                if self._closed:
                    return
                expired = self._take_expired(time.monotonic())
                if not expired:
                    self._changed.wait(self._next_expiry(time.monotonic()))
            self._quit_all(expired)

    def _take_expired(self, now):
        expired = []
        for key in list(self._idle):
            kept = [session for session in self._idle[key] if not self._expired(session, now)]
            expired += [session for session in self._idle[key] if self._expired(session, now)]
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        return expired

    def _next_expiry(self, now):
        """Seconds until the first idle session expires (the idle limit when none is)."""
        times = [min(session.idle_since + self.idle_limit, session.opened + self.age_limit)
                 for group in self._idle.values() for session in group]
        return max(0.01, min(times) - now) if times else self.idle_limit

    @staticmethod
    def _quit_all(sessions):
        """RFC 5321 4.1.1.10: QUIT, then close; a remote that does not answer is dropped."""
        for session in sessions:
            try:
                session.client.command("QUIT", QUIT_TIMEOUT)
            except Exception:           # the session is going away whatever went wrong
                pass
            session.client.close()


# ---------------------------------------------------------------------------------------
# RSET before a transaction on a reused session (RFC 5321 4.1.1.5)


def reset(session):
    """None when the taken `session` may carry a transaction: RSET answered 250, or, to a
    host offering PIPELINING, RSET is left to go out with MAIL (send_after_reset). Else
    why not; the caller closes it."""
    if "PIPELINING" in session.extensions:
        return None
    try:
        answer = session.client.command("RSET")
    except (DeliveryError, OSError) as error:
        return str(getattr(error, "reply", "") or error)
    return None if answer.code == 250 else answer.text


def send_after_reset(client, lines, timeout):
    """Send `lines` (RSET first) on a reused connection and read the reply to RSET: a
    connection that fails here or does not answer 250 is stale (StaleConnection)."""
    try:
        client.send_lines(lines)
        answer = client.reply(timeout)
    except (DeliveryError, OSError) as error:
        raise StaleConnection(str(getattr(error, "reply", "") or error)) from None
    if answer.code != 250:
        raise StaleConnection(answer.text)
