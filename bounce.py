"""Delivery status notifications (RFC 3461, RFC 3464): one builder for every action.

    notice = Notice(recipient, dsn.FAILED, "5.1.1", "550 5.1.1 no such user", "192.0.2.1:25",
                    last_attempt)
    bouncer.notify(envelope, [notice], header_block, now)      # its Envelope, or None

A DSN is a multipart/report (RFC 6522) from MAILER-DAEMON: a note for people worded for the
action (failed, delayed, delivered, relayed), a message/delivery-status part with one block
per recipient (RFC 3464 2), and the original: its headers (text/rfc822-headers, RFC 6522 4),
or, for a failure when the sender asked RET=FULL, the whole message (message/rfc822; RFC 3461
4.3). Who gets a notice of what is `dsn.wants`, applied here to every notice; none is ever
sent for mail from <> (RFC 5321 4.5.5, RFC 3461 6.1: notices are sent from <> and never bounce
themselves). A DSN goes to the sender, or, for a local sender without a mailbox, to the
postmaster of that domain, and enters the system the one way all mail does:
`submit(envelope, message)`.
"""
import email.charset             # noqa: F401  (the lazily imported parts of `email`:
import email.encoders            # noqa: F401   imported here, before a privilege drop)
import email.generator
import email.policy
import email.utils
import secrets
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import NamedTuple, Optional

import dsn
import spool
from address import NULL_ADDRESS, Address
from envelope import Envelope, Recipient
from routing import Destination

MAX_ORIGINAL_HEADERS = 1 << 16      # octets of the original read for its headers
MAX_RETURNED_MESSAGE = 1 << 20      # RET=FULL: a larger message returns its headers only
MAX_LINE = 998                      # RFC 5322 2.1.1: octets a line, without CRLF
FOLD_AT = 900                       # where an over-long escaped header line is folded

# The note for people, per action (RFC 3464 2.3.3), in the order a subject is chosen by
SEVERITY = (dsn.FAILED, dsn.DELAYED, dsn.RELAYED, dsn.DELIVERED)
SUBJECTS = {
    dsn.FAILED: "Undelivered Mail Returned to Sender",
    dsn.DELAYED: "Delayed Mail (still being retried)",
    dsn.RELAYED: "Successful Mail Delivery Report",
    dsn.DELIVERED: "Successful Mail Delivery Report",
}
WORDING = {
    dsn.FAILED: "Your message could not be delivered to these recipients, and will not be "
                "tried again:",
    dsn.DELAYED: "Your message has not been delivered to these recipients yet. The mail "
                 "system keeps trying; you need not send it again:",
    dsn.RELAYED: "Your message was passed on to the mail system of these recipients, which "
                 "sends no delivery notices; this is the last you will hear of it from us:",
    dsn.DELIVERED: "Your message was delivered to the mailbox of these recipients:",
}
DEFAULT_STATUS = {dsn.FAILED: "5.0.0", dsn.DELAYED: "4.0.0", dsn.RELAYED: "2.0.0",
                  dsn.DELIVERED: "2.0.0"}


class Notice(NamedTuple):
    """What one DSN says about one recipient (RFC 3464 2.3)."""
    recipient: Recipient            # as the sender gave it (its NOTIFY and ORCPT at hand)
    action: str                     # dsn.FAILED, dsn.DELAYED, dsn.DELIVERED, dsn.RELAYED
    status: str                     # RFC 3463: "5.1.1"
    diagnostic: str = ""            # the reply that tells it, ours or the remote's; "": none
    remote: str = ""                # "ip:port" of the host that gave it; "": none
    last_attempt: Optional[float] = None
    retry_until: Optional[float] = None     # delayed: when the relay will give up

    @classmethod
    def from_reply(cls, recipient, action, reply, remote="", last_attempt=None,
                   retry_until=None):
        """A notice whose status is the enhanced code of `reply` ("550 5.1.1 ...")."""
        return cls(recipient, action, enhanced_status(reply, DEFAULT_STATUS[action]), reply,
                   remote, last_attempt, retry_until)


