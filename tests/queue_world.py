"""Helpers for the relay-side tests: spool files written as the server writes them, a log to
read back, a `submit` that records bounces, and a loopback world of DNS and fake MXs."""
import email
import email.policy
import os
import threading

import pytest

from address import NULL_ADDRESS, parse_mailbox
from envelope import Envelope, Recipient
from log import Log
from routing import Router
from spool import END_OF_FILE, Spool, command_head
from tests.dns_responder import DNSResponder
from tests.fake_mx import FakeMX, free_port

MX_HOSTS = ["127.0.0.1"] + [f"127.0.0.{n}" for n in range(2, 16)]
LOCAL_USERS = ("alice", "bob")
_counter = 0                    # spool file names made so far
TEXT = b"From: <alice@test.ru>\r\nSubject: relay test\r\n\r\nHello over there.\r\n"


def dot_stuff(text):
    """RFC 5321 4.5.2, as the server writes the spool file."""
    lines = text.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def envelope_of(sender, recipients, parameters=None, helo="client.example"):
    """An Envelope of remote recipients: `recipients` are addresses, or (address, {params})."""
    reverse_path = NULL_ADDRESS if sender == "" else parse_mailbox(sender, utf8=True)
    envelope = Envelope(reverse_path, helo, None, dict(parameters or {}))
    for item in recipients:
        address, rcpt_parameters = (item, {}) if isinstance(item, str) else item
        envelope.recipients.append(Recipient(parse_mailbox(address, utf8=True), dict(rcpt_parameters)))
    return envelope


def write_spool(spool, recipients, sender="alice@test.ru", text=TEXT, name=None,
                parameters=None, created=None):
    """A spool file as the receiving side writes it; returns its name."""
    global _counter
    _counter += 1
    name = name or f"2525-{_counter:016x}"
    envelope = envelope_of(sender, recipients, parameters)
    content = command_head(envelope) + dot_stuff(text) + END_OF_FILE
    temporary = spool.temporary_path(name)
    with open(temporary, "wb") as spool_file:
        spool_file.write(content)
    os.rename(temporary, spool.path(name))
    if created is not None:
        os.utime(spool.path(name), (created, created))
    return name


def make_spool(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    return spool


def make_log(tmp_path):
    log = Log(console=False)
    log.open_file(str(tmp_path / "smtpd.log"))
    return log


def log_text(tmp_path):
    return (tmp_path / "smtpd.log").read_text()


def make_router(users=LOCAL_USERS):
    return Router(("test.ru",), lambda local_part, domain: local_part in users)


class RecordingSubmit:
    """The system's one way in, as the relay sees it: records each (Envelope, message);
    the first `failures` calls raise OSError (a full disk)."""

    def __init__(self, failures=0, on_call=None):
        self.failures = failures
        self.on_call = on_call          # called with the call's number (1, 2, ...) first
        self.calls = 0
        self.submitted = []
        self.arrived = threading.Semaphore(0)
        self.lock = threading.Lock()

    def __call__(self, envelope, message):
        with self.lock:
            self.calls += 1
            if self.on_call:
                self.on_call(self.calls)
            if self.calls <= self.failures:
                raise OSError(28, "No space left on device")
            self.submitted.append((envelope, message))
        self.arrived.release()

    def wait_for(self, count, timeout=15):
        return all(self.arrived.acquire(timeout=timeout) for _ in range(count))

    def report(self, index=0):
        """The DSN submitted `index`th, parsed."""
        return email.message_from_bytes(self.submitted[index][1], policy=email.policy.default)


def delivery_status(report):
    """[per-message fields, per-recipient fields...] of a multipart/report DSN."""
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    part = [part for part in report.iter_parts()
            if part.get_content_type() == "message/delivery-status"][0]
    return part.get_payload()


class LoopbackWorld:
    """DNS on loopback and fake MXs on 127.0.0.x, all on one port (the relay's `port`)."""

    def __init__(self):
        self.port = free_port(MX_HOSTS)
        self.dns = None
        self.mxs = []

    def resolve(self, records):
        self.dns = DNSResponder(records)
        return self.dns

    def mx(self, host, **script):
        fake = FakeMX(host, self.port, **script)
        self.mxs.append(fake)
        return fake

    def overrides(self, **more):
        """Config overrides ("section.key": value) that point the relay at this world."""
        values = {"relay.port": self.port}
        if self.dns:
            values["relay.nameservers"] = self.dns.nameserver
        values.update(more)
        return values

    def stop(self):
        for fake in self.mxs:
            fake.stop()
        if self.dns:
            self.dns.stop()


@pytest.fixture(name="world")
def world_fixture():
    world = LoopbackWorld()
    yield world
    world.stop()


def a_record(ip):
    return [("A", ip)]
