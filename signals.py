"""The signals a process acts on (SIGTERM, SIGUSR1, ...), read by its main thread as numbers.

Python runs a signal's handler in the main thread only, and only once that thread runs
Python code again; the kernel, though, hands a signal sent to the process to whichever of its
threads it likes. A main thread asleep in `threading.Event.wait()` is not woken by a signal
that another thread took: the handler would wait for the wait's own timeout (a server once
ignored SIGTERM that way, in CI). So the main thread sleeps in select() on
the descriptor that `signal.set_wakeup_fd` makes the interpreter's C handler write each
signal's number to, in whichever thread it runs, and acts on the numbers it reads there.
"""
import select
import signal
import socket

STOP = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)   # HUP: a closed terminal; nothing
#                                                         needs reloading
FLUSH = signal.SIGUSR1                                  # --flush: the queue is due now
HANDLED = STOP + (FLUSH,)                               # by the process the user started
_INTERRUPT = 0                                          # another thread's wake-up, not a signal


def _arrived(signum, frame):
    """The Python-level handler: nothing to do, the number is in the wakeup descriptor."""


class Signals:
    """From now on, `numbers` are no longer acted on by their default action (or by handlers)
    but returned by `wait()` or `take()` in the main thread. `interrupt()` wakes `wait()`
    from another thread. Only one Signals per process at a time."""

    def __init__(self, numbers):
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        # the descriptor first: a signal between the two must find its number written
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        for number in numbers:
            signal.signal(number, _arrived)

    def fileno(self):
        """For a select() of the caller's own: readable when a signal has arrived."""
        return self._read.fileno()

    def wait(self, timeout=None):
        """Sleep until a signal arrives, `interrupt()` is called or `timeout` seconds pass;
        the numbers of the signals that arrived, in order, possibly none."""
        select.select([self._read], [], [], timeout)
        return self.take()

    def take(self):
        """The numbers of the signals that arrived since the last call, without waiting."""
        numbers = []
        while True:
            try:
                data = self._read.recv(4096)
            except BlockingIOError:
                return numbers
            numbers += [number for number in data if number != _INTERRUPT]

    def interrupt(self):
        """From any thread: make `wait()` return."""
        try:
            self._write.send(bytes([_INTERRUPT]))
        except BlockingIOError:
            pass                        # full: it will wake anyway

    def close(self):
        """Stop writing signals to the descriptor (their handlers stay: they are ignored from
        now on) and close it. Also what a forked child does with its parent's Signals."""
        signal.set_wakeup_fd(-1)
        self._read.close()
        self._write.close()