class Bouncer:
    def __init__(self, hostname, router, submit, log):
        self.hostname = hostname
        self.router = router
        self.submit = submit            # (Envelope, message bytes) -> stored and queued
        self.log = log

    def notify(self, envelope, notices, original, now, arrival=None, whole_message=None):
        """Build and submit one DSN for the `notices` ([Notice]) of the recipients of
        `envelope` that want them (dsn.wants). `original` is the message's header block
        (CRLF line ends, not dot-stuffed, its last line ended; what follows the first empty
        line is cut off). `whole_message` is the whole message, in the same form, for a
        failure notice when the sender asked RET=FULL (None: its headers are returned).
        `arrival` (default `now`) is when the message was accepted. Returns the DSN's
        envelope; None when no notice is wanted or the sender is <>. Raises whatever
        building or storing it raises."""
        sender = envelope.reverse_path
        wanted = [notice for notice in notices if dsn.wants(notice.recipient, notice.action)]
        if sender.is_null or not wanted:
            return None
        returned = whole_message if returns_whole(envelope, wanted) else None
        report = build_dsn(self.hostname, envelope, wanted, original, returned, now,
                           now if arrival is None else arrival)
        recipient = bounce_recipient(self.router, sender)
        parameters = {}
        if not report.isascii():                          # the returned message is 8-bit
            parameters["BODY"] = "8BITMIME"               # RFC 6152 2
        if not recipient.address.is_ascii:
            parameters["SMTPUTF8"] = None                 # RFC 6531 3.4
        dsn_envelope = Envelope(reverse_path=NULL_ADDRESS, helo=self.hostname, client=None,
                                parameters=parameters, recipients=[recipient])
        self.submit(dsn_envelope, report)
        return dsn_envelope

    def send(self, message, notices, now):
        """notify() for a spooled message (spool.SpooledMessage): its text read from the
        spool file as much as the notices need, dot-stuffing undone."""
        envelope = message.envelope
        head = b"".join(spool.unstuffed([message.read_text(MAX_ORIGINAL_HEADERS)]))
        whole = None
        if returns_whole(envelope, notices) and message.text_size <= MAX_RETURNED_MESSAGE:
            whole = b"".join(spool.unstuffed(message.text_chunks()))
        return self.notify(envelope, notices, head, now, message.created, whole)


def returns_whole(envelope, notices):
    """RFC 3461 4.3: RET=FULL returns the whole message, in a failure notice only."""
    return dsn.returns_full_message(envelope) and \
        any(notice.action == dsn.FAILED for notice in notices)


def bounce_recipient(router, sender):
    """RFC 3464 2: the DSN goes to the sender; a local sender without a mailbox has it
    read by the postmaster of the domain (RFC 5321 4.5.1)."""
    route = router.route(sender)
    if route.destination is not Destination.UNKNOWN:     # a mailbox, an alias, or remote
        return route.recipient(sender)
    postmaster = router.postmaster(sender.domain)
    return router.route(postmaster).recipient(postmaster)


# ---------------------------------------------------------------------------------------
# The DSN itself


def build_dsn(hostname, envelope, notices, original, whole_message, now, arrival):
    """The DSN as bytes with CRLF line ends, ready for submit(). `whole_message` None:
    the headers of `original` are returned."""
    sender = envelope.reverse_path
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = f"<{sender.text}>"
    report["Subject"] = SUBJECTS[min((notice.action for notice in notices),
                                     key=SEVERITY.index)]
    report["Date"] = email.utils.formatdate(now, localtime=True)
    report["Message-ID"] = email.utils.make_msgid("dsn", domain=hostname)
    report["Auto-Submitted"] = "auto-replied"                     # RFC 3834 5
    note = _note(hostname, notices)
    report.attach(MIMEText(note, "plain", "us-ascii" if note.isascii() else "utf-8"))
    report.attach(_delivery_status(hostname, envelope, notices, arrival))
    placeholder = f"smtpd-returned-message-{secrets.token_hex(16)}"
    report.attach(_returned(original, whole_message, placeholder))
    report.set_boundary(_boundary(whole_message or b""))
    # A non-ASCII sender in To: needs UTF-8 headers, as its envelope needs SMTPUTF8
    policy = email.policy.SMTP if sender.is_ascii else email.policy.SMTPUTF8
    data = report.as_bytes(policy=policy)
    if whole_message is None:
        return data
    # `email` would refold the original's headers and cannot write its 8-bit octets: its
    # bytes go in unchanged where the placeholder stands
    return data.replace(placeholder.encode("ascii"), whole_message, 1)


def _boundary(content):
    """A MIME boundary that does not occur in `content` (RFC 2046 5.1.1)."""
    for _ in range(8):
        boundary = f"=_smtpd_{secrets.token_hex(12)}"
        if boundary.encode("ascii") not in content:
            return boundary
    raise ValueError("no MIME boundary found that the returned message lacks")


def _note(hostname, notices):
    """The first part: what happened, in words, one paragraph per action."""
    lines = [f"This is the mail system at {hostname}.", ""]
    for action in SEVERITY:
        mine = [notice for notice in notices if notice.action == action]
        if not mine:
            continue
        lines += [WORDING[action], ""]
        for notice in mine:
            line = f"<{notice.recipient.address.text}>"
            if notice.diagnostic:
                line += f": {notice.diagnostic}"
            if notice.retry_until:
                line += (" (tried until "
                         f"{email.utils.formatdate(notice.retry_until, localtime=True)})")
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def _delivery_status(hostname, envelope, notices, arrival):
    status = Message()
    status.set_type("message/delivery-status")                    # RFC 3464 2
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"             # RFC 3464 2.2.2
    envelope_id = dsn.envelope_id(envelope)
    if envelope_id is not None:                                   # RFC 3464 2.2.1
        per_message["Original-Envelope-Id"] = _printable(envelope_id,
                                                         envelope.parameters["ENVID"])
    if envelope.queue_id:
        per_message["X-Queue-ID"] = envelope.queue_id
    per_message["Arrival-Date"] = email.utils.formatdate(arrival, localtime=True)
    status.set_payload([per_message] + [_per_recipient(notice) for notice in notices])
    return status


