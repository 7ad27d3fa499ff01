"""The disk: the users file, Maildir delivery, and the spool (the relay's queue).

Every write that the server answers 250 for is durable first (RFC 5321 6.1): written to a
temporary name, fsynced, renamed or linked into place, and the directory fsynced.

Maildir (https://cr.yp.to/proto/maildir.html): <maildir>/<domain>/<user>/{tmp,new,cur}/.
A message for several local users is written once and hard-linked into each `new/`.

Spool: one file per accepted transaction with remote recipients, `<spool>/<port>-<id>.smtp`,
holding the transaction as the SMTP commands the relay replays (see README, "The spool").
Beside it the relay keeps `<port>-<id>.state`, each recipient's delivery state as JSON.
"""
import fcntl
import itertools
import json
import os
import socket
import threading
import time
from typing import NamedTuple

import passwords

# Maildir names count deliveries per process, whatever Storage object makes them
_DELIVERIES = itertools.count(1)
_PID = os.getpid()

SPOOL_SUFFIX = ".smtp"
STATE_SUFFIX = ".state"


class StorageError(Exception):
    """A name that must not reach the disk, or a file that is not what it should be."""


# ---------------------------------------------------------------------------------------
# Users


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
            except StorageError:
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
        raise StorageError(f"users file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise StorageError(f"users file {path}: {error}") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, password_hash = line.partition(":")
        name = name.strip().lower()
        local_part, _, domain = name.partition("@")
        if not is_safe_name(local_part) or (domain and not is_safe_name(domain)):
            raise StorageError(f"users file {path} line {number}: bad mailbox name {name!r}")
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
    _write_durably(path, ("\n".join(kept) + "\n").encode("utf-8"), replace=True)


def is_safe_name(name):
    """A local part or domain that can be a directory name: no path tricks, no control bytes."""
    return (bool(name) and len(name.encode()) <= 255 and not name.startswith(".")
            and "/" not in name and "\\" not in name
            and all(" " < c < "\x7f" for c in name))


# ---------------------------------------------------------------------------------------
# Durable writes


def _write_durably(path, content, replace=False):
    """Write `content` to `path` and fsync it. A new file is never half-written under its
    name: with replace=True it is written beside and renamed over the old one."""
    target = path
    if replace:
        path = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(descriptor, view):]
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        os.unlink(path)
        raise
    os.close(descriptor)
    if replace:
        _keep_owner_and_mode(target, path)
        os.replace(path, target)
        fsync_directory(os.path.dirname(target) or ".")


def _keep_owner_and_mode(old, new):
    """A replaced file (the users file, edited by root with --add-user) stays readable by
    whoever could read the old one."""
    try:
        info = os.stat(old)
    except FileNotFoundError:
        return
    os.chmod(new, info.st_mode & 0o7777)
    if os.geteuid() == 0:
        os.chown(new, info.st_uid, info.st_gid)


def fsync_directory(path):
    """Make a rename or link in `path` durable."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _make_directories(path):
    """mkdir -p, fsyncing each parent that gains an entry, so the new tree survives a crash."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    _make_directories(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    fsync_directory(parent)


# ---------------------------------------------------------------------------------------
# The store: Maildir for local recipients, the spool for remote ones


