"""storage.py: the users file, Maildir delivery, the spool (temporary directories only)."""
import json
import mailbox
import os
import re

import pytest

import storage
from storage import (Spooled, Storage, StorageError, Users, dot_stuff, is_safe_name,
                     parse_spool, read_users_file, spool_text)

MESSAGE = (b"Received: from client.example ([127.0.0.1])\r\n\tby mail.test.ru; "
           b"Sat, 21 Nov 2026 10:00:00 +0300\r\n"
           b"Subject: hello\r\n\r\nHi\r\n.a line with a dot\r\n.\r\nbye\r\n")
STUFFED = (b"Received: from client.example ([127.0.0.1])\r\n\tby mail.test.ru; "
           b"Sat, 21 Nov 2026 10:00:00 +0300\r\n"
           b"Subject: hello\r\n\r\nHi\r\n..a line with a dot\r\n..\r\nbye\r\n")
MAILDIR_NAME = re.compile(r"\d+\.M\d+P\d+Q\d+\.[^/:]+")


@pytest.fixture
def store(tmp_path):
    return Storage(str(tmp_path / "mail"), str(tmp_path / "spool"))


def envelope(local=(), remote=(), reverse_path="sender@example.org", port=51234,
             queue_id="0123456789abcdef", body=None):
    return {
        "queue_id": queue_id,
        "client_ip": "127.0.0.1",
        "client_port": port,
        "helo": "client.example",
        "reverse_path": reverse_path,
        "mail_parameters": {"BODY": body} if body else {},
        "local": list(local),
        "remote": list(remote),
    }


def files_under(root):
    return sorted(os.path.relpath(os.path.join(directory, name), root)
                  for directory, _, names in os.walk(root) for name in names)


def new_messages(store, domain, user):
    folder = os.path.join(store.maildir, domain, user, "new")
    return {name: open(os.path.join(folder, name), "rb").read()
            for name in sorted(os.listdir(folder))}


# --- Storage: directories -------------------------------------------------------------------


def test_storage_creates_its_directories(tmp_path):
    Storage(str(tmp_path / "a" / "mail"), str(tmp_path / "b" / "spool"))
    assert (tmp_path / "a" / "mail").is_dir()
    assert (tmp_path / "b" / "spool").is_dir()
    assert (tmp_path / "b" / "spool" / "tmp").is_dir()


# --- Maildir --------------------------------------------------------------------------------


def test_local_delivery_lands_in_new(store):
    assert store.deliver(envelope(local=["alice@test.ru"]), MESSAGE) is None
    folder = os.path.join(store.maildir, "test.ru", "alice")
    for sub in ("tmp", "new", "cur"):
        assert os.path.isdir(os.path.join(folder, sub)), sub
    assert os.listdir(os.path.join(folder, "tmp")) == []
    assert os.listdir(os.path.join(folder, "cur")) == []
    [(name, content)] = new_messages(store, "test.ru", "alice").items()
    assert MAILDIR_NAME.fullmatch(name)
    assert content == b"Return-Path: <sender@example.org>\r\n" + MESSAGE
    assert files_under(store.spool) == []           # nothing spooled for local mail


def test_return_path_of_a_bounce_is_empty(store):
    store.deliver(envelope(local=["alice@test.ru"], reverse_path=""), MESSAGE)
    [content] = new_messages(store, "test.ru", "alice").values()
    assert content.startswith(b"Return-Path: <>\r\nReceived: ")


def test_maildir_names_are_lower_cased(store):
    store.deliver(envelope(local=["Alice@Test.RU"]), MESSAGE)
    assert os.listdir(store.maildir) == ["test.ru"]
    assert os.listdir(os.path.join(store.maildir, "test.ru")) == ["alice"]


def test_several_local_recipients_get_the_same_message(store):
    store.deliver(envelope(local=["alice@test.ru", "bob@test.ru", "carol@example.test"]),
                  MESSAGE)
    copies = [new_messages(store, d, u) for d, u in
              (("test.ru", "alice"), ("test.ru", "bob"), ("example.test", "carol"))]
    for copy in copies:
        assert list(copy.values()) == [b"Return-Path: <sender@example.org>\r\n" + MESSAGE]
    assert copies[0].keys() == copies[1].keys() == copies[2].keys()


def test_same_mailbox_twice_gets_one_copy(store):
    store.deliver_local(["alice@test.ru", "ALICE@test.ru"], "s@example.org", MESSAGE)
    assert len(new_messages(store, "test.ru", "alice")) == 1


