"""What TLS each domain's mail exchangers have shown before, so that it is never given up.

    memory = TlsMemory(spool_directory)
    memory.level("remote.test")                          # "plain", "tls" or "verified"
    memory.record("remote.test", VERIFIED)               # after mail went over verified TLS
    memory.entries()                                     # [Entry(domain, level, since)]

Like chasquid's "STS-like" domain TLS memory: once a domain has taken mail over TLS (and
better, over TLS with a certificate valid for the MX name), a later delivery that would be
less is refused by the relay with a 4xx and tried again later, so that an attacker on the
path who strips STARTTLS or offers a certificate of their own gets nothing but a delay.
The level only ever rises; it is kept in <spool>/tls-domains.json, replaced durably at each
rise. A missing or damaged file is an empty memory (the damage is reported by `problem`).
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


def rank(level):
    """A level's place, worst first: levels compare by it."""
    return LEVELS.index(level)


class Entry(NamedTuple):
    """One domain's best security so far, and since when (epoch seconds)."""
    domain: str
    level: str
    since: float


class TlsMemory:
    def __init__(self, spool_directory):
        self.path = os.path.join(spool_directory, FILE_NAME)
        self.problem = ""               # why the file could not be read, when it could not
        self._lock = threading.Lock()

    def level(self, domain):
        """The best level `domain` has shown; PLAIN for a domain never seen."""
        entry = self._load().get(domain.lower())
        return entry.level if entry else PLAIN

    def record(self, domain, level, now=None):
        """Remember that `domain` took mail at `level`; True when that is a rise."""
        domain = domain.lower()
        with self._lock:
            entries = self._load()
            known = entries.get(domain)
            if known is not None and rank(known.level) >= rank(level):
                return False
            entries[domain] = Entry(domain, level, time.time() if now is None else now)
            self._save(entries)
            return True

    def entries(self):
        """Every remembered domain, by name."""
        return sorted(self._load().values())

    def _load(self):
        try:
            with open(self.path, encoding="utf-8") as memory_file:
                data = json.load(memory_file)
            entries = {}
            for domain, fields in data.items():
                if fields["level"] not in LEVELS:
                    raise ValueError(f"level {fields['level']!r} for {domain}")
                entries[domain] = Entry(domain, fields["level"], float(fields["since"]))
            self.problem = ""
            return entries
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            self.problem = f"{self.path}: {error}"
            return {}

    def _save(self, entries):
        content = {entry.domain: {"level": entry.level, "since": entry.since}
                   for entry in entries.values()}
        durable.write_file(self.path, json.dumps(content, indent=1, sort_keys=True).encode(),
                           replace=True)
