"""storage.py: Maildir delivery and the Draft that writes a message while it arrives."""
import errno
import mailbox
import os
import re

import pytest

import storage
from address import NULL_ADDRESS, Address
from envelope import Client, Envelope, Recipient
from routing import Router
from spool import Spool
from storage import Draft, Maildir, StorageError, is_safe_name

RECEIVED = b"Received: from client.example ([127.0.0.1])\r\n\tby mail.test.ru; Sat, 21 Nov 2026\r\n"
TEXT = b"Subject: hello\r\n\r\nHi\r\n.a line with a dot\r\n.\r\nbye\r\n"     # unstuffed
STUFFED = b"Subject: hello\r\n\r\nHi\r\n..a line with a dot\r\n..\r\nbye\r\n"
MAILDIR_NAME = re.compile(r"\d+\.M\d+P\d+Q\d+\.[^/:]+")
ROUTER = Router(("test.ru", "example.test"), lambda local_part, domain: True)


class Store:
    """A Maildir and a spool in tmp_path, and `deliver` as the mail system submits."""

    def __init__(self, tmp_path):
        self.maildir = Maildir(str(tmp_path / "mail"))
        self.spool = Spool(str(tmp_path / "spool"))
        self.maildir.prepare()
        self.spool.prepare()

    def draft(self, envelope, prefix=RECEIVED):
        return Draft(self.maildir, self.spool, ROUTER.plan(envelope), prefix)

    def deliver(self, envelope, text=TEXT, pieces=1, prefix=RECEIVED):
        draft = self.draft(envelope, prefix)
        lines = text.splitlines(keepends=True)
        size = max(1, len(lines) // pieces)
        for start in range(0, len(lines), size):
            draft.write(b"".join(lines[start:start + size]))
        return draft.commit()

    def new(self, domain, user):
        folder = os.path.join(self.maildir.root, domain, user, "new")
        return {name: open(os.path.join(folder, name), "rb").read()
                for name in sorted(os.listdir(folder))}

    def spool_content(self, name):
        with open(self.spool.path(name), "rb") as spool_file:
            return spool_file.read()


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path)


def mailbox_of(text):
    address = Address.parse(text)
    return Address(address.local_part.lower(), address.domain)


def envelope(local=(), remote=(), reverse_path="sender@example.org", port=51234,
             queue_id="0123456789abcdef", parameters=None):
    recipients = [Recipient(Address.parse(a), {}, mailbox_of(a)) for a in local]
    recipients += [Recipient(Address.parse(a)) for a in remote]
    sender = Address.parse(reverse_path) if reverse_path else NULL_ADDRESS
    return Envelope(sender, "client.example", Client("127.0.0.1", port), parameters or {},
                    recipients, queue_id)


def files_under(root):
    return sorted(os.path.relpath(os.path.join(directory, name), root)
                  for directory, _, names in os.walk(root) for name in names)


# --- Maildir --------------------------------------------------------------------------------


def test_local_delivery_lands_in_new_with_lf_line_ends(store):
    assert store.deliver(envelope(local=["alice@test.ru"])) == []
    folder = os.path.join(store.maildir.root, "test.ru", "alice")
    for sub in ("tmp", "new", "cur"):
        assert os.path.isdir(os.path.join(folder, sub)), sub
    assert os.listdir(os.path.join(folder, "tmp")) == []
    [(name, content)] = store.new("test.ru", "alice").items()
    assert MAILDIR_NAME.fullmatch(name)
    assert b"\r" not in content
    assert content == (b"Return-Path: <sender@example.org>\n" + RECEIVED + TEXT) \
        .replace(b"\r\n", b"\n")
    assert files_under(store.spool.directory) == []         # nothing spooled for local mail


def test_the_text_written_in_pieces_is_the_same(store):
    store.deliver(envelope(local=["alice@test.ru"]), pieces=1)
    store.deliver(envelope(local=["alice@test.ru"]), pieces=5)
    first, second = store.new("test.ru", "alice").values()
    assert first == second


def test_return_path_of_a_bounce_is_empty(store):
    store.deliver(envelope(local=["alice@test.ru"], reverse_path=""))
    [content] = store.new("test.ru", "alice").values()
    assert content.startswith(b"Return-Path: <>\nReceived: ")


def test_maildir_names_are_lower_cased(store):
    store.deliver(envelope(local=["Alice@Test.RU"]))
    assert os.listdir(store.maildir.root) == ["test.ru"]
    assert os.listdir(os.path.join(store.maildir.root, "test.ru")) == ["alice"]