class Storage:
    def __init__(self, maildir, spool):
        self.maildir = maildir
        self.spool = spool
        self._made = set()                  # Maildir folders known to exist
        self._host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
        for directory in (maildir, spool, os.path.join(spool, "tmp")):
            _make_directories(directory)

    def deliver(self, envelope, message):
        """Store one accepted message durably: a Maildir copy for each local recipient and one
        spool file for the remote ones. Returns the spool name, or None if all were local.
        If anything fails, nothing is left behind under a final name."""
        staged = self._stage_spool(envelope, message) if envelope["remote"] else None
        try:
            if envelope["local"]:
                self.deliver_local(envelope["local"], envelope["reverse_path"], message)
        except BaseException:
            if staged:
                os.unlink(staged[0])
            raise
        if not staged:
            return None
        temporary, name = staged
        os.rename(temporary, self.spool_path(name))
        fsync_directory(self.spool)
        return name

    # Maildir

    def deliver_local(self, recipients, reverse_path, message):
        """One durable copy in `new/` of each recipient's Maildir (`user@domain` strings)."""
        folders = list(dict.fromkeys(self.mailbox_folder(address) for address in recipients))
        for folder in folders:
            self._make_maildir(folder)
        unique = self._unique_name()
        temporary = os.path.join(folders[0], "tmp", unique)
        # RFC 5321 4.4: the final delivery adds Return-Path with the reverse path
        _write_durably(temporary, b"Return-Path: <%s>\r\n" % reverse_path.encode() + message)
        if len(folders) == 1:               # the common case: one rename, as Maildir intends
            try:
                os.rename(temporary, os.path.join(folders[0], "new", unique))
            except BaseException:
                os.unlink(temporary)
                raise
        else:
            self._link_into(temporary, folders, unique)
        for folder in folders:
            fsync_directory(os.path.join(folder, "new"))

    @staticmethod
    def _link_into(temporary, folders, unique):
        """The same file in each folder's new/ (hard links), then the temporary name gone."""
        linked = []
        try:
            for folder in folders:
                final = os.path.join(folder, "new", unique)
                os.link(temporary, final)
                linked.append(final)
        except BaseException:
            for final in linked:
                os.unlink(final)
            raise
        finally:
            os.unlink(temporary)

    def mailbox_folder(self, address):
        """<maildir>/<domain>/<user>, refusing any name that could leave the tree."""
        local_part, _, domain = address.lower().rpartition("@")
        if not is_safe_name(local_part) or not is_safe_name(domain):
            raise StorageError(f"refusing unsafe mailbox name {address!r}")
        return os.path.join(self.maildir, domain, local_part)

    def _make_maildir(self, folder):
        if folder in self._made:
            return
        for sub in ("tmp", "new", "cur"):
            _make_directories(os.path.join(folder, sub))
        self._made.add(folder)

    def _unique_name(self):
        """time.M<usec>P<pid>Q<n>.host, unique per the Maildir spec."""
        now = time.time()
        return (f"{int(now)}.M{int(now % 1 * 1e6)}P{_PID}"
                f"Q{next(_DELIVERIES)}.{self._host}")

    # Spool

    def spool_path(self, name):
        return os.path.join(self.spool, name + SPOOL_SUFFIX)

    def state_path(self, name):
        return os.path.join(self.spool, name + STATE_SUFFIX)

    def _stage_spool(self, envelope, message):
        name = f"{envelope['client_port']}-{envelope['queue_id']}"
        temporary = os.path.join(self.spool, "tmp", name + SPOOL_SUFFIX)
        _write_durably(temporary, spool_text(envelope, message))
        return temporary, name

    def spooled_names(self):
        """The names of all spool files, oldest first."""
        names = []
        for entry in os.scandir(self.spool):
            if entry.is_file() and entry.name.endswith(SPOOL_SUFFIX):
                names.append((entry.stat().st_mtime, entry.name[:-len(SPOOL_SUFFIX)]))
        return [name for _, name in sorted(names)]

    def read_spooled(self, name):
        path = self.spool_path(name)
        with open(path, "rb") as spool_file:
            content = spool_file.read()
            created = os.fstat(spool_file.fileno()).st_mtime
        return parse_spool(name, content, created)

    def read_state(self, name):
        try:
            with open(self.state_path(name), encoding="utf-8") as state_file:
                return json.load(state_file)
        except FileNotFoundError:
            return None
        except ValueError as error:
            raise StorageError(f"{self.state_path(name)}: {error}") from None

    def write_state(self, name, state):
        content = json.dumps(state, indent=1, sort_keys=True).encode()
        _write_durably(self.state_path(name), content, replace=True)

    def remove_spooled(self, name):
        # The spool file first: a crash between the two leaves a stray state file, never
        # a message without its record of who already has it.
        for path in (self.spool_path(name), self.state_path(name)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        fsync_directory(self.spool)

    def lock_spool(self):
        """Take the spool's lock (one queue runner per spool). Returns the open lock file,
        or None with the holder's pid readable by `spool_owner()`."""
        lock_file = open(os.path.join(self.spool, ".lock"), "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            return None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        return lock_file

    def spool_owner(self):
        """The pid of the process holding the spool lock, or None."""
        try:
            with open(os.path.join(self.spool, ".lock")) as lock_file:
                return int(lock_file.read().strip() or 0) or None
        except (OSError, ValueError):
            return None


class Spooled(NamedTuple):
    """A spool file read back: what the relay needs to replay the transaction."""
    name: str
    helo: str
    reverse_path: str
    body_8bit: bool
    recipients: list
    data: bytes             # the message, dot-stuffed, ending with CRLF (without ".")
    created: float          # when it was accepted (the file's mtime)

    @property
    def queue_id(self):
        return self.name.partition("-")[2]

    @property
    def size(self):
        return len(self.data)


def spool_text(envelope, message):
    """The transaction as the commands a client would send (RFC 5321 3.3), CRLF-terminated."""
    body = " BODY=8BITMIME" if _body_parameter(envelope) == "8BITMIME" else ""
    commands = [f"EHLO {envelope['helo']}", f"MAIL FROM:<{envelope['reverse_path']}>{body}"]
    commands += [f"RCPT TO:<{address}>" for address in envelope["remote"]]
    commands.append("DATA")
    head = "".join(command + "\r\n" for command in commands).encode("ascii")
    return head + dot_stuff(message) + b".\r\nQUIT\r\n"


def _body_parameter(envelope):
    return (envelope["mail_parameters"].get("BODY") or "").upper()


def dot_stuff(message):
    """RFC 5321 4.5.2: transparency. A line that starts with a period gets one more."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..")


def parse_spool(name, content, created):
    """A spool file's bytes -> Spooled; StorageError for anything that is not one whole
    transaction (a damaged file must not stop the queue runner)."""
    broken = StorageError(f"spool file {name}: not a complete transaction")
    head, separator, rest = content.partition(b"\r\nDATA\r\n")
    if not separator or not rest.endswith(b".\r\nQUIT\r\n"):
        raise broken
    try:
        commands = head.decode("ascii").split("\r\n")
    except UnicodeDecodeError:
        raise broken from None
    if len(commands) < 3 or not commands[0].startswith("EHLO "):
        raise broken
    mail_line, rcpt_lines = commands[1], commands[2:]
    if not mail_line.startswith("MAIL FROM:<") or ">" not in mail_line \
            or not all(line.startswith("RCPT TO:<") and line.endswith(">") for line in rcpt_lines):
        raise broken
    reverse_path = mail_line[len("MAIL FROM:<"):mail_line.rindex(">")]
    recipients = [line[len("RCPT TO:<"):-1] for line in rcpt_lines]
    return Spooled(name, commands[0][len("EHLO "):], reverse_path,
                   mail_line.endswith(" BODY=8BITMIME"), recipients,
                   rest[:-len(b".\r\nQUIT\r\n")], created)
