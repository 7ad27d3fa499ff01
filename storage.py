"""The disk: Maildir folders for local recipients, and the draft that writes a message to
its files while it arrives.

Maildir (https://cr.yp.to/proto/maildir.html): <maildir>/<domain>/<user>/{tmp,new,cur}/.
A message file is written in tmp/, fsynced, and renamed into new/; a message for several
local users is written once and hard-linked into each new/. Files have LF line ends, as
qmail, Postfix and Dovecot write them (the wire and the spool keep CRLF).

Every write that the server answers 250 for is durable first (RFC 5321 6.1; durable.py).
"""
import itertools
import os
import socket
import time
import unicodedata

import durable
import spool as spool_format

# Maildir names count deliveries per process, whatever Draft makes them
_DELIVERIES = itertools.count(1)
STALE_AFTER = 86400             # the Maildir rule: a file in tmp/ this old is a leftover


class StorageError(Exception):
    """A message that could not be stored. `full`: the disk (or quota) is full."""

    def __init__(self, problem, full=False):
        super().__init__(problem)
        self.full = full

    @classmethod
    def from_os_error(cls, error, what):
        return cls(f"{what}: {error.strerror or error}", full=error.errno in durable.FULL)


def is_safe_name(name):
    """A local part or domain that can be a directory name: no path tricks, no control or
    space characters (of any script: a UTF-8 name from SMTPUTF8 is a name like any other)."""
    return (bool(name) and len(name.encode()) <= 255 and not name.startswith(".")
            and "/" not in name and "\\" not in name
            and all(" " < c < "\x7f" if c.isascii() else unicodedata.category(c)[0] not in "CZ"
                    for c in name))


class Maildir:
    """The tree of Maildir folders: <root>/<domain>/<local part>/{tmp,new,cur}."""

    def __init__(self, root):
        self.root = root
        self._known = set()             # folders known to exist (rechecked when one is gone)
        self._host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")

    def prepare(self):
        """Create the root if it is missing; return the directories created."""
        return durable.make_directories(self.root)

    def folder(self, mailbox):
        """<root>/<domain>/<local part> of an Address, refusing any name that could leave
        the tree."""
        local_part, domain = mailbox.local_part.lower(), mailbox.domain.lower()
        if not is_safe_name(local_part) or not is_safe_name(domain):
            raise StorageError(f"refusing unsafe mailbox name {mailbox.text!r}")
        return os.path.join(self.root, domain, local_part)

    def make(self, folder, again=False):
        """Make sure tmp/, new/ and cur/ exist; `again` after one of them was found gone."""
        if folder in self._known and not again:
            return
        for sub in ("tmp", "new", "cur"):
            durable.make_directories(os.path.join(folder, sub))
        self._known.add(folder)

    def unique_name(self):
        """time.M<usec>P<pid>Q<n>.host, unique per the Maildir spec."""
        now = time.time()
        return (f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}"
                f"Q{next(_DELIVERIES)}.{self._host}")

    def remove_stale(self, now=None):
        """Files older than a day in every tmp/ (what a crash mid-delivery leaves).
        Returns the paths removed."""
        cutoff = (now or time.time()) - STALE_AFTER
        removed = []
        for tmp in self._tmp_folders():
            for entry in _entries(tmp):
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed.append(entry.path)
                except FileNotFoundError:
                    continue
        return removed

    def _tmp_folders(self):
        for domain in _entries(self.root):
            if domain.is_dir(follow_symlinks=False):
                for user in _entries(domain.path):
                    if user.is_dir(follow_symlinks=False):
                        yield os.path.join(user.path, "tmp")


def _entries(path):
    try:
        return list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _lf(text):
    return text.replace(b"\r\n", b"\n")


def _dot_stuffed(text):
    """RFC 5321 4.5.2: transparency. Whole lines in, a period added before each leading one."""
    stuffed = text.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


