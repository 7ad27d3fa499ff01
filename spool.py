"""The spool: the relay's queue on disk, one file per accepted transaction with remote
recipients, holding the transaction as the SMTP commands that the relay replays.

    <spool>/<client port>-<queue id>.smtp     EHLO, MAIL, RCPT..., DATA, the text, ".", QUIT
    <spool>/<client port>-<queue id>.state    the relay's record of each recipient (JSON)
    <spool>/tmp/                              spool files being written
    <spool>/corrupt/                          files the server could not use, moved aside
    <spool>/.lock                             held by the one server that runs this queue

MAIL and RCPT are written with their parameters (`mail_command`, `rcpt_command`), except
SIZE and AUTH, which belong to the client's session: the relay states its own SIZE. The
commands are UTF-8 (an SMTPUTF8 address, RFC 6531); the text is dot-stuffed with CRLF line
ends, as on the wire. A spool file is written in tmp/, fsynced
and renamed, so a spool file under its name is always whole (see storage.Draft).
"""
import fcntl
import json
import os
from typing import NamedTuple

import durable
from address import AddressError, parse_parameters, parse_path, split_path_and_parameters
from envelope import Envelope, Recipient

SPOOL_SUFFIX = ".smtp"
STATE_SUFFIX = ".state"
END_OF_FILE = b".\r\nQUIT\r\n"        # the final dot (RFC 5321 4.1.1.4), then QUIT
# Parameters of the client's session, not of the message: not recorded, never replayed
SESSION_PARAMETERS = frozenset({"SIZE", "AUTH"})
MAX_HEAD = 1 << 20                    # the commands before DATA (100 RCPT lines are ~30 KB)
TEXT_CHUNK = 1 << 16                  # octets of text read at a time when it is streamed


class SpoolError(Exception):
    """A spool or state file that is not what it should be (damaged, not ours)."""


# ---------------------------------------------------------------------------------------
# The commands, written and read back


def format_parameters(parameters):
    """{"BODY": "8BITMIME", "SMTPUTF8": None} -> " BODY=8BITMIME SMTPUTF8" (RFC 5321 4.1.2)."""
    return "".join(f" {keyword}" if value is None else f" {keyword}={value}"
                   for keyword, value in parameters.items())


def mail_command(reverse_path, parameters):
    return f"MAIL FROM:<{reverse_path.text}>{format_parameters(parameters)}"


def rcpt_command(recipient):
    return f"RCPT TO:<{recipient.address.text}>{format_parameters(recipient.parameters)}"


def recorded_parameters(parameters):
    return {keyword: value for keyword, value in parameters.items()
            if keyword not in SESSION_PARAMETERS}


def command_head(envelope):
    """Everything before the text: the transaction as a client sends it (RFC 5321 3.3)."""
    commands = [f"EHLO {envelope.helo}",
                mail_command(envelope.reverse_path, recorded_parameters(envelope.parameters))]
    commands += [rcpt_command(recipient) for recipient in envelope.remote_recipients]
    commands.append("DATA")
    # UTF-8: with SMTPUTF8 (RFC 6531 3.3) an address may hold any character
    return "".join(command + "\r\n" for command in commands).encode("utf-8")


class SpooledMessage(NamedTuple):
    """A spool file read back: the envelope to replay and where its text lies in the file."""
    name: str
    path: str
    envelope: Envelope          # the remote recipients only; client None (not recorded)
    text_offset: int            # where the dot-stuffed text begins in the file
    text_size: int              # its length: it ends with CRLF, without the final "."
    created: float              # when the message was accepted (the file's mtime)

    @property
    def queue_id(self):
        return self.name.partition("-")[2]

    @property
    def recipients(self):
        return self.envelope.recipients

    def read_text(self, limit=None):
        """The dot-stuffed text, or its first `limit` octets."""
        size = self.text_size if limit is None else min(limit, self.text_size)
        with open(self.path, "rb") as spool_file:
            spool_file.seek(self.text_offset)
            return spool_file.read(size)

    def text_chunks(self, chunk_size=TEXT_CHUNK):
        """The dot-stuffed text in pieces of at most `chunk_size` octets, read as they are
        asked for (a large message is never held whole in memory)."""
        with open(self.path, "rb") as spool_file:
            spool_file.seek(self.text_offset)
            left = self.text_size
            while left > 0:
                chunk = spool_file.read(min(chunk_size, left))
                if not chunk:
                    raise SpoolError(f"spool file {self.name}: shorter than when it was read")
                left -= len(chunk)
                yield chunk


