"""The first thing a newcomer does: one message through smtplib lands in the Maildir."""
import mailbox
import os

from tests.conftest import maildir_messages


def test_smtplib_message_lands_in_maildir(server, smtp):
    smtp.sendmail("carol@example.org", ["alice@test.ru"], b"Subject: hello\r\n\r\nHi Alice\r\n")
    stored = maildir_messages(server.config.maildir, "alice@test.ru")
    assert len(stored) == 1
    assert stored[0].startswith(b"Return-Path: <carol@example.org>\nReceived: from client.example")
    assert stored[0].endswith(b"Subject: hello\n\nHi Alice\n")        # LF, as Maildir readers expect
    folder = mailbox.Maildir(os.path.join(server.config.maildir, "test.ru", "alice"), create=False)
    [message] = list(folder)
    assert message["Subject"] == "hello"
