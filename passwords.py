"""Password hashes for the users file: salted scrypt (hashlib), never the password itself.

    scrypt$16384$8$1$<salt, base64>$<hash, base64>

The parameters are stored with the hash so they can be raised later without breaking
existing entries.
"""
import base64
import hashlib
import hmac
import os

SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1
HASH_LENGTH = 32


def hash_password(password):
    salt = os.urandom(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P),
                     _b64(salt), _b64(digest)])


def verify_password(stored, password):
    """True when `password` matches the stored hash; False for anything malformed."""
    try:
        scheme, n, r, p, salt, digest = (stored or "").split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = _scrypt(password, base64.b64decode(salt, validate=True), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(expected, actual)


def _scrypt(password, salt, n, r, p):
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * n * r * 2, dklen=HASH_LENGTH)


def _b64(data):
    return base64.b64encode(data).decode("ascii")
