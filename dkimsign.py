"""DKIM signatures (RFC 6376) for mail of the local domains, and the keys they are made with.

    signer = Signer(config.dkim_keys, log)      # as root: reads every key now
    header = signer.sign(message, "test.ru")    # b"DKIM-Signature: ...\\r\\n", or b""
    # send header + message

`message` is the message as it goes out: CRLF line ends, headers and body, not dot-stuffed.
The signing domain is the From: header's domain when it has a key (that is the domain DMARC
aligns on, RFC 7489 3.1.1), else the reverse-path domain's; neither having one gives b"" and
the mail goes unsigned. A signature dkimpy cannot make (a From: it cannot parse, say) is
logged and also gives b"": a signature is never a reason for mail not to go.

rsa-sha256 with the PEM keys `openssl genpkey` writes (PKCS#8) or older PKCS#1 ones;
ed25519-sha256 (RFC 8463) when the file is an ed25519 PEM key and PyNaCl imports (dkimpy signs
ed25519 with it; without it such a key is a SigningKeyError at start). Canonicalization
relaxed/relaxed, SIGNED_HEADERS that the message has, From: signed once more than it occurs
(so no From: can be added), a t= timestamp.

    python smtpd.py --dkim-keygen test.ru [--selector s1]   -> keygen_main(config, ...)

writes a 2048-bit RSA key with openssl to <config dir>/dkim/test.ru.pem (0600, never over an
existing file) and prints the TXT record to publish and the [dkim] line to add.

`preload()` imports now what signing would otherwise import on first use, for a server that
drops its privileges after start.
"""
import base64
import email.utils
import importlib
import logging
import os
import re
import subprocess
import sys
from typing import NamedTuple

import dkim
import dkim.canonicalization
import dkim.crypto
import dkim.util

from address import AddressError, domain_name

RSA_SHA256 = b"rsa-sha256"
ED25519_SHA256 = b"ed25519-sha256"                     # RFC 8463
CANONICALIZATION = (b"relaxed", b"relaxed")           # RFC 6376 3.4
# RFC 6376 5.4.1: the fields that carry what the user sees and the MIME structure
SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to",
                  b"in-reply-to", b"references", b"mime-version", b"content-type",
                  b"content-transfer-encoding")
# RFC 6376 3.1: selector = sub-domain *( "." sub-domain ), in ASCII
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
SELECTOR = re.compile(rf"{LABEL}(?:\.{LABEL})*")
OVERSIGNED_HEADERS = (b"from",)                        # RFC 6376 8.15: no From: can be added

KEY_BITS = 2048                                         # RFC 8301 3.2: at least 1024
KEY_DIRECTORY = "dkim"                                  # next to the config file
KEY_FILE_MODE = 0o600
OPENSSL_TIMEOUT = 60
TXT_STRING_OCTETS = 255                                 # RFC 1035 3.3.14: one character-string

# An ed25519 private key in PKCS#8 DER (RFC 8410 7): this prefix, then the 32-octet seed
ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
ED25519_SEED_OCTETS = 32

# dkimpy logs what it raises or returns; the results and the server's log say it once
DKIMPY_LOG = logging.getLogger("dkimsign.dkimpy")
DKIMPY_LOG.addHandler(logging.NullHandler())
DKIMPY_LOG.propagate = False


class SigningKeyError(Exception):
    """A key that cannot be used or made: one line that names the file."""


class SigningKey(NamedTuple):
    """One domain's key as dkimpy takes it."""
    selector: str
    path: str
    algorithm: bytes                # RSA_SHA256 or ED25519_SHA256
    private: bytes                  # PEM for RSA, the base64 seed for ed25519


