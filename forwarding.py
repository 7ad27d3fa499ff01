"""The envelope sender of forwarded mail, rewritten into the alias's own domain.

Mail for carol@test.ru forwarded to carol@remote.test keeps its text, but leaves with a
sender of test.ru's, so that remote.test's SPF check (RFC 7208) asks test.ru, which sent it,
and a bounce comes back here, to be passed on to the real sender. The rewriting is the
Sender Rewriting Scheme's (SRS0), as chasquid and postsrsd use it:

    bob@example.org  ->  SRS0=<hash>=<day>=example.org=bob@test.ru

<hash> is a keyed HMAC (the key lives in the spool, readable by this server only) of the
rest, so nobody else can make an address that this server would relay; <day> lets an old one
expire. `<>` stays `<>`: a bounce is never forwarded with a return path.
"""
import base64
import hashlib
import hmac
import os
import time

from address import MAX_LOCAL_PART, Address, AddressError

PREFIX = "SRS0="
DAY = 86400
VALID_DAYS = 30                 # a bounce later than this finds no way back
KEY_FILE = ".forwarding-key"


class Forwarder:
    def __init__(self, key):
        self.key = key

    @classmethod
    def for_spool(cls, directory):
        """The key kept in the spool (made on first use, mode 0600, by the run user)."""
        path = os.path.join(directory, KEY_FILE)
        try:
            with open(path, "rb") as key_file:
                return cls(key_file.read())
        except FileNotFoundError:
            pass
        key = os.urandom(32)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:                 # another start made it meanwhile
            return cls.for_spool(directory)
        with os.fdopen(descriptor, "wb") as key_file:
            key_file.write(key)
        return cls(key)

    def rewrite(self, sender, alias_domain, now=None):
        """The sender a forwarded copy leaves with; <> stays <>, and so does a sender whose
        rewritten form would not fit a local part (RFC 5321 4.5.3.1.1: 64 octets)."""
        if sender.is_null or sender.local_part.startswith(PREFIX):
            return sender
        day = _day(now)
        local_part = (f"{PREFIX}{self._hash(day, sender.domain, sender.local_part)}="
                      f"{day}={sender.domain}={sender.local_part}")
        if len(local_part.encode()) > MAX_LOCAL_PART:
            return sender
        return Address(local_part, alias_domain)

    def reverse(self, address, now=None):
        """The original sender of a rewritten address, or None if it is not one of ours
        (a wrong hash) or too old."""
        if not address.local_part.startswith(PREFIX):
            return None
        parts = address.local_part[len(PREFIX):].split("=", 3)
        if len(parts) != 4:
            return None
        digest, day, domain, local_part = parts
        if not hmac.compare_digest(digest.lower(), self._hash(day, domain, local_part)):
            return None
        try:
            age = (_day_number(now) - int(day, 32)) % 1024
            original = Address.parse(f"{local_part}@{domain}")
        except (ValueError, AddressError):
            return None
        return original if age <= VALID_DAYS and not original.is_null else None

    def _hash(self, day, domain, local_part):
        text = f"{day}={domain.lower()}={local_part}".encode()
        digest = hmac.new(self.key, text, hashlib.sha256).digest()
        return base64.b32encode(digest)[:8].decode().lower()


def _day_number(now=None):
    return int((now or time.time()) // DAY) % 1024


def _day(now=None):
    """The day, base 32 in two digits (it wraps every 1024 days, as in SRS)."""
    number = _day_number(now)
    return _base32(number // 32) + _base32(number % 32)


def _base32(digit):
    return "0123456789abcdefghijklmnopqrstuv"[digit]
