"""The users file: the local mailboxes and their password hashes, re-read when it changes.

    alice                  a mailbox in every local domain
    bob@test.ru            a mailbox in that domain only
    carol:scrypt$...       with a password for AUTH (python smtpd.py --add-user)
"""
import os
import threading
import time
import unicodedata

import durable
import passwords
from address import AddressError, domain_name
from storage import is_safe_name


class UsersFileError(Exception):
    """The users file cannot be read, or a line in it is not a mailbox name."""


UNUSABLE_HASH = passwords.hash_password(os.urandom(16).hex())


class Users:
    """The mailboxes in the users file, re-read when the file changes.

    A line is `name` (a mailbox in every local domain) or `name@domain` (in that domain
    only), optionally followed by `:password-hash`. `#` starts a comment.
    """

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._mtime = None
        self._entries = {}
        self._watch = WatchedFile(path)
        self.reload()

    def reload(self):
        entries, mtime = read_users_file(self.path)
        with self._lock:
            self._entries, self._mtime = entries, mtime

    def _refresh(self):
        if self._watch.new_mtime(self._mtime) is None:
            return
        try:
            self.reload()
        except UsersFileError:
            pass                            # keep the last good list while the file is edited

    def has_mailbox(self, local_part, domain):
        self._refresh()
        local_part = mailbox_key(local_part)
        return f"{local_part}@{domain.lower()}" in self._entries or local_part in self._entries

    def password_hash(self, login):
        """The stored hash for `name@domain` or `name`, or None."""
        self._refresh()
        return self._entries.get(mailbox_key(login))

    def check_password(self, login, password):
        """AUTH: `login` is `name@domain` (or a bare `name` entry's `name`)."""
        login = mailbox_key(login) or ""
        stored = self.password_hash(login)
        if stored is None and "@" in login:
            stored = self.password_hash(login.partition("@")[0])
        # an unknown login costs a hash too, so timing does not tell which logins exist
        matches = passwords.verify_password(stored or UNUSABLE_HASH, password)
        return matches and stored is not None


class WatchedFile:
    """A file looked at again at most once a second, to see whether it has changed."""

    def __init__(self, path):
        self.path = path
        self._checked = 0.0

    def new_mtime(self, *known):
        """The file's mtime if it is none of `known` and a second has passed; else None."""
        now = time.monotonic()
        if now - self._checked < 1.0:
            return None
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            return None
        return None if mtime in known else mtime


def read_users_file(path):
    """{name or name@domain: hash or None}, and the file's mtime."""
    entries = {}
    try:
        with open(path, encoding="utf-8") as users_file:
            mtime = os.fstat(users_file.fileno()).st_mtime_ns
            lines = users_file.read().splitlines()
    except FileNotFoundError:
        raise UsersFileError(f"users file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise UsersFileError(f"users file {path}: {reason}") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, password_hash = line.partition(":")
        key = mailbox_key(name)
        if key is None:
            raise UsersFileError(f"users file {path} line {number}: bad mailbox name "
                                 f"{name.strip()!r}")
        entries[key] = password_hash.strip() or None
    return entries, mtime


def mailbox_key(name):
    """`Name` or `name@domain` as the users file is looked up: the local part in NFC and
    lower case (RFC 6532 3.1), the domain as A-labels (so bücher.test = xn--bcher-kva.test).
    None if it cannot be a mailbox (see storage.is_safe_name)."""
    local_part, at, domain = name.strip().rpartition("@") if "@" in name else \
        (name.strip(), "", "")
    local_part = unicodedata.normalize("NFC", local_part).lower()
    if at:
        try:
            domain = domain_name(domain)
        except AddressError:
            return None
    if not is_safe_name(local_part) or (at and not is_safe_name(domain)):
        return None
    return f"{local_part}@{domain}" if at else local_part


def add_user(path, login, password_hash):
    """Add or replace `login:hash` in the users file, atomically. True if it replaced one."""
    try:
        with open(path, encoding="utf-8") as users_file:
            lines = users_file.read().splitlines()
    except FileNotFoundError:
        lines = []
    login = mailbox_key(login)
    kept = [line for line in lines
            if mailbox_key(line.split("#", 1)[0].partition(":")[0]) != login]
    replaced = len(kept) < len(lines)
    kept.append(f"{login}:{password_hash}")
    durable.write_file(path, ("\n".join(kept) + "\n").encode("utf-8"), replace=True, mode=0o644)
    return replaced
