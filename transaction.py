"""The mail transaction (RFC 5321 3.3): the handlers of MAIL, RCPT, DATA and BDAT, and the
envelope and message text they build.

The checks of incoming mail (`policy.checks`, checks.py) come in at three points: MAIL
decides whether this client's mail is checked (`session.findings`), the first RCPT for a
local mailbox checks SPF, and the end of the text DKIM and DMARC, before it is stored.

Like every handler, each takes (session, argument) and returns a Reply; the table in state.py
says where the session goes next. The envelope is built up here and handed, with the text
as it arrives, to the mail system through `policy.open_message` and `policy.submit`.
"""
import ipaddress
from typing import NamedTuple, Optional

import dsn
import ids
import replies
from address import (AddressError, NeedsSmtputf8, parse_parameters, parse_path,
                     split_path_and_parameters)
from envelope import Envelope
from replies import ReadChunk
from routing import Destination, delivered_to_loop
from storage import StorageError
from text import MAX_RECEIVED_HEADERS, ChunkedText, MessageText, received_header
from verbs import VERBS


class Chunk(NamedTuple):
    """A BDAT command whose octets are being read (RFC 3030 2)."""
    octets: int
    last: bool
    refusal: Optional[replies.Reply] = None     # the reply once they are read, if refused



def mail(session, argument):
    if session.policy.auth_required and not session.authenticated:
        return replies.AUTH_REQUIRED        # RFC 6409 4.3: submission needs AUTH
    path_text = _after_keyword(argument, "FROM:")
    if path_text is None:
        return replies.SYNTAX.format(syntax=VERBS["MAIL"].syntax)
    path_text, parameter_text = split_path_and_parameters(path_text)
    try:
        parameters = parse_parameters(parameter_text)
        # RFC 6531 3.3: the SMTPUTF8 parameter allows UTF-8 in this very path, and after
        reverse_path = parse_path(path_text, allow_null=True, utf8="SMTPUTF8" in parameters)
    except NeedsSmtputf8:
        return replies.NEEDS_SMTPUTF8
    except AddressError as problem:
        return replies.BAD_SENDER.format(problem=problem)
    refusal = _check_mail_parameters(session, parameters)
    if refusal:
        return refusal
    parameters.pop("AUTH", None)            # RFC 4954 5: accepted, and not passed on
    may_send_as = session.policy.may_send_as
    if session.authenticated and may_send_as and not may_send_as(session.authenticated,
                                                                  reverse_path):
        return replies.NOT_YOUR_ADDRESS.format(address=reverse_path.text,
                                               login=session.authenticated)
    session.envelope = Envelope(reverse_path, session.helo, session.client, parameters)
    checks = session.policy.checks
    session.findings = checks.start(session) if checks else None
    return replies.SENDER_OK.format(address=reverse_path.text)


def _check_mail_parameters(session, parameters):
    for keyword, value in parameters.items():
        if keyword == "SIZE":               # RFC 1870 6: refuse at once what is too big
            if value is None or not value.isdigit():
                return replies.BAD_PARAMETER.format(parameter=f"SIZE={value}")
            limit = session.policy.max_message_size
            if int(value) > limit:
                return replies.MESSAGE_TOO_BIG.format(limit=limit)
        elif keyword == "BODY":             # RFC 6152 2
            if (value or "").upper() not in ("7BIT", "8BITMIME"):
                return replies.BAD_PARAMETER.format(parameter=f"BODY={value}")
        elif keyword == "AUTH":             # RFC 4954 5: AUTH=<mailbox> or AUTH=<>
            if value is None:
                return replies.BAD_PARAMETER.format(parameter="AUTH")
        elif keyword == "SMTPUTF8":         # RFC 6531 3.4: a keyword without a value
            if value is not None:
                return replies.BAD_PARAMETER.format(parameter=f"SMTPUTF8={value}")
        elif keyword in ("RET", "ENVID"):   # RFC 3461 4.3, 4.4
            try:
                dsn.check_mail_parameter(keyword, value)
            except dsn.ParameterError as problem:
                return replies.BAD_PARAMETER_VALUE.format(problem=problem)
        else:                               # RFC 5321 4.1.1.11: not one we offer
            return replies.BAD_PARAMETER.format(parameter=keyword)
    return None


