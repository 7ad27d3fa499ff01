"""Bounces: RFC 3464 delivery status notifications for recipients that failed for good.

A DSN is a multipart/report (RFC 6522) from MAILER-DAEMON: a note for people, a
message/delivery-status part with one block per failed recipient, and the original headers
(text/rfc822-headers, RFC 6522 4) read from the first octets of the spool file. It is never
sent for mail from <> (RFC 5321 4.5.5: no bounce loops). It goes to the sender, or, for a
local sender without a mailbox, to the postmaster of that domain, and enters the system the
one way all mail does: `submit(envelope, message)`.
"""
import email.charset             # noqa: F401  (the lazily imported parts of `email`:
import email.encoders            # noqa: F401   imported here, before a privilege drop)
import email.generator
import email.policy
import email.utils
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import NamedTuple

from address import NULL_ADDRESS, Address
from envelope import Envelope, Recipient
from routing import Destination

MAX_ORIGINAL_HEADERS = 1 << 16      # octets of the original read for its headers
MAX_LINE = 998                      # RFC 5322 2.1.1: octets a line, without CRLF
FOLD_AT = 900                       # where an over-long escaped header line is folded


class Failure(NamedTuple):
    """One recipient that failed for good, as the record tells it."""
    address: str            # the recipient's address text
    reply: str              # the last reply (the remote's or our own)
    remote: str             # "ip:port" of the host that gave it, "" if none did
    last_attempt: float     # when


class Bouncer:
    def __init__(self, hostname, router, submit, log):
        self.hostname = hostname
        self.router = router
        self.submit = submit            # (Envelope, message bytes) -> stored and queued
        self.log = log

    def send(self, message, failures, now):
        """Build and submit a DSN for `failures` ([Failure]) of `message`
        (spool.SpooledMessage). Returns its envelope; None for mail from <>, which is never
        bounced. Raises whatever building or storing it raises."""
        sender = message.envelope.reverse_path
        if sender.is_null:
            return None
        dsn = build_dsn(self.hostname, message.queue_id, message.created, sender,
                        original_headers(message.read_text(MAX_ORIGINAL_HEADERS)),
                        failures, now)
        envelope = Envelope(reverse_path=NULL_ADDRESS, helo=self.hostname, client=None,
                            recipients=[bounce_recipient(self.router, sender)])
        self.submit(envelope, dsn)
        return envelope


def bounce_recipient(router, sender):
    """RFC 3464 2: the DSN goes to the sender; a local sender without a mailbox has it
    read by the postmaster of the domain (RFC 5321 4.5.1)."""
    route = router.route(sender)
    if route.destination is Destination.REMOTE:
        return Recipient(sender)
    if route.destination is Destination.LOCAL:
        return Recipient(sender, mailbox=route.mailbox)
    postmaster = router.postmaster(sender.domain)
    return Recipient(postmaster, mailbox=router.route(postmaster).mailbox)


def build_dsn(hostname, queue_id, arrival, sender: Address, headers, failures, now):
    """The DSN as bytes with CRLF line ends, ready for submit()."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = f"<{sender.text}>"
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = email.utils.formatdate(now, localtime=True)
    report["Message-ID"] = email.utils.make_msgid("dsn", domain=hostname)
    report["Auto-Submitted"] = "auto-replied"                     # RFC 3834 5
    lines = [f"This is the mail system at {hostname}.", "",
             "Your message could not be delivered to these recipients:", ""]
    lines += [f"<{failure.address}>: {failure.reply}" for failure in failures]
    report.attach(MIMEText("\n".join(lines) + "\n", "plain", "us-ascii"))
    report.attach(_delivery_status(hostname, queue_id, arrival, failures))
    original = Message()
    original.set_type("text/rfc822-headers")                      # RFC 6522 4
    original.set_payload(headers)
    report.attach(original)
    return report.as_bytes(policy=email.policy.SMTP)


def _delivery_status(hostname, queue_id, arrival, failures):
    status = Message()
    status.set_type("message/delivery-status")                    # RFC 3464 2
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"             # RFC 3464 2.2
    per_message["X-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = email.utils.formatdate(arrival, localtime=True)
    blocks = [per_message]
    for failure in failures:                                      # RFC 3464 2.3
        per_recipient = Message()
        per_recipient["Final-Recipient"] = f"rfc822; {failure.address}"
        per_recipient["Action"] = "failed"
        per_recipient["Status"] = enhanced_status(failure.reply, default="5.0.0")
        if failure.remote:
            per_recipient["Remote-MTA"] = f"dns; {failure.remote.rpartition(':')[0]}"
        per_recipient["Diagnostic-Code"] = f"smtp; {failure.reply}"
        per_recipient["Last-Attempt-Date"] = email.utils.formatdate(failure.last_attempt,
                                                                    localtime=True)
        blocks.append(per_recipient)
    status.set_payload(blocks)
    return status


def enhanced_status(reply, default):
    """"550 5.1.1 no such user" -> "5.1.1" (RFC 3463)."""
    parts = reply.split(" ", 2)
    if len(parts) > 1 and parts[1].count(".") == 2 and parts[1][0] in "245":
        return parts[1]
    return default


def original_headers(text):
    """The header block of a dot-stuffed text (its first octets) as ASCII lines with LF:
    dot-stuffing undone, 8-bit bytes shown escaped (a DSN part must stay ASCII to be sent
    anywhere), over-long lines folded."""
    end = text.find(b"\r\n\r\n")
    if end >= 0:
        block = text[:end]
    else:                               # no end of the headers in what was read
        block = text[:text.rfind(b"\r\n")] if b"\r\n" in text else text
    lines = []
    for line in block.split(b"\r\n"):
        if line.startswith(b"."):       # RFC 5321 4.5.2: undo the transparency dot
            line = line[1:]
        lines += _fold(line.decode("ascii", "backslashreplace"))
    return "".join(line + "\n" for line in lines)


def _fold(line):
    """A line longer than RFC 5322 allows, as a header folded with a leading tab."""
    if len(line) <= MAX_LINE:
        return [line]
    pieces = [line[start:start + FOLD_AT] for start in range(0, len(line), FOLD_AT)]
    return [pieces[0]] + ["\t" + piece for piece in pieces[1:]]


def preload(hostname="localhost.invalid"):
    """Build one DSN, so that every part of `email` it needs is imported now (before the
    server drops its privileges and may no longer read the standard library)."""
    failure = Failure("someone@example.invalid", "550 5.1.1 sample", "192.0.2.1:25", 0.0)
    dsn = build_dsn(hostname, "preload", 0.0, Address("sender", "example.invalid"),
                    original_headers(b"Subject: \xd0\xbf\r\n\r\n"), [failure], 0.0)
    email.message_from_bytes(dsn, policy=email.policy.default)
    return dsn
