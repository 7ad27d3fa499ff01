"""The disk: Maildir folders for local recipients, and the draft that writes a message to
its files while it arrives.

Maildir (https://cr.yp.to/proto/maildir.html): <maildir>/<domain>/<user>/{tmp,new,cur}/.
A message file is written in tmp/, fsynced, and renamed into new/; a message for several
local users is written once and hard-linked into each new/. Files have LF line ends, as
qmail, Postfix and Dovecot write them (the wire and the spool keep CRLF).

Every write that the server answers 250 for is durable first (RFC 5321 6.1; durable.py).

Checked mail (checks.py) is written differently: its text goes, as it arrives, to one file
in <spool>/tmp/ (and to its spool files), and its Maildir copies are written from that file
at `commit()`, when the header fields that record the checks are known (`deliver_with`).
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
JUNK = "Junk"                   # the Maildir++ folder of mail DMARC quarantines
FOLDER_MARKER = "maildirfolder"     # Maildir++: the empty file that marks a subfolder
HEADER_END = b"\r\n\r\n"           # RFC 5322 2.1: the empty line after the header section
COPY_BLOCK = 65536              # octets read at a time when a kept text is copied


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

    def folder(self, mailbox, subfolder=""):
        """<root>/<domain>/<local part> of an Address, refusing any name that could leave
        the tree; with `subfolder`, its Maildir++ folder <root>/<domain>/<local part>/.<name>
        (as Courier and Dovecot lay it out)."""
        local_part, domain = mailbox.local_part.lower(), mailbox.domain.lower()
        if not is_safe_name(local_part) or not is_safe_name(domain):
            raise StorageError(f"refusing unsafe mailbox name {mailbox.text!r}")
        folder = os.path.join(self.root, domain, local_part)
        return os.path.join(folder, "." + subfolder) if subfolder else folder

    def make(self, folder, again=False):
        """Make sure tmp/, new/ and cur/ exist; `again` after one of them was found gone."""
        if folder in self._known and not again:
            return
        for sub in ("tmp", "new", "cur"):
            durable.make_directories(os.path.join(folder, sub))
        if os.path.basename(folder).startswith("."):
            # Maildir++: a subfolder holds an empty maildirfolder file (Courier, Dovecot)
            open(os.path.join(folder, FOLDER_MARKER), "ab").close()
        self._known.add(folder)

    def unique_name(self):
        """time.M<usec>P<pid>Q<n>.host, unique per the Maildir spec; the microseconds in six
        digits, so that names of one process sort in the order it delivered them."""
        now = time.time()
        return (f"{int(now)}.M{int(now % 1 * 1e6):06d}P{os.getpid()}"
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
                        yield os.path.join(user.path, "." + JUNK, "tmp")


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
    """One message being written to its files as it arrives (a routing.Plan says which):
    a Maildir file in tmp/ of its first mailbox for each local copy, and a spool file in
    <spool>/tmp/ for the remote recipients and for each forward. Nothing is under a final name
    until `commit()`; `discard()` leaves nothing behind.

    The text comes in whole lines with CRLF, dot-stuffing undone (text.MessageText). A write
    that fails (a full disk) is remembered, and the rest of the text is dropped, so that the
    session can read the text to its end and then answer; `commit()` raises it.

    `local_filter` (unchecked mail): the same kind of factory, whose filter takes the fields
    out of the Maildir copies only, in one pass as the text streams (nothing kept, nothing
    rewritten); the spool files get the text as it came.

    `header_filter` (checked mail): a factory of filters (authresults.OwnFields: `feed(lines)`
    and `finish()`, whole lines in, the lines kept out) that take header fields out of every
    copy. The text is then kept as it came in a file of its own (`read_text()`), and the
    Maildir copies are written from it at `commit()`, after the fields `deliver_with` gives.
    """

    def __init__(self, maildir, spool, plan, prefix=b"", header_filter=None, local_filter=None):
        self.maildir = maildir
        self.spool = spool
        self.envelope = plan.envelope
        self.failure = None             # the StorageError of a failed write
        self.files = []                 # _MaildirFile and _SpoolFile, in the plan's order
        self.header_filter = header_filter
        self.kept = None                # checked mail: the _KeptText, the text as it came
        self._deferred = ()             # checked mail: the LocalCopy to write at commit()
        self._prefix = prefix
        self._fields, self._junk = b"", False
        self._spool_filter = header_filter() if header_filter else None
        # unchecked mail: the Maildir copies filtered as the text streams (RFC 8601 5)
        self._local_filter = local_filter() if local_filter and plan.local and \
            not header_filter else None
        try:
            if header_filter:
                self._deferred = tuple(plan.local)
                self.kept = _KeptText(_create(
                    os.path.join(spool.tmp, f"{self.envelope.queue_id}.text"),
                    lambda: durable.make_directories(spool.tmp), readable=True))
            for copy in () if header_filter else plan.local:
                self.files.append(self._open_maildir_copy(copy, prefix))
            spooled = [(plan.relayed, None)] if plan.relayed else []
            spooled += [(forward.envelope, forward.delivered_to) for forward in plan.forwards]
            for envelope, delivered_to in spooled:
                self.files.append(self._open_spool_file(envelope, delivered_to, prefix))
        except OSError as error:
            self.discard()
            raise StorageError.from_os_error(error, "opening a message file") from None
        except BaseException:
            self.discard()
            raise
        if self.failure:
            self.discard()
            raise self.failure

    def _open_maildir_copy(self, copy, prefix, fields=b"", subfolder=""):
        folders = list(dict.fromkeys(self.maildir.folder(box, subfolder)
                                     for box in copy.mailboxes))
        name = self.maildir.unique_name()
        self.maildir.make(folders[0])
        opened = _create(os.path.join(folders[0], "tmp", name),
                         lambda: self.maildir.make(folders[0], again=True))
        output = _MaildirFile(opened, folders, name)
        # RFC 5321 4.4: the final delivery adds Return-Path with the reverse path
        header = b"Return-Path: <%s>\n" % self.envelope.reverse_path.text.encode()
        if copy.delivered_to:
            header += b"Delivered-To: %s\n" % copy.delivered_to.text.encode()
        # RFC 7208 9.1, RFC 8601 2.1: the check results above the Received: they belong to
        self._write(output, header + _lf(fields + prefix))
        return output

    def _open_spool_file(self, envelope, delivered_to, prefix):
        name = envelope.spool_name
        opened = _create(self.spool.temporary_path(name),
                         lambda: durable.make_directories(self.spool.tmp))
        output = _SpoolFile(opened, name)
        header = b"Delivered-To: %s\r\n" % delivered_to.text.encode() if delivered_to else b""
        self._write(output, spool_format.command_head(envelope) + _dot_stuffed(header + prefix))
        return output

    @property
    def spool_names(self):
        return [output.name for output in self.files if isinstance(output, _SpoolFile)]

    def write(self, text):
        if self.failure:
            return
        if self.kept:
            self._write(self.kept, text)
            text = self._spool_filter.feed(text)
        local = self._local_filter.feed(text) if self._local_filter else text
        for output in self.files:
            self._write(output, output.form(local if isinstance(output, _MaildirFile)
                                            else text))

    def read_header_section(self):
        """Checked mail: the header section of the text as it came (CRLF, without the empty
        line that ends it, RFC 5322 2.1), read back from its file a block at a time."""
        section = bytearray()
        with open(self.kept.file.path, "rb") as kept:
            while True:
                block = kept.read(COPY_BLOCK)
                if not section and block.startswith(b"\r\n"):
                    return b""              # no header fields: the text starts with the body
                searched_from = max(len(section) - len(HEADER_END) + 1, 0)
                section += block
                end = section.find(HEADER_END, searched_from)
                if end >= 0:
                    return bytes(section[:end])
                if not block:
                    return bytes(section)

    def read_text(self):
        """Checked mail: the text as it came (CRLF), read back from its file."""
        with open(self.kept.file.path, "rb") as kept:
            return kept.read()

    def deliver_with(self, fields, junk=False):
        """Checked mail: the header fields (CRLF lines) the Maildir copies get at the top,
        and whether they go to each mailbox's Junk folder."""
        self._fields, self._junk = fields, junk

    def _write_deferred_copies(self):
        """The Maildir copies of checked mail, from the kept text, without the fields the
        filter takes out."""
        subfolder = JUNK if self._junk else ""
        outputs = []
        for copy in self._deferred:     # each in self.files as soon as it exists: discard()
            outputs.append(self._open_maildir_copy(copy, self._prefix, self._fields, subfolder))
            self.files.insert(len(outputs) - 1, outputs[-1])
        self._deferred = ()
        own = self.header_filter()
        with open(self.kept.file.path, "rb") as kept:
            for lines in _whole_lines(kept):
                lines = own.feed(lines)
                for output in outputs:
                    self._write(output, output.form(lines))
            tail = own.finish()
            for output in outputs:
                self._write(output, output.form(tail))

    def _write(self, output, content):
        try:
            durable.write_all(output.file.descriptor, content)
        except OSError as error:
            self.failure = StorageError.from_os_error(error, f"writing {output.file.path}")

    def commit(self):
        """Make the message durable under its final names (RFC 5321 6.1): the Maildir copies,
        then the spool files. Returns the spool names (none when every copy was local).
        Raises StorageError."""
        try:
            if self.kept and not self.failure:
                self._finish_checked()
            if self._local_filter and not self.failure:
                self._finish_local()
            for output in self.files:
                if isinstance(output, _SpoolFile) and not self.failure:
                    self._write(output, spool_format.END_OF_FILE)
            if self.failure:
                raise self.failure
            for output in self.files:
                output.file.sync()
            for output in self.files:
                output.place(self)
        except OSError as error:
            self.discard()
            raise StorageError.from_os_error(error, "storing the message") from None
        except BaseException:
            self.discard()
            raise
        if self.kept:
            self.kept.file.abandon()
        return self.spool_names

    def _finish_checked(self):
        tail = self._spool_filter.finish()
        for output in self.files:
            self._write(output, output.form(tail))
        self._write_deferred_copies()

    def _finish_local(self):
        tail = self._local_filter.finish()
        for output in self.files:
            if isinstance(output, _MaildirFile):
                self._write(output, output.form(tail))

    def discard(self):
        """Close and remove whatever is not yet under its final name."""
        for output in self.files:
            output.file.abandon()
        if self.kept:
            self.kept.file.abandon()