def test_unique_names_even_in_the_same_microsecond(store, monkeypatch):
    monkeypatch.setattr(storage.time, "time", lambda: 1795000000.123456)
    for _ in range(5):
        store.deliver(envelope(local=["alice@test.ru"]), MESSAGE)
    names = list(new_messages(store, "test.ru", "alice"))
    assert len(names) == 5
    assert all(MAILDIR_NAME.fullmatch(name) for name in names)
    assert all(name.startswith(f"1795000000.M123456P{os.getpid()}Q") for name in names)


def test_unique_name_escapes_slash_and_colon_in_hostname(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.socket, "gethostname", lambda: "odd/host:name")
    store = Storage(str(tmp_path / "mail"), str(tmp_path / "spool"))
    store.deliver(envelope(local=["alice@test.ru"]), MESSAGE)
    [name] = new_messages(store, "test.ru", "alice")
    assert name.endswith(r".odd\057host\072name")


def test_python_mailbox_reads_the_maildir(store):
    store.deliver(envelope(local=["alice@test.ru"]), MESSAGE)
    folder = mailbox.Maildir(os.path.join(store.maildir, "test.ru", "alice"), create=False)
    [message] = list(folder)
    assert message["Subject"] == "hello"
    assert message["Return-Path"] == "<sender@example.org>"


@pytest.mark.parametrize("address", [
    "../evil@test.ru", "a/b@test.ru", ".hidden@test.ru", "..@test.ru", "a\x00b@test.ru",
    "a\x01b@test.ru", "a\nb@test.ru", "a b@test.ru", "a\\b@test.ru", "@test.ru",
    "alice@..", "alice@a/b", "alice@.test.ru", "alice@",
])
def test_unsafe_mailbox_names_never_touch_the_disk(store, address):
    before = files_under(os.path.dirname(store.maildir))
    with pytest.raises(StorageError):
        store.deliver(envelope(local=[address], remote=["dave@example.org"]), MESSAGE)
    assert files_under(os.path.dirname(store.maildir)) == before
    assert os.listdir(store.maildir) == []


