"""durable.fsync_directory's group commit: threads that ask while an fsync of the same
directory runs share the next one, and each caller returns only once an fsync that began
after its request has ended (or raises that fsync's error)."""
import os
import threading

import pytest

import durable

WAIT = 10                                   # seconds: every wait here is bounded


class GatedFsync:
    """os.fsync replaced: each call is recorded, and the first one blocks until released."""

    def __init__(self, fail_first=False):
        self.calls = 0
        self.first_entered = threading.Event()
        self.release_first = threading.Event()
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def __call__(self, descriptor):
        with self.lock:
            self.calls += 1
            number = self.calls
        if number == 1:
            self.first_entered.set()
            assert self.release_first.wait(WAIT)
            if self.fail_first:
                raise OSError(5, "Input/output error")


def run_in_threads(count, target):
    outcomes = [None] * count

    def work(index):
        try:
            target()
            outcomes[index] = "ok"
        except OSError as error:
            outcomes[index] = error.errno
    threads = [threading.Thread(target=work, args=(index,)) for index in range(count)]
    return threads, outcomes


def waiting_on(path, count):
    """True once `count` threads are inside fsync_directory(path) (bounded)."""
    deadline = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        with durable._syncs_lock:
            sync = durable._syncs.get(path)
            if sync is not None and sync.waiting >= count:
                return True
        deadline.wait(0.01)
    return False


def test_requests_made_during_an_fsync_share_the_next_one(tmp_path, monkeypatch):
    gate = GatedFsync()
    monkeypatch.setattr(durable.os, "fsync", gate)
    path = str(tmp_path)
    first = threading.Thread(target=durable.fsync_directory, args=(path,))
    first.start()
    assert gate.first_entered.wait(WAIT)
    threads, outcomes = run_in_threads(5, lambda: durable.fsync_directory(path))
    for thread in threads:
        thread.start()
    assert waiting_on(path, 6)
    assert gate.calls == 1                  # the five wait: their changes may be too late
    gate.release_first.set()
    for thread in [first, *threads]:
        thread.join(WAIT)
    assert outcomes == ["ok"] * 5
    assert gate.calls == 2                  # one more fsync, shared by all five
    assert path not in durable._syncs       # nothing kept once nobody waits


def test_an_fsync_error_reaches_every_request_it_was_to_cover(tmp_path, monkeypatch):
    gate = GatedFsync(fail_first=True)
    monkeypatch.setattr(durable.os, "fsync", gate)
    path = str(tmp_path)
    threads, outcomes = run_in_threads(1, lambda: durable.fsync_directory(path))
    threads[0].start()
    assert gate.first_entered.wait(WAIT)
    later, later_outcomes = run_in_threads(3, lambda: durable.fsync_directory(path))
    for thread in later:
        thread.start()
    assert waiting_on(path, 4)
    gate.release_first.set()
    for thread in threads + later:
        thread.join(WAIT)
    assert outcomes == [5]                  # EIO for the request the failed fsync covered
    assert later_outcomes == ["ok"] * 3     # the later ones got an fsync of their own
    assert gate.calls == 2


def test_one_thread_alone_fsyncs_the_real_directory(tmp_path):
    (tmp_path / "entry").write_bytes(b"x")
    durable.fsync_directory(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        durable.fsync_directory(str(tmp_path / "missing"))
    assert not durable._syncs
    assert os.listdir(tmp_path) == ["entry"]