def rcpt(session, argument):
    path_text = _after_keyword(argument, "TO:")
    if path_text is None:
        return replies.SYNTAX.format(syntax=VERBS["RCPT"].syntax)
    path_text, parameter_text = split_path_and_parameters(path_text)
    policy, envelope = session.policy, session.envelope
    try:
        parameters = parse_parameters(parameter_text)
        address = parse_path(path_text, allow_bare_postmaster=True,
                             utf8="SMTPUTF8" in envelope.parameters)
    except NeedsSmtputf8:
        return replies.NEEDS_SMTPUTF8
    except AddressError as problem:
        return replies.BAD_RECIPIENT.format(problem=problem)
    refusal = _check_rcpt_parameters(parameters)
    if refusal:
        return refusal
    if len(envelope.recipients) >= policy.max_recipients:      # RFC 5321 4.5.3.1.8
        return replies.TOO_MANY_RECIPIENTS
    if not address.domain:                  # RFC 5321 4.1.1.3: <Postmaster> is always local
        address = policy.router.postmaster()
    route = policy.router.route(address)
    if route.destination is Destination.UNKNOWN:
        return _reject(session, replies.NO_SUCH_USER.format(address=address.text))
    if route.destination is Destination.REMOTE and not may_relay(session):
        return _reject(session, replies.RELAY_DENIED.format(address=address.text))   # 3.6.2
    if session.findings is not None:
        refusal = policy.checks.at_recipient(session)       # SPF, RFC 7208 2.4
        if refusal:
            return _reject(session, refusal) if refusal.code >= 500 else refusal
    recipient = route.recipient(address, parameters)
    envelope.add(recipient)                 # the same mailbox twice gets one copy
    return replies.RECIPIENT_OK.format(address=recipient.key)


def _check_rcpt_parameters(parameters):
    for keyword, value in parameters.items():
        if keyword not in ("NOTIFY", "ORCPT"):      # RFC 5321 4.1.1.11: not one we offer
            return replies.BAD_PARAMETER.format(parameter=keyword)
        try:
            dsn.check_rcpt_parameter(keyword, value)    # RFC 3461 4.1, 4.2
        except dsn.ParameterError as problem:
            return replies.BAD_PARAMETER_VALUE.format(problem=problem)
    return None


def _reject(session, reply):
    session.rejected_recipients += 1
    return reply


def may_relay(session):
    if session.authenticated:               # RFC 4954 6: an authenticated client may relay
        return True
    client = ipaddress.ip_address(session.client.ip)
    if getattr(client, "ipv4_mapped", None):
        client = client.ipv4_mapped
    return any(client in network for network in session.policy.relay_networks)


def data(session, argument):
    """RFC 5321 4.1.1.4: 354, and the text goes straight to its files as it arrives."""
    if argument.strip():
        return replies.SYNTAX.format(syntax=VERBS["DATA"].syntax)
    try:
        session.text = MessageText(_open_message(session), session.policy.max_message_size)
    except StorageError as problem:
        return _storage_refusal(problem)
    return replies.START_DATA


def _open_message(session):
    """Give the envelope its queue id and open the files its text goes to, with this
    server's Received: line first. Raises StorageError."""
    policy, envelope = session.policy, session.envelope
    envelope.queue_id = ids.queue_id()
    trace_line = received_header(
        session.helo, session.client_literal, policy.hostname, received_protocol(session),
        envelope.queue_id, [recipient.address for recipient in envelope.recipients])
    if session.findings is not None:
        return policy.open_message(envelope, trace_line, checked=True)
    return policy.open_message(envelope, trace_line)


def end_of_data(session, argument=None):
    """The text has arrived (RFC 5321 4.1.1.4): check it, then store it and answer."""
    return _finish_message(session)


def _finish_message(session):
    text, session.text = session.text, None
    findings, session.findings = session.findings, None
    session.envelope = None                 # the next transaction starts from nothing
    try:
        refusal = check_text(text, session.policy.max_message_size) or \
            _delivered_here_before(text.writer.envelope, text.header_block()) or \
            _check_text_origin(session, findings, text)
    except BaseException:
        # the session no longer holds the text: nothing else would remove its files
        text.writer.discard()
        raise
    if refusal:
        text.writer.discard()
        return refusal
    try:
        # RFC 5321 6.1: durably stored before the 250
        session.policy.submit(text.writer, text.header_block())
    except StorageError as problem:
        return _storage_refusal(problem)
    return replies.QUEUED.format(queue_id=text.writer.envelope.queue_id)