def parse_head(name, head):
    """The commands before DATA -> (Envelope, octets they take). SpoolError if they are not
    EHLO, MAIL, one or more RCPT and DATA, each as the server writes them."""
    end = head.find(b"\r\nDATA\r\n")
    if end < 0:
        raise SpoolError(f"spool file {name}: no DATA command")
    try:
        commands = head[:end].decode("utf-8").split("\r\n")
    except UnicodeDecodeError:
        raise SpoolError(f"spool file {name}: a command is not UTF-8") from None
    if len(commands) < 3 or not commands[0].startswith("EHLO "):
        raise SpoolError(f"spool file {name}: not EHLO, MAIL, RCPT")
    try:
        reverse_path, parameters = _parse_command(commands[1], "MAIL FROM:", allow_null=True)
        recipients = [Recipient(*_parse_command(line, "RCPT TO:")) for line in commands[2:]]
    except (AddressError, SpoolError) as problem:
        raise SpoolError(f"spool file {name}: {problem}") from None
    envelope = Envelope(reverse_path, commands[0][len("EHLO "):], None, parameters,
                        recipients, queue_id=name.partition("-")[2])
    return envelope, end + len(b"\r\nDATA\r\n")


def _parse_command(line, keyword, allow_null=False):
    if not line.startswith(keyword):
        raise SpoolError(f"expected {keyword}, found {line[:40]!r}")
    path_text, parameter_text = split_path_and_parameters(line[len(keyword):])
    return (parse_path(path_text, allow_null=allow_null, utf8=True),
            parse_parameters(parameter_text))


# ---------------------------------------------------------------------------------------
# What a spooled text is like


class TextShape(NamedTuple):
    """Where a text has octets above 127 (RFC 6152 3, RFC 6532 3)."""
    eight_bit_headers: bool     # in the header block (up to the first empty line)
    eight_bit: bool             # anywhere


def text_shape(chunks):
    """The TextShape of a text given in pieces; it reads no further than it must."""
    in_headers, eight_bit_headers, eight_bit = True, False, False
    tail = b"\r\n"              # as if a line had just ended: a text may start with CRLF
    for chunk in chunks:
        if in_headers:
            window = tail + chunk
            end = window.find(b"\r\n\r\n")
            in_this_chunk = chunk if end < 0 else chunk[:max(0, end - len(tail))]
            eight_bit_headers = eight_bit_headers or not in_this_chunk.isascii()
            in_headers = end < 0
            tail = window[-3:]
        eight_bit = eight_bit or not chunk.isascii()
        if eight_bit and (eight_bit_headers or not in_headers):
            break
    return TextShape(eight_bit_headers, eight_bit)


def unstuffed(chunks):
    """The dot-stuffed pieces of a spool file's text with the stuffing undone (RFC 5321
    4.5.2: the server added a "." to every line that began with one); a line may be split
    across pieces. Empty pieces are left out."""
    at_line_start = True
    for chunk in chunks:
        piece = chunk[1:] if at_line_start and chunk.startswith(b".") else chunk
        piece = piece.replace(b"\n.", b"\n")
        at_line_start = chunk.endswith(b"\n")
        if piece:
            yield piece



# ---------------------------------------------------------------------------------------
# The directory