def test_failed_link_leaves_nothing_behind(store, monkeypatch):
    real_link, calls = os.link, []

    def link_then_fail(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_link(source, target)

    monkeypatch.setattr(storage.os, "link", link_then_fail)
    with pytest.raises(OSError):
        store.deliver(envelope(local=["alice@test.ru", "bob@test.ru"],
                               remote=["dave@example.org"]), MESSAGE)
    assert len(calls) == 2
    assert files_under(store.maildir) == []
    assert files_under(store.spool) == []


# --- the spool ------------------------------------------------------------------------------


def test_spool_file_name_and_content(store):
    name = store.deliver(envelope(remote=["dave@example.org", "erin@example.net"],
                                  port=40001, queue_id="feedface00112233"), MESSAGE)
    assert name == "40001-feedface00112233"
    assert os.listdir(store.spool) == ["40001-feedface00112233.smtp", "tmp"]
    assert os.listdir(os.path.join(store.spool, "tmp")) == []
    with open(store.spool_path(name), "rb") as spool_file:
        content = spool_file.read()
    assert content == (b"EHLO client.example\r\n"
                       b"MAIL FROM:<sender@example.org>\r\n"
                       b"RCPT TO:<dave@example.org>\r\n"
                       b"RCPT TO:<erin@example.net>\r\n"
                       b"DATA\r\n" + STUFFED + b".\r\nQUIT\r\n")


def test_spool_holds_only_remote_recipients(store):
    name = store.deliver(envelope(local=["alice@test.ru"], remote=["dave@example.org"]), MESSAGE)
    with open(store.spool_path(name), "rb") as spool_file:
        content = spool_file.read()
    assert b"alice" not in content
    assert b"RCPT TO:<dave@example.org>\r\n" in content
    assert len(new_messages(store, "test.ru", "alice")) == 1


def test_spool_keeps_8bitmime_and_null_sender(store):
    name = store.deliver(envelope(remote=["dave@example.org"], reverse_path="",
                                  body="8bitmime"), b"Subject: \xc3\xa9\r\n\r\n\xff\r\n")
    with open(store.spool_path(name), "rb") as spool_file:
        content = spool_file.read()
    assert content.startswith(b"EHLO client.example\r\nMAIL FROM:<> BODY=8BITMIME\r\n")
    assert b"\r\nDATA\r\nSubject: \xc3\xa9\r\n\r\n\xff\r\n.\r\nQUIT\r\n" in content


def test_spool_without_body_8bitmime(store):
    name = store.deliver(envelope(remote=["dave@example.org"], body="7BIT"), MESSAGE)
    with open(store.spool_path(name), "rb") as spool_file:
        assert b"MAIL FROM:<sender@example.org>\r\n" in spool_file.read()


def test_spool_file_is_readable_text(store):
    name = store.deliver(envelope(remote=["dave@example.org"]), MESSAGE)
    with open(store.spool_path(name), "rb") as spool_file:
        lines = spool_file.read().split(b"\r\n")
    assert lines[:4] == [b"EHLO client.example", b"MAIL FROM:<sender@example.org>",
                         b"RCPT TO:<dave@example.org>", b"DATA"]
    assert lines[-3:] == [b".", b"QUIT", b""]


@pytest.mark.parametrize("message, stuffed", [
    (b"a\r\n", b"a\r\n"),
    (b".\r\n", b"..\r\n"),
    (b".start\r\nmid.dle\r\n.\r\n..\r\n", b"..start\r\nmid.dle\r\n..\r\n...\r\n"),
    (b"no final line end", b"no final line end\r\n"),
    (b"", b"\r\n"),
])
def test_dot_stuff(message, stuffed):
    assert dot_stuff(message) == stuffed


def test_spool_text_ends_the_data_once():
    text = spool_text(envelope(remote=["d@example.org"]), b"a\r\n.\r\nQUIT\r\n")
    assert text.count(b"\r\n.\r\n") == 1
    assert text.endswith(b"\r\n..\r\nQUIT\r\n.\r\nQUIT\r\n")


# --- reading the spool back -----------------------------------------------------------------


def test_read_spooled_round_trip(store):
    name = store.deliver(envelope(remote=["dave@example.org", '"odd name"@example.net'],
                                  body="8BITMIME"), MESSAGE)
    spooled = store.read_spooled(name)
    assert isinstance(spooled, Spooled)
    assert spooled.name == name
    assert spooled.queue_id == "0123456789abcdef"
    assert spooled.helo == "client.example"
    assert spooled.reverse_path == "sender@example.org"
    assert spooled.body_8bit is True
    assert spooled.recipients == ["dave@example.org", '"odd name"@example.net']
    assert spooled.data == STUFFED
    assert spooled.size == len(STUFFED)
    assert spooled.created == pytest.approx(os.stat(store.spool_path(name)).st_mtime)


def test_parse_spool_round_trip_null_sender_and_tricky_text():
    message = b"DATA\r\n.\r\nQUIT\r\n.\r\n\r\nRCPT TO:<x@y.org>\r\n"
    content = spool_text(envelope(remote=["d@example.org"], reverse_path=""), message)
    spooled = parse_spool("7-abc", content, 12.5)
    assert spooled == Spooled("7-abc", "client.example", "", False, ["d@example.org"],
                              dot_stuff(message), 12.5)
    assert spooled.queue_id == "abc"


@pytest.mark.parametrize("content", [
    b"",
    b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<c@d.org>\r\n",                 # no DATA
    b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<c@d.org>\r\nDATA\r\nhalf a mess",
    b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<c@d.org>\r\nDATA\r\ntext\r\n.\r\n",
    b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nDATA\r\ntext\r\n.\r\nQUIT\r\n",      # no recipient
    b"HELO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<c@d.org>\r\nDATA\r\n.\r\nQUIT\r\n",
    b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nNOOP <c@d.org>\r\nDATA\r\n.\r\nQUIT\r\n",
])
def test_parse_spool_refuses_incomplete_files(content):
    with pytest.raises(StorageError):
        parse_spool("1-x", content, 0.0)


@pytest.mark.parametrize("content", [
    b"EHLO x\r\nDATA\r\n.\r\nQUIT\r\n",                                         # one command
    b"EHLO x\r\nMAIL FROM:a@b.org\r\nRCPT TO:<c@d.org>\r\nDATA\r\n.\r\nQUIT\r\n",  # no <
    b"EHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:c@d.org\r\nDATA\r\n.\r\nQUIT\r\n",
    b"EHLO \xff\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<c@d.org>\r\nDATA\r\n.\r\nQUIT\r\n",
])
def test_parse_spool_malformed_head_is_a_storage_error(content):
    with pytest.raises(StorageError):
        parse_spool("1-x", content, 0.0)


def test_spooled_names_oldest_first(store):
    for port, when in ((3, 3000), (1, 1000), (2, 2000)):
        name = store.deliver(envelope(remote=["d@example.org"], port=port, queue_id="q"),
                             MESSAGE)
        os.utime(store.spool_path(name), (when, when))
    store.write_state("1-q", {"recipients": {}})      # .state files are not spool entries
    assert store.spooled_names() == ["1-q", "2-q", "3-q"]


def test_state_files(store):
    name = store.deliver(envelope(remote=["d@example.org"]), MESSAGE)
    assert store.read_state(name) is None
    record = {"queue_id": "x", "recipients": {"d@example.org": {"status": "pending"}}}
    store.write_state(name, record)
    assert store.read_state(name) == record
    with open(store.state_path(name), encoding="utf-8") as state_file:
        assert json.load(state_file) == record
    store.remove_spooled(name)
    assert store.spooled_names() == []
    assert sorted(os.listdir(store.spool)) == ["tmp"]
    store.remove_spooled(name)                          # removing twice is harmless


def test_corrupt_state_file(store):
    with open(store.state_path("1-x"), "w") as state_file:
        state_file.write("{not json")
    with pytest.raises(StorageError):
        store.read_state("1-x")


# --- the spool lock -------------------------------------------------------------------------


def test_lock_spool_is_exclusive(store):
    first = store.lock_spool()
    assert first is not None
    try:
        assert store.spool_owner() == os.getpid()
        other = Storage(store.maildir, store.spool)
        assert other.lock_spool() is None
        assert other.spool_owner() == os.getpid()
    finally:
        first.close()
    again = other.lock_spool()
    assert again is not None
    again.close()


def test_spool_owner_without_lock_file(store):
    assert store.spool_owner() is None


# --- safe names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "a.b", "a-b_c+d", "test.ru", "[127.0.0.1]",
                                  "x" * 255, "o'brien", "a..b"])