def _per_recipient(notice):
    """RFC 3464 2.3: the fields of one recipient, in the order of the RFC."""
    fields = Message()
    orcpt = notice.recipient.parameters.get("ORCPT")
    if orcpt:                                                     # RFC 3464 2.3.1
        address_type, address = dsn.original_recipient(orcpt)
        fields["Original-Recipient"] = f"{address_type};{_printable(address, orcpt)}"
    fields["Final-Recipient"] = address_field(notice.recipient.address)   # 2.3.2
    fields["Action"] = notice.action                                      # 2.3.3
    fields["Status"] = notice.status                                      # 2.3.4
    if notice.remote:                                                     # 2.3.5
        fields["Remote-MTA"] = f"dns; {notice.remote.rpartition(':')[0]}"
    if notice.diagnostic:                                                 # 2.3.6
        fields["Diagnostic-Code"] = f"smtp; {notice.diagnostic}"
    if notice.last_attempt:                                               # 2.3.7
        fields["Last-Attempt-Date"] = email.utils.formatdate(notice.last_attempt,
                                                             localtime=True)
    if notice.retry_until:                                                # 2.3.9
        fields["Will-Retry-Until"] = email.utils.formatdate(notice.retry_until,
                                                            localtime=True)
    return fields


def address_field(address: Address):
    """`rfc822; bob@example.org`; a non-ASCII address as RFC 6533 3 writes it in an ASCII
    report: `utf-8; j\\x{F6}rg@example.org` (utf-8-addr-xtext)."""
    if address.is_ascii:
        return f"rfc822; {address.text}"
    return "utf-8; " + "".join(
        char if "!" <= char <= "~" and char not in "+=\\" else f"\\x{{{ord(char):X}}}"
        for char in address.text)


def _printable(decoded, as_sent):
    """A decoded xtext value for a report field: as decoded when it is printable ASCII (as
    RFC 3461 4.4 wants ENVID), else as the client sent it (xtext is always printable)."""
    return decoded if decoded.isascii() and decoded.isprintable() else as_sent


def _returned(original, whole_message, placeholder):
    """The third part: the headers of `original`, or `whole_message`, whose bytes replace
    `placeholder` once the report is written."""
    if whole_message is None:
        part = Message()
        part.set_type("text/rfc822-headers")                      # RFC 6522 4
        part.set_payload(original_headers(original))
        return part
    part = Message()
    # RFC 6532 3.7: a message with UTF-8 in its header block is message/global
    utf8_headers = spool.text_shape([whole_message]).eight_bit_headers
    part.set_type("message/global" if utf8_headers else "message/rfc822")
    # RFC 2046 5.2.1: no encoding but 7bit or 8bit
    part["Content-Transfer-Encoding"] = "7bit" if whole_message.isascii() else "8bit"
    part.set_payload(placeholder)
    return part


def enhanced_status(reply, default):
    """"550 5.1.1 no such user" -> "5.1.1" (RFC 3463)."""
    parts = reply.split(" ", 2)
    if len(parts) > 1 and parts[1].count(".") == 2 and parts[1][0] in "245":
        return parts[1]
    return default


def original_headers(text):
    """The header block of a text (its first octets, CRLF, not dot-stuffed) as ASCII lines
    with LF: 8-bit bytes shown escaped (the part must stay ASCII to be sent anywhere),
    over-long lines folded."""
    end = text.find(b"\r\n\r\n")
    if end >= 0:
        block = text[:end]
    else:                               # no end of the headers in what was read
        block = text[:text.rfind(b"\r\n")] if b"\r\n" in text else text
    lines = []
    for line in block.split(b"\r\n"):
        lines += _fold(line.decode("ascii", "backslashreplace"))
    return "".join(line + "\n" for line in lines)


def _fold(line):
    """A line longer than RFC 5322 allows, as a header folded with a leading tab."""
    if len(line) <= MAX_LINE:
        return [line]
    pieces = [line[start:start + FOLD_AT] for start in range(0, len(line), FOLD_AT)]
    return [pieces[0]] + ["\t" + piece for piece in pieces[1:]]


def preload(hostname="localhost.invalid"):
    """Build a DSN of every kind, so that every part of `email` they need is imported now
    (before the server drops its privileges and may no longer read the standard library)."""
    sender = Address("s\u00e9nder", "example.invalid")
    recipient = Recipient(Address("someone", "example.invalid"),
                          {"NOTIFY": "SUCCESS,FAILURE,DELAY",
                           "ORCPT": "rfc822;someone@example.invalid"})
    envelope = Envelope(sender, hostname, None, {"RET": "FULL", "ENVID": "preload"},
                        [recipient], "preload")
    notices = [Notice.from_reply(recipient, action, "550 5.1.1 sample", "192.0.2.1:25", 1.0,
                                 2.0) for action in SEVERITY]
    text = b"Subject: \xd0\xbf\r\n\r\nbody \xd0\xbf\r\n"
    built = [build_dsn(hostname, envelope, notices, text, whole, 0.0, 0.0)
             for whole in (None, text)]
    for data in built:
        email.message_from_bytes(data, policy=email.policy.default)
    return built[0]
