"""bounce.py: RFC 3464 DSNs, parsed back with `email`, and who they go to."""
import email
import email.policy

import pytest

from address import NULL_ADDRESS, Address
from bounce import Bouncer, Failure, bounce_recipient, original_headers
from tests.queue_world import (RecordingSubmit, delivery_status, make_log, make_router,
                               make_spool, write_spool)

NOW = 1_800_000_000.0
FAILURE = Failure("bob@remote.test", "550 5.1.1 <bob@remote.test>: no such user",
                  "127.0.0.2:2526", NOW)


@pytest.fixture
def spool(tmp_path):
    return make_spool(tmp_path)


def send_bounce(tmp_path, spool, sender="alice@test.ru", text=None, failures=(FAILURE,)):
    submit = RecordingSubmit()
    bouncer = Bouncer("mail.test.ru", make_router(), submit, make_log(tmp_path))
    arguments = {"text": text} if text is not None else {}
    message = spool.read(write_spool(spool, ["bob@remote.test", "carol@remote.test"],
                                     sender=sender, created=NOW - 60, **arguments))
    envelope = bouncer.send(message, list(failures), NOW)
    return envelope, submit


def parsed(submit):
    return email.message_from_bytes(submit.submitted[0][1], policy=email.policy.default)


def test_a_dsn_is_a_multipart_report_with_one_block_per_failure(tmp_path, spool):
    carol = Failure("carol@remote.test", "451 4.4.1 no answer (gave up: ...)", "", NOW)
    envelope, submit = send_bounce(tmp_path, spool, failures=(FAILURE, carol))
    report = parsed(submit)
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@mail.test.ru>"
    assert report["To"].addresses[0].addr_spec == "alice@test.ru"
    assert report["Auto-Submitted"] == "auto-replied"
    per_message, bob_fields, carol_fields = delivery_status(report)
    assert per_message["Reporting-MTA"] == "dns; mail.test.ru"
    assert bob_fields["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob_fields["Action"] == "failed"
    assert bob_fields["Status"] == "5.1.1"
    assert bob_fields["Remote-MTA"] == "dns; 127.0.0.2"
    assert bob_fields["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.test>: no such user"
    assert carol_fields["Status"] == "4.4.1" and carol_fields["Remote-MTA"] is None
    note = [part for part in report.iter_parts() if part.get_content_type() == "text/plain"][0]
    assert "<carol@remote.test>: 451 4.4.1 no answer" in note.get_content()
    assert b"\r\n" in submit.submitted[0][1] and b"\n" not in submit.submitted[0][1].replace(
        b"\r\n", b"")


def test_the_bounce_envelope_comes_from_the_null_sender_with_no_client(tmp_path, spool):
    envelope, submit = send_bounce(tmp_path, spool)
    assert submit.submitted[0][0] is envelope
    assert envelope.reverse_path == NULL_ADDRESS
    assert envelope.helo == "mail.test.ru" and envelope.client is None
    assert [(r.address.text, r.mailbox) for r in envelope.recipients] == [
        ("alice@test.ru", Address("alice", "test.ru"))]


def test_the_original_headers_come_back_without_the_body(tmp_path, spool):
    text = (b"Subject: will bounce\r\nX-Dots: .\r\n.starts with a dot: yes\r\n"
            b"X-8bit: \xd0\x9f\xd1\x80\xd0\xb8\r\n\r\nSECRET BODY\r\n")
    _, submit = send_bounce(tmp_path, spool, text=text)
    headers = [part for part in parsed(submit).iter_parts()
               if part.get_content_type() == "text/rfc822-headers"][0]
    content = headers.get_content().replace("\r\n", "\n")
    assert content.startswith("Subject: will bounce\nX-Dots: .\n")
    assert "\n.starts with a dot: yes\n" in content          # dot-stuffing undone
    assert "X-8bit: \\xd0\\x9f\\xd1\\x80\\xd0\\xb8\n" in content
    assert "SECRET BODY" not in content
    assert submit.submitted[0][1].isascii()


def test_only_the_first_octets_of_a_large_message_are_read():
    text = b"Subject: huge\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n"
    headers = original_headers(text[:1 << 16])
    assert headers == "Subject: huge\n"                     # a cut line is left out
    long_line = original_headers(b"X-8: " + b"\xff" * 900 + b"\r\n\r\n")
    assert max(len(line) for line in long_line.split("\n")) <= 998
    assert long_line.split("\n")[1].startswith("\t")


def test_a_local_sender_without_a_mailbox_has_postmaster_read_it(tmp_path, spool):
    envelope, _ = send_bounce(tmp_path, spool, sender="gone@test.ru")
    assert [(r.address.text, r.mailbox) for r in envelope.recipients] == [
        ("postmaster@test.ru", Address("postmaster", "test.ru"))]


def test_a_remote_sender_is_bounced_to_through_the_relay(tmp_path, spool):
    envelope, submit = send_bounce(tmp_path, spool, sender="Dave@Elsewhere.test")
    assert [(r.address.text, r.mailbox) for r in envelope.recipients] == [
        ("Dave@elsewhere.test", None)]
    assert parsed(submit)["To"].addresses[0].addr_spec == "Dave@elsewhere.test"


def test_never_a_bounce_for_the_null_sender(tmp_path, spool):
    envelope, submit = send_bounce(tmp_path, spool, sender="")
    assert envelope is None and submit.calls == 0


def test_a_submit_that_fails_raises_to_the_caller(tmp_path, spool):
    submit = RecordingSubmit(failures=1)
    bouncer = Bouncer("mail.test.ru", make_router(), submit, make_log(tmp_path))
    message = spool.read(write_spool(spool, ["bob@remote.test"]))
    with pytest.raises(OSError):
        bouncer.send(message, [FAILURE], NOW)


def test_bounce_recipient_for_a_postmaster_sender():
    recipient = bounce_recipient(make_router(), Address("PostMaster", "test.ru"))
    assert recipient.mailbox == Address("postmaster", "test.ru")
