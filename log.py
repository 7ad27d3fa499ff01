"""The server's log: the dialogue of every session and what the relay does, one line each.

    2026-11-21 10:00:00 [a1b2c3] 127.0.0.1:51234 -> 220 mail.test.ru ESMTP

Lines go to `<log dir>/smtpd.log` (rotated) and, if asked, to the console. Each line is
formatted once and written once to each: the timestamp is made once a second, and the
dialogue lines of a session wait in a buffer until the session is about to wait for its
client (`flush`), so a pipelined burst of commands costs one write. Every other line is
written at once. A traceback goes to the file only, indented under its one-line summary.
"""
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
        self._file = None
        self._size = 0
        self._pending = []
        self._pending_size = 0
        self._second = None
        self._stamp = ""
        self._lock = threading.Lock()

    def open_file(self, path):
        """Start writing to `path` too (the server does this once it runs as its own user)."""
        with self._lock:
            self.path = path
            self._open()

    def _open(self):
        self._file = open(self.path, "a", encoding="utf-8", errors="backslashreplace")
        self._size = self._file.tell()

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
            self._pending.append(self._timestamp() + line + "\n")
            self._pending_size += len(line)
            if self._pending_size > BUFFERED_AT_MOST:
                self._write_pending()

    def write(self, line, details=""):
        """One line, written now (after any buffered dialogue, to keep the order)."""
        with self._lock:
            self._pending.append(self._timestamp() + line + "\n")
            self._write_pending(details)

    def flush(self):
        if self._pending:
            with self._lock:
                self._write_pending()

    def close(self):
        with self._lock:
            self._write_pending()
            if self._file:
                self._file.close()
                self._file = None

    # Called with the lock held

    def _timestamp(self):
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(now))
        return self._stamp

    def _write_pending(self, details=""):
        text = "".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        if self.console:
            _write(self.console, text)
        if self._file:
            if details:
                text += "".join(f"    {line}\n" for line in details.rstrip("\n").split("\n"))
            _write(self._file, text)
            self._size += len(text)
            if self._size > self.max_bytes:
                self._rotate()

    def _rotate(self):
        """smtpd.log -> smtpd.log.1 -> ... -> smtpd.log.<backups>, as logrotate numbers them."""
        self._file.close()
        for number in range(self.backups - 1, 0, -1):
            older = f"{self.path}.{number}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{number + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._open()


def _write(stream, text):
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError, io.UnsupportedOperation):
        pass            # a closed console or a full disk must not take a session down