def test_safe_names(name):
    assert is_safe_name(name)


@pytest.mark.parametrize("name", [
    "", ".", "..", ".hidden", "../x", "a/b", "/", "a\\b", "a\x00b", "\x00", "a\x01",
    "a\x1fb", "a\x7f", "a b", "a\tb", "a\nb", "caf\u00e9", "x" * 256,
])
def test_unsafe_names(name):
    assert not is_safe_name(name)


# --- the users file -------------------------------------------------------------------------


def write_users(tmp_path, text):
    path = tmp_path / "users"
    path.write_text(text)
    return str(path)


def test_read_users_file(tmp_path):
    path = write_users(tmp_path, "# the mailboxes\n\nalice\n  Bob  # a comment\n"
                                 "carol@Example.TEST:$hash$abc\ndave:\n")
    entries, mtime = read_users_file(path)
    assert entries == {"alice": None, "bob": None, "carol@example.test": "$hash$abc",
                       "dave": None}
    assert mtime == os.stat(path).st_mtime_ns


@pytest.mark.parametrize("line", ["../root", ".hidden", "a/b", "a\x01b", "alice@..",
                                  "alice@a/b", "@test.ru"])
def test_users_file_refuses_unsafe_names(tmp_path, line):
    path = write_users(tmp_path, f"alice\n{line}\n")
    with pytest.raises(StorageError, match="line 2"):
        read_users_file(path)


def test_missing_users_file(tmp_path):
    with pytest.raises(StorageError, match="no such file"):
        Users(str(tmp_path / "nope"))


def test_users_has_mailbox(tmp_path):
    users = Users(write_users(tmp_path, "alice\ncarol@example.test:h1\n"))
    assert users.has_mailbox("alice", "test.ru")
    assert users.has_mailbox("ALICE", "Example.Test")       # a bare name is in every domain
    assert users.has_mailbox("carol", "example.test")
    assert not users.has_mailbox("carol", "test.ru")        # name@domain only there
    assert not users.has_mailbox("bob", "test.ru")
    assert users.password_hash("Carol@example.test") == "h1"
    assert users.password_hash("alice") is None


def test_users_file_is_reread_when_it_changes(tmp_path, monkeypatch):
    clock = iter(range(1000, 100000, 10))
    monkeypatch.setattr(storage.time, "monotonic", lambda: next(clock))
    path = write_users(tmp_path, "alice\n")
    users = Users(path)
    assert not users.has_mailbox("bob", "test.ru")
    with open(path, "w") as users_file:
        users_file.write("alice\nbob\n")
    os.utime(path, ns=(1, 1))
    assert users.has_mailbox("bob", "test.ru")
    with open(path, "w") as users_file:                      # a bad edit keeps the last list
        users_file.write("alice\n../bad\n")
    os.utime(path, ns=(2, 2))
    assert users.has_mailbox("bob", "test.ru")


def test_add_user_replaces_the_entry(tmp_path):
    path = write_users(tmp_path, "# users\nalice\nbob:old\n")
    storage.add_user(path, "Bob", "new")
    entries, _ = read_users_file(path)
    assert entries == {"alice": None, "bob": "new"}
    with open(path) as users_file:
        assert users_file.read().startswith("# users\nalice\n")


def test_add_user_keeps_the_users_file_readable(tmp_path):
    users_file = tmp_path / "users"
    users_file.write_text("alice\n")
    os.chmod(users_file, 0o644)
    storage.add_user(str(users_file), "bob@test.ru", "scrypt$1$1$1$AA==$AA==")
    assert oct(os.stat(users_file).st_mode & 0o777) == "0o644"
    assert users_file.read_text() == "alice\nbob@test.ru:scrypt$1$1$1$AA==$AA==\n"