class Signer:
    def __init__(self, keys, log):
        """`keys`: config.dkim_keys {domain: (selector, absolute path)}. Raises
        SigningKeyError for a file that is missing or holds no usable key."""
        self.log = log
        self.keys = {domain: read_key(selector, path)
                     for domain, (selector, path) in keys.items()}
        for _, path in keys.values():
            if os.stat(path).st_mode & 0o077:
                log.warning("DKIM key %s can be read by other users than its owner: "
                            "chmod 600 it", path)

    def sign(self, message, reverse_path_domain):
        """The DKIM-Signature header field for `message` (CRLF-terminated, folded with
        CRLF), or b"" when no domain of it has a key or dkimpy cannot sign it (logged)."""
        domain = self.signing_domain(message, reverse_path_domain)
        if domain is None:
            return b""
        key = self.keys[domain]
        try:
            signature = dkim.DKIM(message, logger=DKIMPY_LOG,
                                  signature_algorithm=key.algorithm)
            return signature.sign(key.selector.encode("ascii"), domain.encode("ascii"),
                                  key.private, canonicalize=CANONICALIZATION,
                                  include_headers=headers_to_sign(signature.headers))
        except Exception as error:      # dkimpy's parsers raise more than DKIMException
            self.log.warning("DKIM: not signed for %s: %s", domain, one_line(error))
            return b""

    def signing_domain(self, message, reverse_path_domain):
        """The From: domain if it has a key, else the reverse path's, else None."""
        for domain in (from_domain(message), reverse_path_domain):
            domain = normal_domain(domain)
            if domain in self.keys:
                return domain
        return None


def read_key(selector, path):
    """A SigningKey from a PEM file; SigningKeyError naming the file otherwise."""
    if not SELECTOR.fullmatch(selector):
        raise SigningKeyError(f"DKIM key {path}: selector {selector!r} is not a DNS name "
                              "of letters, digits and hyphens")
    try:
        with open(path, "rb") as file:
            pem = file.read()
    except OSError as error:
        raise SigningKeyError(f"DKIM key {path}: {error.strerror}") from None
    der = pem_body(pem)
    if der is None:
        raise SigningKeyError(f"DKIM key {path}: not a PEM private key")
    if der.startswith(ED25519_PKCS8_PREFIX):
        return SigningKey(selector, path, ED25519_SHA256, ed25519_seed(der, path))
    try:
        dkim.crypto.parse_private_key(der)
    except Exception as error:         # dkimpy's ASN.1 parser raises more than its own
        raise SigningKeyError(f"DKIM key {path}: not an RSA or ed25519 private key "
                              f"({one_line(error)[:80]})") from None
    return SigningKey(selector, path, RSA_SHA256, pem.replace(b"\r\n", b"\n"))


def pem_body(pem):
    """The DER inside the first `-----BEGIN ...PRIVATE KEY-----` block, or None."""
    lines = pem.replace(b"\r\n", b"\n").split(b"\n")
    begin = next((i for i, line in enumerate(lines)
                  if line.startswith(b"-----BEGIN ") and b"PRIVATE KEY" in line), None)
    if begin is None:
        return None
    end = next((i for i in range(begin + 1, len(lines)) if lines[i].startswith(b"-----END ")),
               None)
    if end is None:
        return None
    try:
        return base64.b64decode(b"".join(lines[begin + 1:end]), validate=True)
    except ValueError:
        return None


def ed25519_seed(der, path):
    """dkimpy's form of an ed25519 private key: its seed in base64 (RFC 8463 4)."""
    seed = der[len(ED25519_PKCS8_PREFIX):]
    if len(seed) != ED25519_SEED_OCTETS:
        raise SigningKeyError(f"DKIM key {path}: not an ed25519 private key")
    try:
        importlib.import_module("nacl.signing")        # dkimpy signs ed25519 with it
    except ImportError:
        raise SigningKeyError(f"DKIM key {path}: an ed25519 key needs PyNaCl "
                              "(pip install pynacl), or use an RSA key") from None
    return base64.b64encode(seed)


def headers_to_sign(headers):
    """h= (RFC 6376 3.5): each SIGNED_HEADERS field as often as the message has it, and
    OVERSIGNED_HEADERS once more (an instance that is not there signs as empty, 5.4.2)."""
    present = [name.lower() for name, _ in headers if name.lower() in SIGNED_HEADERS]
    return present + [name for name in OVERSIGNED_HEADERS]


def from_domain(message):
    """The domain of the first address of the first From: field, or None."""
    head = message.split(b"\r\n\r\n", 1)[0]
    value = None
    for field in head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ").split(b"\r\n"):
        name, colon, rest = field.partition(b":")
        if colon and name.strip().lower() == b"from":
            value = rest.decode("utf-8", "replace")
            break
    if value is None:
        return None
    addresses = [address for _, address in email.utils.getaddresses([value]) if "@" in address]
    return addresses[0].rpartition("@")[2] if addresses else None


def normal_domain(domain):
    """A domain as config.dkim_keys spells it (lower-case A-labels), or None."""
    if not domain:
        return None
    try:
        return domain_name(domain.strip().rstrip("."))
    except AddressError:
        return None


