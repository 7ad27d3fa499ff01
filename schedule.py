"""When each queued message is next due: a heap of (due time, name), read by one thread.

A message is taken when it is due and is then *active* until its attempt ends (`finish`),
so it is never attempted twice at once. A request that arrives meanwhile (a flush, a new
enqueue) is kept and applied when the attempt ends. Times are wall-clock seconds, as the
record saves them.
"""
import heapq
import threading
import time

LONGEST_SLEEP = 60      # seconds: wake at least this often, in case the clock jumps


class Schedule:
    def __init__(self):
        self._heap = []             # (due, name); an entry whose due differs from _due is stale
        self._due = {}              # name -> when it is due (or was asked for, while active)
        self._forced = set()        # names flushed: every pending recipient is due
        self._active = set()        # names whose attempt is under way
        self._changed = threading.Condition()
        self._stopping = False

    def add(self, name, due):
        """Make `name` due at `due`, or sooner if it already was."""
        with self._changed:
            self._set(name, min(due, self._due.get(name, due)))

    def _set(self, name, due):
        self._due[name] = due
        if name not in self._active:
            heapq.heappush(self._heap, (due, name))
        self._changed.notify_all()

    def flush(self, names, now):
        """Every pending recipient of `names` is due now (--flush, SIGUSR1)."""
        with self._changed:
            self._forced.update(names)
            for name in names:
                self._set(name, now)

    def take_forced(self, name):
        """Whether `name` was flushed since its last attempt began (and forget it)."""
        with self._changed:
            forced = name in self._forced
            self._forced.discard(name)
            return forced

    def take(self):
        """Wait for the next due name and mark it active. None once stopping."""
        with self._changed:
            while not self._stopping:
                wait = self._next_wait()
                if wait is None:
                    due, name = heapq.heappop(self._heap)
                    del self._due[name]
                    self._active.add(name)
                    return name
                self._changed.wait(min(wait, LONGEST_SLEEP))
            return None

    def _next_wait(self):
        """Seconds until the first entry is due; None if it is due now. Drops stale entries."""
        while self._heap:
            due, name = self._heap[0]
            if self._due.get(name) != due or name in self._active:
                heapq.heappop(self._heap)
                continue
            wait = due - time.time()
            return None if wait <= 0 else wait
        return LONGEST_SLEEP

    def finish(self, name, due):
        """The attempt on `name` is over: due again at `due` (None: it has left the queue),
        or sooner if that was asked for meanwhile."""
        with self._changed:
            self._active.discard(name)
            requested = self._due.pop(name, None)
            times = [moment for moment in (due, requested) if moment is not None]
            if times:
                self._set(name, min(times))
            else:
                self._forced.discard(name)
            self._changed.notify_all()

    def forget(self, name):
        """Drop `name` altogether (its files are gone)."""
        with self._changed:
            self._active.discard(name)
            self._due.pop(name, None)
            self._forced.discard(name)
            self._changed.notify_all()

    def wait_until_idle(self, since, timeout=None):
        """Wait until no attempt is under way and nothing is due at or before `since`.
        True if so, False on timeout."""
        def idle():
            return self._stopping or (not self._active
                                      and all(due > since for due in self._due.values()))
        with self._changed:
            return self._changed.wait_for(idle, timeout)

    def stop(self):
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def due_times(self):
        """{name: due} of every message waiting (not active)."""
        with self._changed:
            return {name: due for name, due in self._due.items() if name not in self._active}
