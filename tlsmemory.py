"""What TLS each domain's mail exchangers have shown before, so that it is never given up.

    memory = TlsMemory(spool_directory, log)             # log: where the ERRORs go (or None)
    memory.level("remote.test")                          # "plain", "tls" or "verified"
    memory.record("remote.test", VERIFIED)               # after mail went over verified TLS
    memory.entries()                                     # [Entry(domain, level, since)]

Like chasquid's "STS-like" domain TLS memory: once a domain has taken mail over TLS (and
better, over TLS with a certificate valid for the MX name), a later delivery that would be
less is refused by the relay with a 4xx and tried again later, so that an attacker on the
path who strips STARTTLS or offers a certificate of their own gets nothing but a delay.
The level only ever rises; it is kept in <spool>/tls-domains.json, replaced durably at each
rise. A missing file is an empty memory. A file that does not parse is never overwritten:
it is moved aside to tls-domains.json.damaged-<epoch> (durably), an ERROR names both
paths, and a fresh memory starts. A file that cannot be read (permissions, a disk error)
is left as it is: each decision made without it is an ERROR (at most one a minute) and no
rise is written until it can be read again. `problem` says what is wrong, when something is.
"""
import json
import os
import threading
import time
from typing import NamedTuple

import durable

FILE_NAME = "tls-domains.json"
PLAIN, TLS, VERIFIED = "plain", "tls", "verified"
LEVELS = (PLAIN, TLS, VERIFIED)         # worst to best
WHAT_LEVEL_MEANS = {PLAIN: "clear text", TLS: "TLS", VERIFIED: "verified TLS"}
DAMAGED_SUFFIX = ".damaged-"            # then the epoch seconds of the move
MAX_ASIDE_NAMES = 100                   # damaged copies moved aside within one second
REPORT_INTERVAL = 60                    # seconds between ERRORs about an unreadable file


def rank(level):
    """A level's place, worst first: levels compare by it."""
    return LEVELS.index(level)


class Entry(NamedTuple):
    """One domain's best security so far, and since when (epoch seconds)."""
    domain: str
    level: str
    since: float


class TlsMemory:
    def __init__(self, spool_directory, log=None, clock=time.monotonic):
        self.path = os.path.join(spool_directory, FILE_NAME)
        self.log = log
        self.problem = ""               # why the file could not be read, when it could not
        self._clock = clock
        self._reported_at = None        # when the last ERROR about an unreadable file went
        self._lock = threading.Lock()

    def level(self, domain):
        """The best level `domain` has shown; PLAIN for a domain never seen."""
        with self._lock:
            entry = (self._load() or {}).get(domain.lower())
        return entry.level if entry else PLAIN

    def record(self, domain, level, now=None):
        """Remember that `domain` took mail at `level`; True when that is a rise (False too
        when the file cannot be read: it is not overwritten)."""
        domain = domain.lower()
        with self._lock:
            entries = self._load()
            if entries is None:
                return False
            known = entries.get(domain)
            if known is not None and rank(known.level) >= rank(level):
                return False
            entries[domain] = Entry(domain, level, time.time() if now is None else now)
            self._save(entries)
            return True

    def entries(self):
        """Every remembered domain, by name."""
        with self._lock:
            return sorted((self._load() or {}).values())

    def _load(self):
        """The entries by domain; None when a file is there that must not be overwritten."""
        try:
            with open(self.path, "rb") as memory_file:
                identity = _identity(os.fstat(memory_file.fileno()))
                content = memory_file.read()
        except FileNotFoundError:
            self.problem = ""
            return {}
        except OSError as error:
            self._cannot_read(f"{self.path}: {error}")
            return None
        try:
            entries = _parse(content)
        except ValueError as error:
            return self._set_aside(identity, f"{self.path}: {error}")
        self.problem = ""
        self._reported_at = None        # the next trouble is reported at once
        return entries

    def _cannot_read(self, reason):
        self.problem = reason
        now = self._clock()
        if self._reported_at is not None and now - self._reported_at < REPORT_INTERVAL:
            return
        self._reported_at = now
        if self.log is not None:
            self.log.error("TLS memory cannot be read (%s): deciding without it, and it is "
                           "not written, until it can be read", reason)

    def _set_aside(self, identity, reason):
        """A file that does not parse, moved out of the way: {} (a fresh memory), or None
        when it could not be moved."""
        try:
            aside = _move_aside(self.path, identity)
        except OSError as error:
            self._cannot_read(f"{reason}; cannot move it aside: {error}")
            return None
        if aside is None:
            self.problem = f"{reason}; it changed while it was read: read again next time"
            return None
        self.problem = f"{reason}; moved aside to {aside}"
        if self.log is not None:
            self.log.error("TLS memory %s is damaged (%s): moved aside to %s; a fresh memory "
                           "starts (every domain's TLS level so far is forgotten)", self.path,
                           reason, aside)
        return {}

    def _save(self, entries):
        content = {entry.domain: {"level": entry.level, "since": entry.since}
                   for entry in entries.values()}
        durable.write_file(self.path, json.dumps(content, indent=1, sort_keys=True).encode(),
                           replace=True)


def _parse(content):
    """The file's entries by domain; ValueError when it is not exactly what _save writes."""
    try:
        data = json.loads(content.decode("utf-8"))
        entries = {}
        for domain, fields in data.items():
            if fields["level"] not in LEVELS:
                raise ValueError(f"level {fields['level']!r} for {domain}")
            entries[domain] = Entry(domain, fields["level"], float(fields["since"]))
        return entries
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"not a TLS memory: {type(error).__name__} {error}") from None


def _identity(status):
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _move_aside(path, identity):
    """Give the file at `path` the first free name `<path>.damaged-<epoch>[.n]` and make
    that durable; the new name, or None when `path` is no longer the file that was read."""
    stamp = int(time.time())
    for attempt in range(MAX_ASIDE_NAMES):
        aside = f"{path}{DAMAGED_SUFFIX}{stamp}" + (f".{attempt}" if attempt else "")
        if _identity(os.stat(path)) != identity:
            return None
        try:
            os.link(path, aside)            # never over an earlier damaged copy
        except FileExistsError:
            continue
        os.unlink(path)
        durable.fsync_directory(os.path.dirname(path) or ".")
        return aside
    raise FileExistsError(f"{path}{DAMAGED_SUFFIX}{stamp} and {MAX_ASIDE_NAMES - 1} more "
                          "are taken")
