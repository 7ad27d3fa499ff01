"""The users file: the local mailboxes and their password hashes, re-read when it changes.

    alice                  a mailbox in every local domain
    bob@test.ru            a mailbox in that domain only
    carol:scrypt$...       with a password for AUTH (python smtpd.py --add-user)
"""
import os
import threading
import time

import durable
import passwords
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
        self._checked = 0.0
        self.reload()

    def reload(self):
        entries, mtime = read_users_file(self.path)
        with self._lock:
            self._entries, self._mtime = entries, mtime

    def _refresh(self):
        now = time.monotonic()
        if now - self._checked < 1.0:       # look at the file at most once a second
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            return
        if mtime != self._mtime:
            try:
                self.reload()
            except UsersFileError:
                pass                        # keep the last good list while the file is edited

    def has_mailbox(self, local_part, domain):
        self._refresh()
        local_part, domain = local_part.lower(), domain.lower()
        return f"{local_part}@{domain}" in self._entries or local_part in self._entries

    def password_hash(self, login):
        """The stored hash for `name@domain` or `name`, or None."""
        self._refresh()
        return self._entries.get(login.lower())

    def check_password(self, login, password):
        """AUTH: `login` is `name@domain` (or a bare `name` entry's `name`)."""
        login = login.lower()
        stored = self.password_hash(login)
        if stored is None and "@" in login:
            stored = self.password_hash(login.partition("@")[0])
        # an unknown login costs a hash too, so timing does not tell which logins exist
        matches = passwords.verify_password(stored or UNUSABLE_HASH, password)
        return matches and stored is not None


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
        name = name.strip().lower()
        local_part, _, domain = name.partition("@")
        if not is_safe_name(local_part) or (domain and not is_safe_name(domain)):
            raise UsersFileError(f"users file {path} line {number}: bad mailbox name {name!r}")
        entries[name] = password_hash.strip() or None
    return entries, mtime


def add_user(path, login, password_hash):
    """Add or replace `login:hash` in the users file, atomically."""
    try:
        with open(path, encoding="utf-8") as users_file:
            lines = users_file.read().splitlines()
    except FileNotFoundError:
        lines = []
    kept = [line for line in lines
            if line.split("#", 1)[0].partition(":")[0].strip().lower() != login.lower()]
    kept.append(f"{login.lower()}:{password_hash}")
    durable.write_file(path, ("\n".join(kept) + "\n").encode("utf-8"), replace=True, mode=0o644)
