"""AUTH (RFC 4954) with the PLAIN (RFC 4616) and LOGIN mechanisms: the handlers of the AUTH
cells of the table in state.py, and what they keep between the lines of one exchange.

Passwords are checked by `policy.check_password` (the users file's scrypt hashes) and never
kept or logged. A failure is answered after `policy.auth_failure_delay` seconds (the reply
says so; the socket layer waits), and the last allowed failure ends the session.
"""
import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

import replies

MECHANISMS = ("PLAIN", "LOGIN")
# RFC 4648 4: base64 in groups of four, padded at the end only, and no more than needed
# (Python's own decoder accepts "YWJj=" and "AGFsaWNl===")
BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
# The prompts of the LOGIN mechanism: base64 of "Username:" and "Password:"
LOGIN_PROMPTS = {"username": "VXNlcm5hbWU6", "password": "UGFzc3dvcmQ6"}


@dataclass
class Exchange:
    """An AUTH exchange under way."""
    mechanism: str
    login: Optional[bytes] = None       # LOGIN: the user name, once it has been sent


def offered(session):
    """AUTH only where a password cannot be sniffed: under TLS or on loopback (or when the
    config says otherwise), and not twice (RFC 4954 4)."""
    policy = session.policy
    if policy.check_password is None or session.authenticated:
        return False
    return session.tls or policy.auth_plaintext or _is_loopback(session.client.ip)


def _is_loopback(ip):
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def start(session, argument):
    """RFC 4954 4: AUTH <mechanism> [initial-response]."""
    if session.authenticated:
        return replies.ALREADY_AUTHENTICATED
    if not offered(session):
        return replies.AUTH_NOT_AVAILABLE
    mechanism, _, initial = argument.strip().partition(" ")
    if mechanism.upper() not in MECHANISMS:
        return replies.AUTH_UNKNOWN_MECHANISM.format(mechanism=replies.quoted(mechanism))
    session.sasl = Exchange(mechanism.upper())
    initial = initial.strip()
    if not initial:
        prompt = "" if session.sasl.mechanism == "PLAIN" else LOGIN_PROMPTS["username"]
        return replies.AUTH_CHALLENGE.format(challenge=prompt)
    return respond(session, initial.encode("ascii", "replace"))


def respond(session, line):
    """One line from the client in the AUTH state: base64, "=" (empty), or "*" (cancel)."""
    exchange = session.sasl
    line = line.strip()
    if line == b"*":                        # RFC 4954 4: the client cancels
        session.sasl = None
        return replies.AUTH_CANCELLED
    decoded = _decode(line)
    if decoded is None:
        session.sasl = None
        return replies.AUTH_BAD_BASE64
    if exchange.mechanism == "PLAIN":
        # RFC 4616 2: [authzid] NUL authcid NUL passwd
        parts = decoded.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            return _result(session, None, None)
        return _result(session, parts[1], parts[2])
    if exchange.login is None:
        exchange.login = decoded
        return replies.AUTH_CHALLENGE.format(challenge=LOGIN_PROMPTS["password"])
    return _result(session, exchange.login, decoded)


def _decode(line):
    """RFC 4954 4: "=" is a response of zero length; anything else is strict base64."""
    if line == b"=":
        return b""
    if not BASE64.fullmatch(line):
        return None
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return None


def _result(session, login, password):
    session.sasl = None
    policy = session.policy
    try:
        login, password = login.decode("utf-8"), password.decode("utf-8")
    except (AttributeError, UnicodeDecodeError):
        login = None
    if login and policy.check_password(login, password):
        session.authenticated = login.lower()
        return replies.AUTH_OK
    session.auth_failures += 1
    if session.auth_failures >= policy.max_auth_failures:
        reply = replies.TOO_MANY_AUTH_FAILURES.format(hostname=policy.hostname)
    else:
        reply = replies.AUTH_FAILED
    return reply.delayed(policy.auth_failure_delay)     # slows password guessing
