"""bounce.py: RFC 3464 DSNs of every action, parsed back with `email`, and who they go to."""
import email
import email.policy

import pytest

import dsn
from address import NULL_ADDRESS, Address
from bounce import MAX_RETURNED_MESSAGE, Bouncer, Notice, bounce_recipient, original_headers
from envelope import Envelope, Recipient
from tests.queue_world import (RecordingSubmit, delivery_status, envelope_of, make_log,
                               make_router, make_spool, write_spool)

NOW = 1_800_000_000.0
BOB, CAROL = "bob@remote.test", "carol@remote.test"
NO_SUCH_USER = "550 5.1.1 <bob@remote.test>: no such user"
TEXT = (b"From: <alice@test.ru>\r\nSubject: will bounce\r\nX-Dots: .\r\n"
        b".starts with a dot: yes\r\n\r\nSECRET BODY\r\n.dot line\r\n")


@pytest.fixture
def spool(tmp_path):
    return make_spool(tmp_path)


@pytest.fixture
def bouncer(tmp_path):
    return Bouncer("mail.test.ru", make_router(), RecordingSubmit(), make_log(tmp_path))


def spooled(spool, recipients=(BOB, CAROL), sender="alice@test.ru", text=TEXT, **arguments):
    return spool.read(write_spool(spool, list(recipients), sender=sender, text=text,
                                  created=NOW - 60, **arguments))


def failure(recipient, reply=NO_SUCH_USER, remote="127.0.0.2:2526"):
    return Notice.from_reply(recipient, dsn.FAILED, reply, remote, NOW)


def send_failures(bouncer, message, replies=(NO_SUCH_USER,)):
    """Bounce the first recipients of `message`, one per reply."""
    notices = [failure(recipient, reply)
               for recipient, reply in zip(message.recipients, replies)]
    return bouncer.send(message, notices, NOW)


def parsed(submit, index=0):
    return email.message_from_bytes(submit.submitted[index][1], policy=email.policy.default)


def returned_part(report):
    return list(report.iter_parts())[2]