def bdat(session, argument):
    """RFC 3030 2: BDAT <size> [LAST]. Its octets follow at once and are read before the
    reply; the first chunk opens the message as DATA does."""
    chunk = parse_chunk(argument)
    if chunk is None:
        return replies.BAD_CHUNK_SIZE
    if session.text is None:
        try:
            session.text = ChunkedText(_open_message(session), session.policy.max_message_size)
        except StorageError as problem:
            chunk = chunk._replace(refusal=_storage_refusal(problem))
    session.chunk = chunk
    return ReadChunk(chunk.octets)


def parse_chunk(argument):
    """`100 LAST` -> Chunk(100, True); None if it is not BDAT's syntax."""
    words = argument.split()
    if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > 18 \
            or (len(words) == 2 and words[1].upper() != "LAST"):
        return None
    return Chunk(int(words[0]), len(words) == 2)


def end_of_chunk(session, chunk):
    """A chunk that is not the last is in. RFC 3030 2: a failure ends the transaction (the
    client has been sending on); over the size limit, the chunk was still read to its end."""
    if chunk.refusal or session.text.oversize:
        refusal = chunk.refusal or replies.MESSAGE_TOO_BIG.format(
            limit=session.policy.max_message_size)
        drop_transaction(session)
        return refusal
    return replies.CHUNK_OK.format(octets=chunk.octets)


def end_of_last_chunk(session, chunk):
    """BDAT ... LAST: the message is whole; the same checks and storing as after DATA."""
    if chunk.refusal:
        drop_transaction(session)
        return chunk.refusal
    session.text.finish()
    return _finish_message(session)


def _check_text_origin(session, findings, text):
    """DKIM and DMARC of checked mail (checks.py): their refusal, or None with the header
    fields that record them handed to the writer."""
    if findings is None or text.writer.failure:     # a failed write: commit() says so
        return None
    outcome = session.policy.checks.after_text(findings, text.writer, text.header_block(),
                                               text.writer.envelope.queue_id)
    if outcome.refusal:
        return outcome.refusal
    text.writer.deliver_with(outcome.fields, outcome.junk)
    return None


def _delivered_here_before(envelope, header_block):
    """RFC 5321 6.3: a message that already carries this server's Delivered-To: for one of
    its recipients has come round a loop (through a forward and back)."""
    delivered_to = {line[13:].strip().strip("<>").lower()
                    for line in header_block.decode("utf-8", "replace").split("\r\n")
                    if line[:13].lower() == "delivered-to:"}
    looped = delivered_to and delivered_to_loop(envelope.recipients, delivered_to)
    return replies.DELIVERED_TO_LOOP.format(address=looped.text) if looped else None


def check_text(text, max_size):
    """The refusal a finished text earns, or None."""
    if text.oversize:                       # RFC 1870 6
        return replies.MESSAGE_TOO_BIG.format(limit=max_size)
    if text.bare_line_ending and text.refuses_bare_line_endings:   # RFC 5321 2.3.8
        return replies.BARE_LINE_ENDING     # (no SMTP smuggling)
    if text.line_too_long:                  # RFC 5321 4.5.3.1.6
        return replies.TEXT_LINE_TOO_LONG
    if text.received_headers() > MAX_RECEIVED_HEADERS:      # RFC 5321 6.3
        return replies.LOOP_DETECTED
    return None


def _storage_refusal(problem):
    return replies.STORAGE_FULL if problem.full else replies.LOCAL_ERROR


def received_protocol(session):
    """RFC 3848 2: SMTP, ESMTP, and ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA; RFC 6531 4.3:
    UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA for an SMTPUTF8 transaction."""
    if not session.esmtp:
        return "SMTP"
    utf8 = session.envelope and "SMTPUTF8" in session.envelope.parameters
    return ("UTF8SMTP" if utf8 else "ESMTP") + ("S" if session.tls else "") + \
        ("A" if session.authenticated else "")


def address_literal(ip):
    """RFC 5321 4.1.3: [192.0.2.1] or [IPv6:2001:db8::1]."""
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return f"[IPv6:{address.compressed}]" if address.version == 6 else f"[{address}]"


def _after_keyword(argument, keyword):
    """`FROM:<a@b>` -> `<a@b>`; also tolerates `FROM: <a@b>` as most servers do."""
    if argument[:len(keyword)].upper() != keyword:
        return None
    return argument[len(keyword):].strip()


def drop_transaction(session):
    """Forget the envelope (RFC 5321 4.1.1.5: RSET; 4.1.4: a new HELO/EHLO), and any text
    being written for it."""
    session.envelope = None
    session.findings = None
    if session.text:
        session.text.writer.discard()
        session.text = None
