"""Delivery status notifications (RFC 3461): the MAIL and RCPT parameters that ask for them,
and the one rule of who gets which notice.

    MAIL FROM:<a@b> RET=HDRS ENVID=QQ314159              what a notice carries
    RCPT TO:<c@d> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;c@d  when one is sent, and for whom

Values arrive as xtext (RFC 3461 4): printable ASCII, with "+", "=" and the rest written as
"+XX". They are kept as sent, so that the relay replays them unchanged; the functions here
read them.
"""
import re

# RFC 3461 4: xtext = *( xchar / hexchar ); xchar is "!".."~" except "+" and "="
XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
NOTIFY_KINDS = ("SUCCESS", "FAILURE", "DELAY")
RET_VALUES = ("FULL", "HDRS")
MAX_ENVID = 100                 # RFC 3461 4.4: at most 100 characters
ADDRESS_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")   # RFC 3461 4.2: an atom

# The actions of RFC 3464 2.3.3, and the NOTIFY keyword that asks for each
FAILED, DELAYED, DELIVERED, RELAYED, EXPANDED = (
    "failed", "delayed", "delivered", "relayed", "expanded")
ASKED_BY = {FAILED: "FAILURE", DELAYED: "DELAY", DELIVERED: "SUCCESS", RELAYED: "SUCCESS",
            EXPANDED: "SUCCESS"}


class ParameterError(ValueError):
    """A DSN parameter that is not RFC 3461 syntax; the text names it."""


def decode_xtext(text):
    if not XTEXT.fullmatch(text):
        raise ParameterError(f"not xtext: {text[:40]!r}")
    return re.sub(r"\+([0-9A-F]{2})", lambda match: chr(int(match.group(1), 16)), text)


def encode_xtext(text):
    return "".join(char if ("!" <= char <= "~" and char not in "+=") else
                   "".join(f"+{byte:02X}" for byte in char.encode("utf-8")) for char in text)


# ---------------------------------------------------------------------------------------
# Syntax checks at MAIL and RCPT (the handlers in state.py answer 501 with the message)


def check_mail_parameter(keyword, value):
    """RET= or ENVID= (RFC 3461 4.3, 4.4); raises ParameterError."""
    if keyword == "RET":
        if (value or "").upper() not in RET_VALUES:
            raise ParameterError(f"RET={value}: FULL or HDRS")
    elif keyword == "ENVID":
        if not value or len(decode_xtext(value)) > MAX_ENVID:
            raise ParameterError(f"ENVID: xtext of 1 to {MAX_ENVID} characters")


def check_rcpt_parameter(keyword, value):
    """NOTIFY= or ORCPT= (RFC 3461 4.1, 4.2); raises ParameterError."""
    if value is None:
        raise ParameterError(f"{keyword} needs a value")
    if keyword == "NOTIFY":
        notify_of(value)
    elif keyword == "ORCPT":
        original_recipient(value)


def notify_of(value):
    """NOTIFY=NEVER -> frozenset(); SUCCESS,DELAY -> {"SUCCESS", "DELAY"}; None (absent) ->
    None. Raises ParameterError."""
    if value is None:
        return None
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return frozenset()
    if not words or any(word not in NOTIFY_KINDS for word in words) \
            or len(set(words)) != len(words):
        raise ParameterError(f"NOTIFY={value}: NEVER, or one or more of "
                             f"{', '.join(NOTIFY_KINDS)}")
    return frozenset(words)


def original_recipient(value):
    """ORCPT=rfc822;bob@example.org -> ("rfc822", "bob@example.org"); raises ParameterError."""
    address_type, semicolon, xtext = (value or "").partition(";")
    if not semicolon or not ADDRESS_TYPE.fullmatch(address_type) or not xtext:
        raise ParameterError("ORCPT: addr-type;xtext, as in rfc822;bob@example.org")
    return address_type.lower(), decode_xtext(xtext)


# ---------------------------------------------------------------------------------------
# Who gets which notice


def wants(recipient, action):
    """RFC 3461 4.1: is a notice with `action` (failed, delayed, delivered, relayed) sent for
    this envelope.Recipient? Without NOTIFY: failures and delays, as if FAILURE,DELAY."""
    notify = notify_of(recipient.parameters.get("NOTIFY"))
    if notify is None:
        return action in (FAILED, DELAYED)
    return ASKED_BY[action] in notify


def returns_full_message(envelope):
    """RFC 3461 4.3: RET=FULL returns the whole message in a failure notice; HDRS or no
    RET returns its headers only (this server's choice where RET is absent, as Postfix's)."""
    return (envelope.parameters.get("RET") or "").upper() == "FULL"


def envelope_id(envelope):
    """The ENVID the sender gave, decoded, or None (RFC 3461 4.4)."""
    value = envelope.parameters.get("ENVID")
    return decode_xtext(value) if value else None
