"""The one bounded wait of the tests, for what only the disk shows (a file in a Maildir, an
empty spool): everything else waits on an event."""
import time


def wait_until(predicate, timeout=15, poll=0.05):
    """Poll `predicate` until it is true or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(poll)
    return predicate()
