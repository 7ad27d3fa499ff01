"""The aliases file: other names for local mailboxes, forwarding, and catch-alls.

    # name: target, target, ...      a name with no domain applies to every local domain
    postmaster: alice
    team@test.ru: alice, bob
    carol: carol@remote.test          # forwarding to another domain
    *@example.test: alice             # catch-all for one local domain

A target is a local name, `name@local-domain`, or any remote address. This module reads the
file and refuses one that cannot work (a syntax error, a loop, a chain deeper than
MAX_DEPTH); what a name leads to is resolved by routing.Router, which also knows the users.
"""
import os
import threading
import unicodedata
from typing import NamedTuple

from address import Address, AddressError, domain_name
from users import WatchedFile, mailbox_key

MAX_DEPTH = 10                  # aliases of aliases, this deep at most


class AliasError(Exception):
    """An aliases file that cannot be used; the message names the file and the problem."""


class Entry(NamedTuple):
    targets: tuple              # Address, or a bare local name (str) resolved in the domain
    line: int


class AliasFile(NamedTuple):
    entries: dict               # "name", "name@domain" or "*@domain" -> Entry
    mtime: int


def read_aliases(path, local_domains):
    """The file's entries; AliasError for a syntax error, a name outside the local domains,
    a loop or a chain deeper than MAX_DEPTH."""
    try:
        with open(path, encoding="utf-8") as alias_file:
            mtime = os.fstat(alias_file.fileno()).st_mtime_ns
            lines = alias_file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise AliasError(f"aliases file {path}: {reason}") from None
    entries = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, colon, targets = line.partition(":")
        key = _alias_key(name.strip(), local_domains)
        if not colon or key is None:
            raise AliasError(f"aliases file {path} line {number}: not `name: target, ...` "
                             f"with a name in a local domain")
        parsed = tuple(_target(text.strip()) for text in targets.split(",") if text.strip())
        if None in parsed or not parsed:
            raise AliasError(f"aliases file {path} line {number}: a target is not a name "
                             f"or an address")
        entries[key] = Entry(parsed, number)
    check_chains(entries, local_domains, path)
    return AliasFile(entries, mtime)


def _alias_key(name, local_domains):
    """`name`, `name@domain` or `*@domain` (domain local), normalised; None if it is not."""
    if name.startswith("*@"):
        try:
            domain = domain_name(name[2:])
        except AddressError:
            return None
        return f"*@{domain}" if domain in local_domains else None
    key = mailbox_key(name)
    if key is None or ("@" in key and key.partition("@")[2] not in local_domains):
        return None
    return key


def _target(text):
    if "@" not in text:
        key = mailbox_key(text)
        return key                      # a bare local name, or None
    try:
        return Address.parse(text)
    except AddressError:
        return None


def lookup_key(entries, local_part, domain):
    """The entry of `local_part@domain` (exact first, then the bare name), or None."""
    name = unicodedata.normalize("NFC", local_part).lower()
    return entries.get(f"{name}@{domain}") or entries.get(name)


def check_chains(entries, local_domains, path="aliases"):
    """RFC 5321 3.9.2: an alias list must end somewhere. Refuse a loop or a chain deeper than
    MAX_DEPTH, naming it."""
    for domain in local_domains:
        for key in entries:
            if key.startswith("*@") or ("@" in key and not key.endswith("@" + domain)):
                continue
            _walk(entries, local_domains, domain, key.partition("@")[0], [], path)


def _walk(entries, local_domains, domain, name, chain, path):
    here = f"{name}@{domain}"
    if here in chain:
        loop = " -> ".join(chain[chain.index(here):] + [here])
        raise AliasError(f"aliases file {path}: a loop: {loop}")
    if len(chain) >= MAX_DEPTH:
        raise AliasError(f"aliases file {path}: deeper than {MAX_DEPTH}: "
                         f"{' -> '.join(chain + [here])}")
    entry = lookup_key(entries, name, domain)
    if entry is None:
        return
    for target in entry.targets:
        if isinstance(target, str):
            _walk(entries, local_domains, domain, target, chain + [here], path)
        elif target.domain in local_domains:
            _walk(entries, local_domains, target.domain, target.local_part, chain + [here],
                  path)


class Aliases:
    """The aliases file in force, re-read when it changes; a file that cannot be used is
    logged once and the previous one stays in force (as with the users file)."""

    def __init__(self, path, local_domains, log):
        self.path = path
        self.local_domains = tuple(local_domains)
        self.log = log
        self._lock = threading.Lock()
        self._file = AliasFile({}, None)
        self._watch = WatchedFile(path)
        self._refused_mtime = None
        if path:
            self._file = read_aliases(path, self.local_domains)

    @property
    def entries(self):
        self._refresh()
        return self._file.entries

    def _refresh(self):
        mtime = self._watch.new_mtime(self._file.mtime, self._refused_mtime) \
            if self.path else None
        if mtime is None:
            return
        try:
            loaded = read_aliases(self.path, self.local_domains)
        except AliasError as problem:
            self._refused_mtime = mtime
            self.log.error("%s; the previous aliases stay in force", problem)
            return
        with self._lock:
            self._file = loaded
        self.log.info("aliases file %s read again: %d aliases", self.path, len(loaded.entries))