def test_several_local_recipients_get_the_same_file(store):
    store.deliver(envelope(local=["alice@test.ru", "bob@test.ru", "carol@example.test"]))
    copies = [store.new(d, u) for d, u in
              (("test.ru", "alice"), ("test.ru", "bob"), ("example.test", "carol"))]
    assert copies[0] == copies[1] == copies[2]
    [name] = copies[0]
    inodes = {os.stat(os.path.join(store.maildir.root, d, u, "new", name)).st_ino
              for d, u in (("test.ru", "alice"), ("test.ru", "bob"), ("example.test", "carol"))}
    assert len(inodes) == 1                                 # hard links, written once


def test_unique_names_even_in_the_same_microsecond(store, monkeypatch):
    monkeypatch.setattr(storage.time, "time", lambda: 1795000000.123456)
    for _ in range(5):
        store.deliver(envelope(local=["alice@test.ru"]))
    names = list(store.new("test.ru", "alice"))
    assert len(names) == 5
    assert all(name.startswith(f"1795000000.M123456P{os.getpid()}Q") for name in names)


def test_unique_name_escapes_slash_and_colon_in_hostname(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.socket, "gethostname", lambda: "odd/host:name")
    store = Store(tmp_path)
    store.deliver(envelope(local=["alice@test.ru"]))
    [name] = store.new("test.ru", "alice")
    assert name.endswith(r".odd\057host\072name")


def test_python_mailbox_reads_the_maildir(store):
    store.deliver(envelope(local=["alice@test.ru"]))
    folder = mailbox.Maildir(os.path.join(store.maildir.root, "test.ru", "alice"),
                             create=False)
    [message] = list(folder)
    assert message["Subject"] == "hello"
    assert message["Return-Path"] == "<sender@example.org>"


@pytest.mark.parametrize("address", [
    "../evil@test.ru", "a/b@test.ru", ".hidden@test.ru", "..@test.ru", "a\x00b@test.ru",
    "a\x01b@test.ru", "a\nb@test.ru", "a b@test.ru", "a\\b@test.ru",
    "alice@..", "alice@a/b", "alice@.test.ru",
])
def test_unsafe_mailbox_names_never_touch_the_disk(store, address):
    local_part, _, domain = address.rpartition("@")
    before = files_under(os.path.dirname(store.maildir.root))
    unsafe = envelope(remote=["dave@example.org"])
    unsafe.recipients.append(Recipient(Address(local_part, domain), {},
                                       Address(local_part, domain)))
    with pytest.raises(StorageError):
        store.draft(unsafe)
    assert files_under(os.path.dirname(store.maildir.root)) == before
    assert os.listdir(store.maildir.root) == []