def one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


# --- making a key -------------------------------------------------------------------------

def keygen(domain, selector, directory):
    """Write a new RSA key to <directory>/<domain>.<selector>.pem (0600) with openssl:
    (key path, TXT record name, TXT record value). SigningKeyError (one line) when the file
    exists or openssl fails. One file per selector: a new key can be published beside the
    one in use (RFC 6376 3.1: selectors are how keys are rotated)."""
    path = os.path.join(directory, f"{domain}.{selector}.pem")
    if not SELECTOR.fullmatch(selector):
        raise SigningKeyError(f"selector {selector!r} is not a DNS name of letters, digits "
                              "and hyphens")
    if os.path.lexists(path):
        raise SigningKeyError(f"{path} exists: not overwriting it (use another --selector "
                              "to make a new key)")
    pem = openssl(["genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{KEY_BITS}"],
                  b"")
    public = openssl(["pkey", "-pubout", "-outform", "DER"], pem)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    write_new_file(path, pem)
    # RFC 6376 3.6.1: p= is the base64 public key (SubjectPublicKeyInfo, as openssl and
    # opendkim-genkey write it; verifiers take it and RSAPublicKey alike)
    value = f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode('ascii')}"
    return path, f"{selector}._domainkey.{domain}", value


def openssl(arguments, input_bytes):
    """openssl's standard output; SigningKeyError when it cannot run or fails."""
    try:
        done = subprocess.run(["openssl", *arguments], input=input_bytes, capture_output=True,
                              timeout=OPENSSL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SigningKeyError(f"openssl {arguments[0]}: {one_line(error)}") from None
    if done.returncode != 0 or not done.stdout:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SigningKeyError(f"openssl {arguments[0]} failed: "
                              f"{message[0] if message else done.returncode}")
    return done.stdout


def write_new_file(path, data):
    """Create `path` 0600 (O_EXCL: never over a file that appeared meanwhile) and fsync it."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    except FileExistsError:
        raise SigningKeyError(f"{path} exists: not overwriting it") from None
    except OSError as error:
        raise SigningKeyError(f"{path}: {error.strerror}") from None
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(file.fileno(), KEY_FILE_MODE)          # whatever the umask
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def zone_file_line(name, value):
    """`name. IN TXT ( "..." "..." )`: the value in strings of at most 255 octets."""
    octets = value.encode("ascii")
    strings = [octets[i:i + TXT_STRING_OCTETS].decode("ascii")
               for i in range(0, len(octets), TXT_STRING_OCTETS)]
    quoted = " ".join(f'"{text}"' for text in strings)
    return f"{name}. IN TXT ( {quoted} )"


def keygen_main(config, domain, selector):
    """`--dkim-keygen DOMAIN [--selector S]`: make the key, print what to do with it.
    The exit status: 0, or 1 with one line on standard error."""
    try:
        domain = domain_name(domain)
    except AddressError:
        print(f"smtpd: --dkim-keygen {domain!r}: not a domain name", file=sys.stderr)
        return 1
    base = os.path.dirname(config.config_file) if config.config_file else os.getcwd()
    try:
        path, name, value = keygen(domain, selector, os.path.join(base, KEY_DIRECTORY))
    except SigningKeyError as error:
        print(f"smtpd: {error}", file=sys.stderr)
        return 1
    relative = os.path.relpath(path, base)
    key_item = relative if selector == config.dkim_selector else f"{selector}:{relative}"
    print(f"Wrote the private key {path} (keep it 0600).")
    print(f"Publish in the DNS zone of {domain}:")
    print(zone_file_line(name, value))
    where = config.config_file or "the config file"
    print(f"Then set in the [dkim] section of {where} (replacing its keys = line; a comma "
          "separates the keys of several domains):")
    print(f"keys = {domain}={key_item}")
    return 0


def preload():
    """Import now what signing imports on first use. dkimpy 1.1 imports everything when it
    is imported (a sign and a verify import no module more), so this runs the parts that
    touch the email and encodings machinery once."""
    message = b"From: a@preload.invalid\r\nSubject: x\r\n\r\nx\r\n"
    from_domain(message)
    normal_domain("preload.invalid")
    headers_to_sign(dkim.DKIM(message).headers)
    dkim.canonicalization.CanonicalizationPolicy.from_c_value(b"/".join(CANONICALIZATION))
    dkim.util.parse_tag_value(b"v=1; a=rsa-sha256")
