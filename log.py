"""The server's log: the dialogue of every session and what the relay does, one line each.

    2026-11-21 10:00:00 [a1b2c3] 127.0.0.1:51234 -> 220 mail.test.ru ESMTP

Lines go to `<log dir>/smtpd.log` (rotated) and, if asked, to the console. Each line is
formatted once and written once to each: the timestamp is made once a second, and the
dialogue lines of a session wait in a buffer until the session is about to wait for its
client (`flush`), so a pipelined burst of commands costs one write. Every other line is
written at once. A traceback goes to the file only, indented under its one-line summary.

No thread waits on another's write(2) to add a line: the lines wait in a list that one
thread at a time writes out, and a thread that finds another writing leaves its lines to it
(the writer takes the list again before it stops). Only `write` then waits, until its own
line is out. (When the lock was held across the write(2), 50 sessions at INFO got 34% fewer
messages through than at WARNING; now 8 to 10% fewer: bench/run.py --only scaling.) The
price: under load, the thread that writes may write several rounds of other sessions' lines
before its own session goes on (at most 13 rounds, 0.13 s, with 1,000 sessions at INFO).

Several processes may write the same file ([server] processes): each batch is one write(2)
to a file opened O_APPEND, so batches never mix; the file is rotated under a lock on it by
whichever process first sees it over the limit, and a process whose file was moved away (by
another process, or by logrotate) opens the new one within a second.
"""
import fcntl
import io
import os
import sys
import threading
import time
import traceback

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVELS = {"DEBUG": DEBUG, "INFO": INFO, "WARNING": WARNING, "ERROR": ERROR}
BUFFERED_AT_MOST = 1 << 16      # octets of dialogue held before they are written anyway