class _MaildirFile:
    """A Maildir copy: written in tmp/ of its first folder, then in each folder's new/."""

    def __init__(self, opened, folders, name):
        self.file, self.folders, self.name = opened, folders, name

    @staticmethod
    def form(text):
        return _lf(text)

    def place(self, draft):
        """One rename for one folder, as Maildir intends; hard links for several (all or
        none), then the temporary name gone."""
        temporary = self.file.path
        finals = [os.path.join(folder, "new", self.name) for folder in self.folders]
        if len(finals) == 1:
            _retry_if_gone(lambda: os.rename(temporary, finals[0]),
                           lambda: draft.maildir.make(self.folders[0], again=True))
        else:
            linked = []
            try:
                for folder, final in zip(self.folders, finals):
                    _retry_if_gone(lambda: os.link(temporary, final),
                                   lambda: draft.maildir.make(folder, again=True))
                    linked.append(final)
            except BaseException:
                for final in linked:
                    os.unlink(final)
                raise
            os.unlink(temporary)
        self.file.done = True
        for final in finals:
            durable.fsync_directory(os.path.dirname(final))


class _KeptText:
    """Checked mail's text as it came, CRLF, in <spool>/tmp/: read back, then removed."""

    def __init__(self, opened):
        self.file = opened


class _SpoolFile:
    """A spool file: written in <spool>/tmp/, then renamed into the spool."""

    def __init__(self, opened, name):
        self.file, self.name = opened, name

    @staticmethod
    def form(text):
        return _dot_stuffed(text)

    def place(self, draft):
        os.rename(self.file.path, draft.spool.path(self.name))
        self.file.done = True
        durable.fsync_directory(draft.spool.directory)


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


def _create(path, remake, readable=False):
    """Create `path` exclusively; if its directory was removed while the server ran, make it
    again once (`remake`) and retry."""
    mode = (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_EXCL
    descriptor = _retry_if_gone(lambda: os.open(path, mode, 0o600), remake)
    return _OpenFile(path, descriptor)


def _whole_lines(opened):
    """A file's content in blocks of whole lines (each block ends with LF, but the last)."""
    rest = b""
    while True:
        block = opened.read(COPY_BLOCK)
        if not block:
            break
        block = rest + block
        end = block.rfind(b"\n") + 1
        if end:
            yield block[:end]
        rest = block[end:]
    if rest:
        yield rest


def _retry_if_gone(operation, remake):
    try:
        return operation()
    except FileNotFoundError:
        remake()
        return operation()