def test_a_dsn_is_a_multipart_report_with_one_block_per_recipient(bouncer, spool):
    message = spooled(spool)
    send_failures(bouncer, message, (NO_SUCH_USER, "451 4.4.1 no answer (gave up: ...)"))
    report = parsed(bouncer.submit)
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@mail.test.ru>"
    assert report["To"].addresses[0].addr_spec == "alice@test.ru"
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert report["Auto-Submitted"] == "auto-replied"
    per_message, bob_fields, carol_fields = delivery_status(report)
    assert per_message["Reporting-MTA"] == "dns; mail.test.ru"
    assert per_message["Arrival-Date"] == email.utils.formatdate(NOW - 60, localtime=True)
    assert per_message["Original-Envelope-Id"] is None
    assert bob_fields["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob_fields["Original-Recipient"] is None
    assert bob_fields["Action"] == "failed"
    assert bob_fields["Status"] == "5.1.1"
    assert bob_fields["Remote-MTA"] == "dns; 127.0.0.2"
    assert bob_fields["Diagnostic-Code"] == f"smtp; {NO_SUCH_USER}"
    assert bob_fields["Last-Attempt-Date"] == email.utils.formatdate(NOW, localtime=True)
    assert bob_fields["Will-Retry-Until"] is None
    assert carol_fields["Status"] == "4.4.1"
    note = list(report.iter_parts())[0]
    assert "could not be delivered" in note.get_content()
    assert "<carol@remote.test>: 451 4.4.1 no answer" in note.get_content()
    data = bouncer.submit.submitted[0][1]
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")


def test_the_dsn_envelope_comes_from_the_null_sender_with_no_client(bouncer, spool):
    envelope = send_failures(bouncer, spooled(spool))
    assert bouncer.submit.submitted[0][0] is envelope
    assert envelope.reverse_path == NULL_ADDRESS
    assert envelope.helo == "mail.test.ru" and envelope.client is None
    assert envelope.parameters == {}
    assert [(r.address.text, r.mailbox) for r in envelope.recipients] == [
        ("alice@test.ru", Address("alice", "test.ru"))]


def test_the_original_headers_come_back_without_the_body(bouncer, spool):
    text = TEXT.replace(b"X-Dots: .\r\n", b"X-Dots: .\r\nX-8bit: \xd0\x9f\xd1\x80\xd0\xb8\r\n")
    send_failures(bouncer, spooled(spool, text=text))
    part = returned_part(parsed(bouncer.submit))
    assert part.get_content_type() == "text/rfc822-headers"
    content = part.get_content().replace("\r\n", "\n")
    assert content.startswith("From: <alice@test.ru>\nSubject: will bounce\nX-Dots: .\n")
    assert "\n.starts with a dot: yes\n" in content          # dot-stuffing undone
    assert "X-8bit: \\xd0\\x9f\\xd1\\x80\\xd0\\xb8\n" in content
    assert "SECRET BODY" not in content
    assert bouncer.submit.submitted[0][1].isascii()


@pytest.mark.parametrize("ret", ["FULL", "full"])
def test_ret_full_returns_the_whole_message(bouncer, spool, ret):
    text = TEXT + b"8-bit: \xd0\xbf\r\n" + b"X" * 200 + b"\r\n"
    envelope = send_failures(bouncer, spooled(spool, text=text, parameters={"RET": ret}))
    report = parsed(bouncer.submit)
    part = returned_part(report)
    assert part.get_content_type() == "message/rfc822"
    assert part["Content-Transfer-Encoding"] == "8bit"
    returned = part.get_payload(0)
    assert returned["Subject"] == "will bounce" and returned["X-Dots"] == "."
    data = bouncer.submit.submitted[0][1]
    assert b"\r\n\r\n" + text + b"\r\n--" in data            # every octet, unstuffed
    assert envelope.parameters == {"BODY": "8BITMIME"}      # RFC 6152: the DSN is 8-bit


def test_ret_hdrs_returns_the_headers(bouncer, spool):
    send_failures(bouncer, spooled(spool, parameters={"RET": "HDRS"}))
    part = returned_part(parsed(bouncer.submit))
    assert part.get_content_type() == "text/rfc822-headers"
    assert "SECRET BODY" not in part.get_content()


def test_ret_full_above_the_limit_returns_the_headers(bouncer, spool):
    text = TEXT + b"x" * 76 + b"\r\n"
    text += (b"y" * 998 + b"\r\n") * (MAX_RETURNED_MESSAGE // 1000 + 1)
    assert len(text) > MAX_RETURNED_MESSAGE
    send_failures(bouncer, spooled(spool, text=text, parameters={"RET": "FULL"}))
    assert returned_part(parsed(bouncer.submit)).get_content_type() == "text/rfc822-headers"
    assert len(bouncer.submit.submitted[0][1]) < 10000


def test_ret_full_returns_headers_only_in_a_success_or_delay_notice(bouncer, spool):
    message = spooled(spool, recipients=[(BOB, {"NOTIFY": "SUCCESS,DELAY"})],
                      parameters={"RET": "FULL"})
    bob = message.recipients[0]
    bouncer.send(message, [Notice.from_reply(bob, dsn.RELAYED, "250 2.0.0 ok")], NOW)
    bouncer.send(message, [Notice.from_reply(bob, dsn.DELAYED, "451 4.4.1 down")], NOW)
    for index in (0, 1):
        part = returned_part(parsed(bouncer.submit, index))
        assert part.get_content_type() == "text/rfc822-headers"


def test_envid_and_orcpt_come_back_decoded(bouncer, spool):
    message = spooled(spool, recipients=[(BOB, {"ORCPT": "rfc822;Bob+2BOld@Remote.test"})],
                      parameters={"ENVID": "QQ+3D314159", "RET": "HDRS"})
    send_failures(bouncer, message)
    per_message, fields = delivery_status(parsed(bouncer.submit))
    assert per_message["Original-Envelope-Id"] == "QQ=314159"
    assert fields["Original-Recipient"] == "rfc822;Bob+Old@Remote.test"
    assert fields["Final-Recipient"] == "rfc822; bob@remote.test"


def test_an_envid_that_decodes_to_control_characters_is_kept_as_sent(bouncer, spool):
    message = spooled(spool, parameters={"ENVID": "a+0D+0AX-Injected:+20yes"})
    send_failures(bouncer, message)
    per_message = delivery_status(parsed(bouncer.submit))[0]
    assert per_message["Original-Envelope-Id"] == "a+0D+0AX-Injected:+20yes"
    assert per_message["X-Injected"] is None


@pytest.mark.parametrize("notify, sent", [(None, True), ("FAILURE", True),
                                          ("SUCCESS,FAILURE", True), ("NEVER", False),
                                          ("SUCCESS,DELAY", False)])
def test_a_failure_notice_only_for_a_recipient_that_wants_it(bouncer, spool, notify, sent):
    bob = (BOB, {"NOTIFY": notify}) if notify else BOB
    envelope = send_failures(bouncer, spooled(spool, recipients=[bob]))
    assert (envelope is not None) is sent
    assert bouncer.submit.calls == (1 if sent else 0)


def test_only_the_recipients_that_want_it_are_in_the_report(bouncer, spool):
    message = spooled(spool, recipients=[(BOB, {"NOTIFY": "NEVER"}), CAROL])
    send_failures(bouncer, message, (NO_SUCH_USER, "550 5.1.1 no carol"))
    fields = delivery_status(parsed(bouncer.submit))[1:]
    assert [block["Final-Recipient"] for block in fields] == ["rfc822; carol@remote.test"]


@pytest.mark.parametrize("action, subject, words", [
    (dsn.DELAYED, "Delayed Mail (still being retried)", "has not been delivered"),
    (dsn.RELAYED, "Successful Mail Delivery Report", "sends no delivery notices"),
    (dsn.DELIVERED, "Successful Mail Delivery Report", "delivered to the mailbox")])
def test_each_action_is_worded_for_people(bouncer, spool, action, subject, words):
    message = spooled(spool, recipients=[(BOB, {"NOTIFY": "SUCCESS,DELAY"})])
    retry_until = NOW + 3600 if action == dsn.DELAYED else None
    reply = "451 4.4.1 no answer" if action == dsn.DELAYED else "250 2.0.0 queued"
    bouncer.send(message, [Notice.from_reply(message.recipients[0], action, reply,
                                             "127.0.0.2:25", NOW, retry_until)], NOW)
    report = parsed(bouncer.submit)
    assert report["Subject"] == subject
    assert words in list(report.iter_parts())[0].get_content()
    fields = delivery_status(report)[1]
    assert fields["Action"] == action
    assert fields["Status"] == ("4.4.1" if action == dsn.DELAYED else "2.0.0")
    assert fields["Will-Retry-Until"] == (
        email.utils.formatdate(retry_until, localtime=True) if retry_until else None)


def test_the_receiving_side_calls_it_with_an_envelope_and_the_headers(bouncer):
    """A local delivery with NOTIFY=SUCCESS: no spool file, the header block as bytes."""
    envelope = envelope_of("dave@elsewhere.test", [], {"ENVID": "local-1"})
    alice = Recipient(Address("alice", "test.ru"), {"NOTIFY": "SUCCESS"},
                      mailbox=Address("alice", "test.ru"))
    envelope.recipients.append(alice)
    envelope.queue_id = "0123456789abcdef"
    headers = b"Subject: hello\r\nFrom: <dave@elsewhere.test>\r\n\r\n"
    notice = Notice(alice, dsn.DELIVERED, "2.0.0", "250 2.0.0 delivered to mailbox")
    dsn_envelope = bouncer.notify(envelope, [notice], headers, NOW)
    assert [r.address.text for r in dsn_envelope.recipients] == ["dave@elsewhere.test"]
    report = parsed(bouncer.submit)
    per_message, fields = delivery_status(report)
    assert per_message["Original-Envelope-Id"] == "local-1"
    assert per_message["X-Queue-ID"] == "0123456789abcdef"
    assert per_message["Arrival-Date"] == email.utils.formatdate(NOW, localtime=True)
    assert (fields["Action"], fields["Status"]) == ("delivered", "2.0.0")
    assert fields["Remote-MTA"] is None and fields["Last-Attempt-Date"] is None
    assert returned_part(report).get_content() == \
        "Subject: hello\r\nFrom: <dave@elsewhere.test>\r\n"


def test_a_non_ascii_recipient_and_sender(bouncer, spool):
    message = spooled(spool, recipients=["jörg@remote.test"], sender="böb@elsewhere.test",
                      parameters={"SMTPUTF8": None})
    envelope = send_failures(bouncer, message, ("550 5.6.7 no SMTPUTF8 there",))
    # RFC 6531 3.4: to a UTF-8 address; its UTF-8 header needs an 8-bit path (RFC 6532 3.1)
    assert envelope.parameters == {"SMTPUTF8": None, "BODY": "8BITMIME"}
    report = parsed(bouncer.submit)
    assert b"\r\nTo: <b\xc3\xb6b@elsewhere.test>\r\n" in bouncer.submit.submitted[0][1]
    fields = delivery_status(report)[1]
    assert fields["Final-Recipient"] == "utf-8; j\\x{F6}rg@remote.test"   # RFC 6533 3
    assert fields["Status"] == "5.6.7"


def test_original_headers_of_a_large_message_are_cut_at_a_whole_line():
    text = b"Subject: huge\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n"
    assert original_headers(text[:1 << 16]) == "Subject: huge\n"
    long_line = original_headers(b"X-8: " + b"\xff" * 900 + b"\r\n\r\n")
    assert max(len(line) for line in long_line.split("\n")) <= 998
    assert long_line.split("\n")[1].startswith("\t")


def test_a_local_sender_without_a_mailbox_has_postmaster_read_it(bouncer, spool):
    envelope = send_failures(bouncer, spooled(spool, sender="gone@test.ru"))
    assert [(r.address.text, r.mailbox) for r in envelope.recipients] == [
        ("postmaster@test.ru", Address("postmaster", "test.ru"))]


def test_a_remote_sender_is_bounced_to_through_the_relay(bouncer, spool):
    envelope = send_failures(bouncer, spooled(spool, sender="Dave@Elsewhere.test"))
    assert [(r.address.text, r.mailbox) for r in envelope.recipients] == [
        ("Dave@elsewhere.test", None)]
    assert parsed(bouncer.submit)["To"].addresses[0].addr_spec == "Dave@elsewhere.test"


@pytest.mark.parametrize("action", [dsn.FAILED, dsn.DELAYED, dsn.RELAYED, dsn.DELIVERED])
def test_never_a_notice_for_the_null_sender(bouncer, spool, action):
    message = spooled(spool, recipients=[(BOB, {"NOTIFY": "SUCCESS,FAILURE,DELAY"})],
                      sender="")
    notice = Notice.from_reply(message.recipients[0], action, "250 2.0.0 or not")
    assert bouncer.send(message, [notice], NOW) is None
    assert bouncer.notify(message.envelope, [notice], b"Subject: x\r\n\r\n", NOW) is None
    assert bouncer.submit.calls == 0


def test_a_submit_that_fails_raises_to_the_caller(tmp_path, spool):
    submit = RecordingSubmit(failures=1)
    bouncer = Bouncer("mail.test.ru", make_router(), submit, make_log(tmp_path))
    with pytest.raises(OSError):
        send_failures(bouncer, spooled(spool))


def test_bounce_recipient_for_a_postmaster_sender():
    recipient = bounce_recipient(make_router(), Address("PostMaster", "test.ru"))
    assert recipient.mailbox == Address("postmaster", "test.ru")


def test_a_notice_for_an_envelope_without_a_queue_id_has_no_queue_field(bouncer):
    bob = Recipient(Address("bob", "remote.test"))
    envelope = Envelope(Address("alice", "test.ru"), "client.example", None, {}, [bob])
    bouncer.notify(envelope, [failure(bob)], b"Subject: x\r\n\r\n", NOW, arrival=NOW - 5)
    per_message = delivery_status(parsed(bouncer.submit))[0]
    assert per_message["X-Queue-ID"] is None
    assert per_message["Arrival-Date"] == email.utils.formatdate(NOW - 5, localtime=True)
