"""users.py: the users file, read, re-read when it changes, and edited by --add-user."""
import os

import pytest

import users
from users import Users, UsersFileError, read_users_file


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
    with pytest.raises(UsersFileError, match="line 2"):
        read_users_file(path)


def test_utf8_names_and_idn_domains(tmp_path):
    mailboxes = Users(write_users(tmp_path, "Zoë\nJürgen@Bücher.Test\nbob@xn--bcher-kva.test\n"))
    assert mailboxes.has_mailbox("zoë", "test.ru")
    assert mailboxes.has_mailbox("ZOË", "test.ru")                  # compared in lower case
    assert mailboxes.has_mailbox("zoe\u0308", "test.ru")           # and in NFC
    assert mailboxes.has_mailbox("jürgen", "xn--bcher-kva.test")    # U-labels are A-labels
    assert mailboxes.has_mailbox("bob", "xn--bcher-kva.test")
    assert not mailboxes.has_mailbox("jürgen", "test.ru")


def test_missing_users_file(tmp_path):
    with pytest.raises(UsersFileError, match="no such file"):
        Users(str(tmp_path / "nope"))


def test_users_has_mailbox(tmp_path):
    mailboxes = Users(write_users(tmp_path, "alice\ncarol@example.test:h1\n"))
    assert mailboxes.has_mailbox("alice", "test.ru")
    assert mailboxes.has_mailbox("ALICE", "Example.Test")       # a bare name is in every domain
    assert mailboxes.has_mailbox("carol", "example.test")
    assert not mailboxes.has_mailbox("carol", "test.ru")        # name@domain only there
    assert not mailboxes.has_mailbox("bob", "test.ru")
    assert mailboxes.password_hash("Carol@example.test") == "h1"
    assert mailboxes.password_hash("alice") is None


def test_users_file_is_reread_when_it_changes(tmp_path, monkeypatch):
    clock = iter(range(1000, 100000, 10))
    monkeypatch.setattr(users.time, "monotonic", lambda: next(clock))
    path = write_users(tmp_path, "alice\n")
    mailboxes = Users(path)
    assert not mailboxes.has_mailbox("bob", "test.ru")
    with open(path, "w") as users_file:
        users_file.write("alice\nbob\n")
    os.utime(path, ns=(1, 1))
    assert mailboxes.has_mailbox("bob", "test.ru")
    with open(path, "w") as users_file:                      # a bad edit keeps the last list
        users_file.write("alice\n../bad\n")
    os.utime(path, ns=(2, 2))
    assert mailboxes.has_mailbox("bob", "test.ru")


def test_add_user_replaces_the_entry(tmp_path):
    path = write_users(tmp_path, "# users\nalice\nbob:old\n")
    users.add_user(path, "Bob", "new")
    entries, _ = read_users_file(path)
    assert entries == {"alice": None, "bob": "new"}
    with open(path) as users_file:
        assert users_file.read().startswith("# users\nalice\n")


def test_add_user_keeps_the_users_file_readable(tmp_path):
    users_file = tmp_path / "users"
    users_file.write_text("alice\n")
    os.chmod(users_file, 0o644)
    users.add_user(str(users_file), "bob@test.ru", "scrypt$1$1$1$AA==$AA==")
    assert oct(os.stat(users_file).st_mode & 0o777) == "0o644"
    assert users_file.read_text() == "alice\nbob@test.ru:scrypt$1$1$1$AA==$AA==\n"