def test_a_failed_link_leaves_nothing_behind(store, monkeypatch):
    real_link, calls = os.link, []

    def link_then_fail(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_link(source, target)

    monkeypatch.setattr(storage.os, "link", link_then_fail)
    with pytest.raises(StorageError) as failure:
        store.deliver(envelope(local=["alice@test.ru", "bob@test.ru"],
                               remote=["dave@example.org"]))
    assert failure.value.full
    assert len(calls) == 2
    assert files_under(store.maildir.root) == []
    assert files_under(store.spool.directory) == []


def test_a_full_disk_while_writing_is_remembered_and_nothing_is_left(store, monkeypatch):
    draft = store.draft(envelope(local=["alice@test.ru"], remote=["dave@example.org"]))
    real_write = os.write
    monkeypatch.setattr(storage.durable.os, "write", lambda fd, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    draft.write(b"more text\r\n")                   # no exception while the text arrives
    draft.write(b"and more\r\n")
    monkeypatch.setattr(storage.durable.os, "write", real_write)
    with pytest.raises(StorageError) as failure:
        draft.commit()
    assert failure.value.full and "No space left" in str(failure.value)
    assert files_under(store.maildir.root) == []
    assert files_under(store.spool.directory) == []


def test_discard_leaves_nothing(store):
    draft = store.draft(envelope(local=["alice@test.ru"], remote=["dave@example.org"]))
    draft.write(b"text\r\n")
    draft.discard()
    draft.discard()                                 # twice is harmless
    assert files_under(store.maildir.root) == []
    assert files_under(store.spool.directory) == []


def test_a_maildir_removed_while_running_is_made_again(store):
    store.deliver(envelope(local=["alice@test.ru"]))
    folder = os.path.join(store.maildir.root, "test.ru", "alice")
    for directory, _, names in os.walk(folder, topdown=False):
        for name in names:
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)
    store.deliver(envelope(local=["alice@test.ru"]))
    assert len(store.new("test.ru", "alice")) == 1
    for name in os.listdir(os.path.join(folder, "new")):     # only new/ is gone this time
        os.unlink(os.path.join(folder, "new", name))
    os.rmdir(os.path.join(folder, "new"))
    store.deliver(envelope(local=["alice@test.ru"]))
    assert len(store.new("test.ru", "alice")) == 1


def test_spool_tmp_removed_while_running_is_made_again(store):
    os.rmdir(store.spool.tmp)
    assert store.deliver(envelope(remote=["dave@example.org"])) == ["51234-0123456789abcdef"]


def test_stale_files_in_maildir_tmp_are_removed(store):
    store.deliver(envelope(local=["alice@test.ru"]))
    tmp = os.path.join(store.maildir.root, "test.ru", "alice", "tmp")
    old, fresh = os.path.join(tmp, "old"), os.path.join(tmp, "fresh")
    for path in (old, fresh):
        open(path, "w").close()
    os.utime(old, (1, 1))
    assert store.maildir.remove_stale() == [old]
    assert os.listdir(tmp) == ["fresh"]


# --- the spool file the Draft writes --------------------------------------------------------


def test_spool_file_name_and_content(store):
    [name] = store.deliver(envelope(remote=["dave@example.org", "erin@example.net"],
                                  port=40001, queue_id="feedface00112233"))
    assert name == "40001-feedface00112233"
    assert sorted(os.listdir(store.spool.directory)) == ["40001-feedface00112233.smtp", "tmp"]
    assert os.listdir(store.spool.tmp) == []
    assert store.spool_content(name) == (
        b"EHLO client.example\r\n"
        b"MAIL FROM:<sender@example.org>\r\n"
        b"RCPT TO:<dave@example.org>\r\n"
        b"RCPT TO:<erin@example.net>\r\n"
        b"DATA\r\n" + RECEIVED + STUFFED + b".\r\nQUIT\r\n")


def test_spool_holds_only_remote_recipients(store):
    [name] = store.deliver(envelope(local=["alice@test.ru"], remote=["dave@example.org"]))
    content = store.spool_content(name)
    assert b"alice" not in content
    assert b"RCPT TO:<dave@example.org>\r\n" in content
    assert len(store.new("test.ru", "alice")) == 1


def test_spool_records_mail_parameters_but_not_size_or_auth(store):
    [name] = store.deliver(envelope(remote=["dave@example.org"], reverse_path="",
                                  parameters={"SIZE": "99", "BODY": "8BITMIME"}),
                         text=b"Subject: \xc3\xa9\r\n\r\n\xff\r\n")
    content = store.spool_content(name)
    assert content.startswith(b"EHLO client.example\r\nMAIL FROM:<> BODY=8BITMIME\r\n")
    assert content.endswith(b"\r\nDATA\r\n" + RECEIVED + b"Subject: \xc3\xa9\r\n\r\n\xff\r\n"
                            b".\r\nQUIT\r\n")


def test_the_spool_file_reads_back(store):
    [name] = store.deliver(envelope(remote=["dave@example.org", '"odd name"@example.net'],
                                  parameters={"BODY": "8BITMIME"}))
    spooled = store.spool.read(name)
    assert spooled.queue_id == "0123456789abcdef"
    assert spooled.envelope.reverse_path == Address("sender", "example.org")
    assert spooled.envelope.parameters == {"BODY": "8BITMIME"}
    assert [r.address.text for r in spooled.recipients] == \
        ["dave@example.org", '"odd name"@example.net']
    assert spooled.read_text() == RECEIVED + STUFFED


# --- safe names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "a.b", "a-b_c+d", "test.ru", "[127.0.0.1]",
                                  "x" * 255, "o'brien", "a..b", "café", "zoë", "用户",
                                  "xn--bcher-kva.test"])
def test_safe_names(name):
    assert is_safe_name(name)


@pytest.mark.parametrize("name", [
    "", ".", "..", ".hidden", "../x", "a/b", "/", "a\\b", "a\x00b", "\x00", "a\x01",
    "a\x1fb", "a\x7f", "a b", "a\tb", "a\nb", "x" * 256, "é" * 128,
    "a\u200bb", "a\u2028b", "a\u00a0b", "a\u202eb", "a\x85b",     # invisible, spaces, controls
])
def test_unsafe_names(name):
    assert not is_safe_name(name)