class Log:
    def __init__(self, level="INFO", console=True, max_bytes=10 << 20, backups=5):
        self.level = LEVELS[level] if isinstance(level, str) else level
        self.console = sys.stderr if console is True else console or None
        self.max_bytes = max_bytes
        self.backups = backups
        self.path = None
        self._file = None               # descriptor of the log file, O_APPEND
        self._size = 0
        self._checked = 0.0             # when the file was last checked for a rotation
        self._pending = []              # (line, traceback or ""), not yet written
        self._pending_size = 0
        self._second = None
        self._stamp = ""
        self._lock = threading.Lock()   # the pending lines and the counters below
        self._written = threading.Condition(self._lock)     # a batch is out
        self._writing = False           # a thread is writing batches (only one may)
        self._added = 0                 # lines added so far
        self._out = 0                   # of those, lines written (in order)

    def open_file(self, path):
        """Start writing to `path` too (the server does this once it runs as its own user)."""
        with self._lock:
            self.path = path
            self._open()

    def _open(self):
        self._file = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._file).st_size
        self._checked = time.monotonic()

    def enabled(self, level=INFO):
        return level >= self.level

    # What the rest of the server calls: printf-style, formatted only when it is logged

    def debug(self, text, *args):
        if self.level <= DEBUG:
            self.write(text % args if args else text)

    def info(self, text, *args):
        if self.level <= INFO:
            self.write(text % args if args else text)

    def warning(self, text, *args):
        if self.level <= WARNING:
            self.write(text % args if args else text)

    def error(self, text, *args, exc_info=False):
        if self.level <= ERROR:
            details = traceback.format_exc() if exc_info else ""
            self.write(text % args if args else text, details)

    def dialogue(self, line):
        """A session's `->`/`<-` line: buffered until flush() (or 64 KiB)."""
        with self._lock:
            self._add(line)
            self._pending_size += len(line)
            if self._pending_size <= BUFFERED_AT_MOST:
                return
        self._write_pending()

    def write(self, line, details=""):
        """One line, out when this returns (after any buffered dialogue, to keep the order)."""
        with self._lock:
            ticket = self._add(line, details)
        while True:
            self._write_pending()
            with self._lock:
                while self._out < ticket and self._writing:     # another thread writes it
                    self._written.wait()
                if self._out >= ticket:
                    return

    def flush(self):
        """Write the buffered dialogue, or leave it to the thread already writing."""
        if self._pending:
            self._write_pending()

    def close(self):
        self._write_pending()
        with self._lock:
            while self._writing:
                self._written.wait()
            if self._file is not None:
                os.close(self._file)
                self._file = None

    # Called with the lock held

    def _add(self, line, details=""):
        self._pending.append((self._timestamp() + line + "\n", details))
        self._added += 1
        return self._added

    def _timestamp(self):
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(now))
        return self._stamp

    # Called without the lock: one thread at a time gets past the first lines

    def _write_pending(self):
        """Write batches until none is pending, unless another thread is doing so."""
        with self._lock:
            if self._writing:
                return                      # it takes the list again before it stops
            self._writing = True
        try:
            while True:
                with self._lock:
                    batch, self._pending = self._pending, []
                    self._pending_size = 0
                    if not batch:   # stop in the same hold: a line added later finds
                        self._stop_writing()        # no writer, and writes itself
                        return
                try:
                    self._write_batch(batch)
                finally:            # written or failed, these lines are done with
                    with self._lock:
                        self._out += len(batch)
                        self._written.notify_all()
        except BaseException:
            with self._lock:
                self._stop_writing()
            raise

    def _stop_writing(self):
        """With the lock held."""
        self._writing = False
        self._written.notify_all()

    def _write_batch(self, batch):
        text = "".join(line for line, _ in batch)
        if self.console is sys.stderr:
            _write_whole_lines(sys.stderr, text)
        elif self.console:
            _write(self.console, text)
        if self._file is not None:
            if any(details for _, details in batch):
                text = "".join(line + _indented(details) for line, details in batch)
            self._write_file(text.encode("utf-8", "backslashreplace"))

    def _write_file(self, data):
        if time.monotonic() - self._checked > 1 and self._moved_away():
            self._reopen()
        try:
            os.write(self._file, data)
            # O_APPEND: the offset is now the end of the file, other processes' lines included
            self._size = os.lseek(self._file, 0, os.SEEK_CUR)
        except OSError:
            return              # a full disk must not take a session down
        if self._size > self.max_bytes:
            try:
                self._rotate()
            except OSError:
                pass            # kept writing to the file it has

    def _moved_away(self):
        """True when the path no longer names the file this process writes."""
        self._checked = time.monotonic()
        try:
            return os.stat(self.path).st_ino != os.fstat(self._file).st_ino
        except OSError:
            return True

    def _reopen(self):
        old = self._file
        self._open()            # first: a fork meanwhile never inherits a closed descriptor
        os.close(old)

    def reopen_after_fork(self):
        """A forked process opens the file anew: a descriptor of its own, so that the lock
        taken to rotate excludes the other processes (flock(2) locks an open file, and a
        descriptor inherited through fork() is the same open file)."""
        with self._lock:
            # A thread writing at the fork is not in this process: its batch is the parent's
            self._writing = False
            self._out = self._added - len(self._pending)
            if self._file is not None:
                self._reopen()

    def _rotate(self):
        """smtpd.log -> smtpd.log.1 -> ... -> smtpd.log.<backups>, as logrotate numbers them.
        Under a lock on the file, so that of several processes one rotates and the others
        follow it to the new file."""
        fcntl.flock(self._file, fcntl.LOCK_EX)
        try:
            if self._moved_away() or os.fstat(self._file).st_size <= self.max_bytes:
                return                  # another process has rotated it meanwhile
            for number in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{number}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{number + 1}")
            os.replace(self.path, f"{self.path}.1")
        finally:
            self._reopen()              # closing the old file releases the lock


def _indented(details):
    """A traceback under its line, in the file only."""
    if not details:
        return ""
    return "".join(f"    {line}\n" for line in details.rstrip("\n").split("\n"))


PIPE_BUF = 4096                 # POSIX: a write of at most this much to a pipe is not split


def _write_whole_lines(stream, text):
    """To the console, which several processes share (a terminal, or a pipe to journald):
    whole lines in writes of at most PIPE_BUF where possible, so that lines of two processes
    never mix."""
    try:
        descriptor = stream.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        _write(stream, text)
        return
    data = text.encode("utf-8", "backslashreplace")
    try:
        while data:
            end = data.rfind(b"\n", 0, PIPE_BUF) + 1 if len(data) > PIPE_BUF else len(data)
            end = end or len(data)              # a line longer than PIPE_BUF: as it is
            written = os.write(descriptor, data[:end])
            data = data[written:]
    except OSError:
        pass


def _write(stream, text):
    try:
        stream.write(text)
        stream.flush()
    except Exception:   # noqa: BLE001 (a console of any kind: no session may die of it)
        pass            # a closed console or a full disk must not take a session down
