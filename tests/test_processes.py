"""processes.RemoteAdmission without processes: a late answer from the supervisor (after the
accepting process gave up waiting) gives its place back at once, whenever it comes."""
import logging
import queue
import threading
import types

import pytest

import processes
import replies
from processes import RemoteAdmission, Say


class RecordingLink:
    """The link to the supervisor: what the accepting process sent, in order."""

    def __init__(self):
        self.sent = []

    def send(self, *message):
        self.sent.append(message)
        return True

    def releases(self):
        return [message for message in self.sent if message[0] is Say.RELEASE]


class AnswerJustAfterTheWait:
    """The answers queue, with the reader thread answering question 1 (a grant) between the
    wait's end and the give-up: the narrowest window there is."""

    def __init__(self, admission):
        self.admission = admission
        self.real = queue.SimpleQueue()

    def get(self, timeout):
        try:
            return self.real.get(timeout=timeout)
        except queue.Empty:
            reader = threading.Thread(target=self.admission.answered, args=(1, None))
            reader.start()
            reader.join(5)
            raise

    def put(self, item):
        self.real.put(item)

    def empty(self):
        return self.real.empty()

    def get_nowait(self):
        return self.real.get_nowait()


@pytest.fixture
def admission(monkeypatch):
    monkeypatch.setattr(processes, "ADMIT_TIMEOUT", 0.05)
    log = logging.getLogger("test_processes")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    return RemoteAdmission(RecordingLink(), types.SimpleNamespace(hostname="mx.test"), log)


def test_an_answer_after_the_give_up_releases_its_place_at_once(admission):
    assert admission.admit("127.0.0.1").code == 421
    admission.answered(1, None)
    assert admission.link.releases() == [(Say.RELEASE, "127.0.0.1")]


def test_a_late_refusal_releases_nothing(admission):
    admission.admit("127.0.0.1")
    admission.answered(1, replies.TOO_MANY_FROM_YOU.format(hostname="mx.test"))
    assert admission.link.releases() == []


def test_an_answer_between_the_wait_and_the_give_up_releases_its_place_at_once(admission):
    admission.answers = AnswerJustAfterTheWait(admission)
    assert admission.admit("127.0.0.1").code == 421
    assert admission.link.releases() == [(Say.RELEASE, "127.0.0.1")]
    assert admission.given_up == {}