class Spool:
    def __init__(self, directory):
        self.directory = directory
        self.tmp = os.path.join(directory, "tmp")
        self.corrupt_directory = os.path.join(directory, "corrupt")

    def prepare(self):
        """Create what is missing; return the directories created."""
        return durable.make_directories(self.directory) + durable.make_directories(self.tmp)

    def path(self, name):
        return os.path.join(self.directory, name + SPOOL_SUFFIX)

    def state_path(self, name):
        return os.path.join(self.directory, name + STATE_SUFFIX)

    def temporary_path(self, name):
        return os.path.join(self.tmp, name + SPOOL_SUFFIX)

    def names(self):
        """The names of all spool files, oldest first (a file that vanishes is skipped)."""
        found = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            # a dotfile is housekeeping, never a message (nor is a bare ".smtp")
            if not entry.name.endswith(SPOOL_SUFFIX) or entry.name.startswith("."):
                continue
            try:
                if entry.is_file():
                    found.append((entry.stat().st_mtime, entry.name[:-len(SPOOL_SUFFIX)]))
            except FileNotFoundError:
                continue
        return [name for _, name in sorted(found)]

    def read(self, name):
        """The spool file `name` -> SpooledMessage. SpoolError if it is damaged, OSError if it
        cannot be read (FileNotFoundError: it is gone)."""
        path = self.path(name)
        with open(path, "rb") as spool_file:
            info = os.fstat(spool_file.fileno())
            head = spool_file.read(MAX_HEAD)
            envelope, text_offset = parse_head(name, head)
            text_size = info.st_size - text_offset - len(END_OF_FILE)
            if text_size < 0:
                raise SpoolError(f"spool file {name}: cut short")
            # The text ends with CRLF (or is empty: DATA's CRLF then precedes the dot), so
            # the final "." is a line of its own (RFC 5321 4.1.1.4)
            ending = END_OF_FILE if text_size == 0 else b"\r\n" + END_OF_FILE
            spool_file.seek(max(0, info.st_size - len(ending)))
            if spool_file.read() != ending:
                raise SpoolError(f"spool file {name}: cut short (no final '.' and QUIT)")
        return SpooledMessage(name, path, envelope, text_offset, text_size, info.st_mtime)

    # The relay's records

    def read_state(self, name):
        """The JSON record beside a spool file, or None if there is none. SpoolError if it
        is not JSON; what the JSON must hold is the relay's business (delivery.py)."""
        try:
            with open(self.state_path(name), encoding="utf-8") as state_file:
                return json.load(state_file)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as error:
            raise SpoolError(f"state file {name}{STATE_SUFFIX}: {error}") from None

    def write_state(self, name, record):
        content = json.dumps(record, indent=1, sort_keys=True).encode()
        durable.write_file(self.state_path(name), content, replace=True)

    def remove(self, name):
        # The spool file first: a crash between the two leaves a stray state file (removed
        # at the next start), never a message without its record of who already has it.
        for path in (self.path(name), self.state_path(name)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        durable.fsync_directory(self.directory)

    def move_to_corrupt(self, name):
        """Move the spool file and its state aside to corrupt/, where --queue lists them.
        Returns the file names moved."""
        durable.make_directories(self.corrupt_directory)
        moved = []
        for path in (self.path(name), self.state_path(name)):
            try:
                os.rename(path, os.path.join(self.corrupt_directory, os.path.basename(path)))
            except FileNotFoundError:
                continue
            moved.append(os.path.basename(path))
        durable.fsync_directory(self.corrupt_directory)
        durable.fsync_directory(self.directory)
        return moved

    def corrupt(self):
        """The file names in corrupt/, sorted."""
        try:
            return sorted(os.listdir(self.corrupt_directory))
        except FileNotFoundError:
            return []

    def remove_leftovers(self, before):
        """What a crash leaves: files in tmp/ and half-written state files older than
        `before`, and state files whose spool file is gone. Returns the paths removed."""
        removed = []
        for folder, is_leftover in ((self.tmp, lambda entry: True),
                                    (self.directory, self._is_stray_state)):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False) and is_leftover(entry) \
                            and entry.stat().st_mtime < before:
                        os.unlink(entry.path)
                        removed.append(entry.path)
                except FileNotFoundError:
                    continue
        return removed

    def _is_stray_state(self, entry):
        if f"{STATE_SUFFIX}.tmp" in entry.name:         # durable.write_file's temporary
            return True
        if not entry.name.endswith(STATE_SUFFIX):
            return False
        return not os.path.exists(self.path(entry.name[:-len(STATE_SUFFIX)]))

    # One queue runner per spool

    def lock(self):
        """Take the spool's lock. Returns the open lock file, or None when another process
        holds it (its pid: `owner()`)."""
        lock_file = open(os.path.join(self.directory, ".lock"), "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            return None
        self.claim(lock_file)
        return lock_file

    def held_by_another(self):
        """True when another process holds the lock now. Creates nothing (a start asks this
        as root, before binding, so that its one line names the spool, not a port)."""
        try:
            lock_file = open(os.path.join(self.directory, ".lock"))
        except OSError:
            return False
        with lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock_file, fcntl.LOCK_UN)
            return False

    @staticmethod
    def claim(lock_file):
        """Name this process in the lock it holds (the one `owner()` reports)."""
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()

    @staticmethod
    def running(pid):
        """Whether process `pid` still runs. A lock can outlive the process named in it: the
        children of a killed server ([server] processes) hold it until they have stopped."""
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:                 # someone else's: it runs
            pass
        return True

    def owner(self):
        """The pid of the process holding the spool lock, or None."""
        try:
            with open(os.path.join(self.directory, ".lock")) as lock_file:
                return int(lock_file.read().strip() or 0) or None
        except (OSError, ValueError):
            return None