class Draft:
    """One message being written to its files as it arrives: a Maildir file in the first
    local recipient's tmp/ and, for remote recipients, a spool file in <spool>/tmp/. Nothing
    is under a final name until `commit()`; `discard()` leaves nothing behind.

    The text comes in whole lines with CRLF, dot-stuffing undone (text.MessageText). A write
    that fails (a full disk) is remembered, and the rest of the text is dropped, so that the
    session can read the text to its end and then answer; `commit()` raises it.
    """

    def __init__(self, maildir, spool, envelope, prefix=b""):
        self.maildir = maildir
        self.spool = spool
        self.envelope = envelope
        self.failure = None             # the StorageError of a failed write
        self.folders = list(dict.fromkeys(maildir.folder(recipient.mailbox)
                                          for recipient in envelope.local_recipients))
        self.maildir_name = maildir.unique_name() if self.folders else None
        self.maildir_file = None
        self.spool_file = None
        try:
            if self.folders:
                self.maildir_file = self._open_in_maildir()
                # RFC 5321 4.4: the final delivery adds Return-Path with the reverse path
                self._write(self.maildir_file, b"Return-Path: <%s>\n" %
                            envelope.reverse_path.text.encode() + _lf(prefix))
            if envelope.remote_recipients:
                self.spool_file = self._open_in_spool()
                self._write(self.spool_file, spool_format.command_head(envelope) +
                            _dot_stuffed(prefix))
        except OSError as error:
            self.discard()
            raise StorageError.from_os_error(error, "opening a message file") from None
        except BaseException:
            self.discard()
            raise
        if self.failure:
            self.discard()
            raise self.failure

    @property
    def spool_name(self):
        return self.envelope.spool_name

    def _open_in_maildir(self):
        folder = self.folders[0]
        path = os.path.join(folder, "tmp", self.maildir_name)
        self.maildir.make(folder)
        return _create(path, lambda: self.maildir.make(folder, again=True))

    def _open_in_spool(self):
        path = self.spool.temporary_path(self.spool_name)
        return _create(path, lambda: durable.make_directories(self.spool.tmp))

    def write(self, text):
        if self.failure:
            return
        if self.maildir_file:
            self._write(self.maildir_file, _lf(text))
        if self.spool_file:
            self._write(self.spool_file, _dot_stuffed(text))

    def _write(self, open_file, content):
        try:
            durable.write_all(open_file.descriptor, content)
        except OSError as error:
            self.failure = StorageError.from_os_error(error, f"writing {open_file.path}")

    def commit(self):
        """Make the message durable under its final names (RFC 5321 6.1). Returns the
        spool name, or None when every recipient was local. Raises StorageError."""
        try:
            if self.spool_file and not self.failure:
                self._write(self.spool_file, spool_format.END_OF_FILE)
            if self.failure:
                raise self.failure
            for open_file in (self.maildir_file, self.spool_file):
                if open_file:
                    open_file.sync()
            if self.maildir_file:
                self._link_into_new()
            if self.spool_file:
                self._rename_into_spool()
        except OSError as error:
            self.discard()
            raise StorageError.from_os_error(error, "storing the message") from None
        except BaseException:
            self.discard()
            raise
        return self.spool_name if self.spool_file else None

    def _link_into_new(self):
        """The file in each folder's new/: one rename for one folder, as Maildir intends;
        hard links for several (all or none), then the temporary name gone."""
        temporary = self.maildir_file.path
        finals = [os.path.join(folder, "new", self.maildir_name) for folder in self.folders]
        if len(finals) == 1:
            _retry_if_gone(lambda: os.rename(temporary, finals[0]),
                           lambda: self.maildir.make(self.folders[0], again=True))
        else:
            linked = []
            try:
                for folder, final in zip(self.folders, finals):
                    _retry_if_gone(lambda: os.link(temporary, final),
                                   lambda: self.maildir.make(folder, again=True))
                    linked.append(final)
            except BaseException:
                for final in linked:
                    os.unlink(final)
                raise
            os.unlink(temporary)
        self.maildir_file.done = True
        for final in finals:
            durable.fsync_directory(os.path.dirname(final))

    def _rename_into_spool(self):
        os.rename(self.spool_file.path, self.spool.path(self.spool_name))
        self.spool_file.done = True
        durable.fsync_directory(self.spool.directory)

    def discard(self):
        """Close and remove whatever is not yet under its final name."""
        for open_file in (self.maildir_file, self.spool_file):
            if open_file:
                open_file.abandon()


class _OpenFile:
    """A file being written: its descriptor, and whether it reached its final name."""

    def __init__(self, path, descriptor):
        self.path = path
        self.descriptor = descriptor
        self.done = False

    def sync(self):
        os.fsync(self.descriptor)
        os.close(self.descriptor)
        self.descriptor = None

    def abandon(self):
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None
        if not self.done:
            self.done = True
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _create(path, remake):
    """Create `path` exclusively; if its directory was removed while the server ran, make it
    again once (`remake`) and retry."""
    descriptor = _retry_if_gone(
        lambda: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), remake)
    return _OpenFile(path, descriptor)


def _retry_if_gone(operation, remake):
    try:
        return operation()
    except FileNotFoundError:
        remake()
        return operation()
