"""MTA-STS (RFC 8461): a domain's word that its MXs take mail over TLS with valid certificates.

    sts = MtaSts(resolver, context, spool_directory, log, trace)
    policy = sts.policy_for("remote.test", tag)     # Policy, or None when there is none

1. `_mta-sts.<domain>` TXT: exactly one record starting `v=STSv1`, with `id=` (RFC 8461 3.1).
2. A policy cached under that id and not past its max_age is used as it is (RFC 8461 3.1,
   5.1).
   Otherwise it is fetched: HTTPS GET of https://mta-sts.<domain>/.well-known/mta-sts.txt
   (RFC 8461 3.3), the host's address asked of the relay's own DNS servers, the certificate
   checked for the host name against `[relay] ca_file` (or the system's store), 200 only (a
   redirect is not followed), text/plain, at most MAX_HEAD_OCTETS of status line and headers
   and MAX_POLICY_OCTETS of body (Content-Length, chunked or up to the close). Each step
   (connect, handshake, each read) gets the relay's connect timeout, and the whole fetch,
   over every address of the host, FETCH_DEADLINE from its start: the response is read off
   the socket here, so a host that dribbles its headers is cut off like one that dribbles
   its body.
3. Parsed (RFC 8461 3.2), it is saved as <spool>/mta-sts/<domain>.json, written durably.
A fetch that fails leaves the cached policy in force until its max_age; with none cached
the domain has no policy (RFC 8461 3.3: a policy that cannot be had never stops delivery).
When the TXT record disappears, a cached policy stays in force until its max_age (RFC 8461
10.2: an attacker who can remove the record cannot switch the policy off).

`HTTPS_PORT` is the policy host's port: 443 (RFC 8461 3.3); the tests point it at their own
loopback server, and nothing else changes it.
"""
import http.client
import io
import json
import os
import re
import socket
import ssl
import threading
import time
from typing import NamedTuple

import durable
from resolver import LookupFailed

DEFAULT_HTTPS_PORT = 443
HTTPS_PORT = DEFAULT_HTTPS_PORT
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"           # RFC 8461 3.2
POLICY_HOST_LABEL = "mta-sts"                           # RFC 8461 3.2
TXT_LABEL = "_mta-sts"                                  # RFC 8461 3.1
MAX_POLICY_OCTETS = 64 * 1024                           # RFC 8461 3.3
MAX_AGE_LIMIT = 31557600                                # RFC 8461 3.2: at most a year
FETCH_DEADLINE = 60                                     # RFC 8461 3.3: "one minute"
READ_SIZE = 4096
MAX_HEAD_OCTETS = 16 * 1024                             # the status line and the headers
MAX_CHUNK_LINE_OCTETS = 1024                            # a chunk size and its extensions
HTTP_OK = 200
POLICY_MEDIA_TYPE = "text/plain"                        # RFC 8461 3.2
CHUNKED = "chunked"                                     # RFC 9112 7.1
CRLF = b"\r\n"
STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: (.*))?")     # RFC 9112 4
HEAD_END = re.compile(rb"\r?\n\r?\n")                     # RFC 9112 2.2: a bare LF too
LINE_END = re.compile(rb"\r?\n")
LONGEST_LINE_END = 4                                    # what HEAD_END spans at most
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")           # RFC 9112 7.1, within MAX_POLICY_OCTETS
CACHE_DIRECTORY = "mta-sts"
ENFORCE, TESTING, NONE = "enforce", "testing", "none"
MODES = (ENFORCE, TESTING, NONE)
ID_PATTERN = re.compile(r"[A-Za-z0-9]{1,32}")           # RFC 8461 3.1: sts-id
# RFC 8461 3.1: sts-version, then sts-field-delim (*WSP ";" *WSP) or the end
TXT_VERSION = re.compile(r"v=STSv1(?=[ \t]*;|[ \t]*$)")
FIELD_DELIMITER = re.compile(r"[ \t]*;[ \t]*")            # RFC 8461 3.1: sts-field-delim


class PolicyError(Exception):
    """No policy could be had from the policy host (the text says why)."""


class Policy(NamedTuple):
    """One domain's MTA-STS policy, as fetched (RFC 8461 3.2)."""
    domain: str
    id: str                 # the TXT record's id it was fetched under
    mode: str               # enforce, testing, none
    mx: tuple               # the MX patterns: "mx1.remote.test", "*.remote.test"
    max_age: int            # seconds it may be cached
    fetched: float          # when (epoch seconds)

    @property
    def expires(self):
        return self.fetched + self.max_age

    def allows(self, host):
        """RFC 8461 4.1: `host` matches a pattern: the same name, or for `*.x` one more
        label to the left of x (never two)."""
        host = host.rstrip(".").lower()
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, dot, rest = host.partition(".")
                if dot and label and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def to_json(self):
        return {"domain": self.domain, "id": self.id, "mode": self.mode, "mx": list(self.mx),
                "max_age": self.max_age, "fetched": self.fetched}

    @classmethod
    def from_json(cls, data):
        """The cached form back; ValueError when it is not exactly that."""
        try:
            policy = cls(str(data["domain"]), str(data["id"]), str(data["mode"]),
                         tuple(str(pattern) for pattern in data["mx"]), int(data["max_age"]),
                         float(data["fetched"]))
        except (KeyError, TypeError):
            raise ValueError("not a cached MTA-STS policy") from None
        if policy.mode not in MODES:
            raise ValueError(f"mode {policy.mode!r}")
        return policy


# ---------------------------------------------------------------------------------------
# The TXT record and the policy text


def txt_id(records):
    """The id of the one `v=STSv1` TXT record among `records` (dnspython TXT rdata), or None
    when there is none, more than one, or it is not valid (RFC 8461 3.1)."""
    texts = [b"".join(record.strings).decode("ascii", "replace") for record in records]
    candidates = [text for text in texts if TXT_VERSION.match(text)]
    if len(candidates) != 1:
        return None
    fields = {}
    for part in FIELD_DELIMITER.split(candidates[0])[1:]:
        key, equals, value = part.partition("=")
        if equals:
            fields.setdefault(key, value.strip(" \t"))
    found = fields.get("id", "")
    return found if ID_PATTERN.fullmatch(found) else None


def parse_policy(text, domain, policy_id, now):
    """The policy body (RFC 8461 3.2: `key: value` lines, CRLF or LF) -> Policy. Unknown keys
    are ignored; PolicyError when a required one is missing or wrong."""
    fields, patterns = {}, []
    for line in text.replace("\r\n", "\n").split("\n"):
        key, colon, value = line.partition(":")
        if not colon:
            continue
        key, value = key.strip(), value.strip()
        if key == "mx":
            patterns.append(value.rstrip(".").lower())
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version is {fields.get('version')!r}, not STSv1")
    mode = fields.get("mode")
    if mode not in MODES:
        raise PolicyError(f"mode is {mode!r}, not enforce, testing or none")
    max_age = fields.get("max_age", "")
    if not (max_age.isascii() and max_age.isdigit()) or len(max_age) > 10:
        raise PolicyError(f"max_age is {max_age!r}, not a number of seconds")
    if mode != NONE and not patterns:
        raise PolicyError(f"mode {mode} without an mx line")
    return Policy(domain, policy_id, mode, tuple(patterns), min(int(max_age), MAX_AGE_LIMIT),
                  now)


# ---------------------------------------------------------------------------------------
# The HTTPS fetch: a socket of our own, to an address our own DNS gave


class Fetcher:
    """GET the policy of a domain from its policy host (RFC 8461 3.3)."""

    def __init__(self, resolver, context, timeout):
        self.resolver = resolver
        self.context = context
        self.timeout = timeout          # each step's: connect, handshake, each read

    def fetch(self, domain):
        """The policy text, within FETCH_DEADLINE of the call. Raises PolicyError."""
        deadline = time.monotonic() + FETCH_DEADLINE      # RFC 8461 3.3: all addresses
        host = f"{POLICY_HOST_LABEL}.{domain}"
        if not host.isascii():
            raise PolicyError(f"{host} is not an A-label name")
        addresses, _ = self.resolver.addresses(host)
        if not addresses:
            raise PolicyError(f"no address for {host}")
        problems = []
        for ip in addresses:
            try:
                return self._get(host, ip, deadline)
            except (OSError, http.client.HTTPException) as error:   # ssl.SSLError is an OSError
                problems.append(f"{ip}: {_reason(error)}")
        raise PolicyError(f"https://{host}{WELL_KNOWN_PATH}: {'; '.join(problems)}")

    def _get(self, host, ip, deadline):
        """One GET to `ip`, with the TLS name (SNI and the certificate check) and Host: of
        `host`."""
        with socket.create_connection((ip, HTTPS_PORT), _time_left(deadline, self.timeout)) \
                as sock, self.context.wrap_socket(sock, server_hostname=host,
                                                  do_handshake_on_connect=False) as tls:
            tls.settimeout(_time_left(deadline, self.timeout))  # the whole handshake's
            tls.do_handshake()
            tls.settimeout(_time_left(deadline, self.timeout))
            tls.sendall(_request(host))
            reader = _Reader(tls, deadline, self.timeout)
            status, reason, headers = _head(reader)
            if status != HTTP_OK:               # RFC 8461 3.3: a 3xx is not followed
                raise PolicyError(f"HTTP {status} {reason}")
            media_type = (headers.get("Content-Type") or "").partition(";")[0].strip()
            if media_type.lower() != POLICY_MEDIA_TYPE:                 # RFC 8461 3.2
                raise PolicyError(f"media type {media_type[:60] or 'missing'}, not text/plain")
            return _body(reader, headers).decode("utf-8", "replace")


def _request(host):
    authority = host if HTTPS_PORT == DEFAULT_HTTPS_PORT else f"{host}:{HTTPS_PORT}"
    return (f"GET {WELL_KNOWN_PATH} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: smtpd\r\n"
            "Accept-Encoding: identity\r\nConnection: close\r\n\r\n").encode("ascii")


def _time_left(deadline, step):
    """What a socket operation may take: its step's timeout, or less, up to the deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _too_slow()
    return min(left, step)


def _too_slow():
    return PolicyError(f"no complete answer within {FETCH_DEADLINE}s (RFC 8461 3.3)")


class _Reader:
    """The response, read off the socket: each recv within the step's timeout and the
    fetch's deadline, each part within its own cap."""

    def __init__(self, sock, deadline, step):
        self.sock = sock
        self.deadline = deadline
        self.step = step
        self.buffer = b""

    def _receive(self):
        """More of the response into the buffer; False at its end (the host closed)."""
        self.sock.settimeout(_time_left(self.deadline, self.step))
        try:
            data = self.sock.recv(READ_SIZE)
        except socket.timeout:
            if time.monotonic() >= self.deadline:
                raise _too_slow() from None
            raise                               # this address is silent: try the next
        self.buffer += data
        return bool(data)

    def until(self, pattern, cap, what):
        """The response up to the end of the first match of `pattern`, at most `cap`
        octets."""
        searched = 0
        while True:
            found = pattern.search(self.buffer, searched)
            if found and found.end() <= cap:
                piece, self.buffer = self.buffer[:found.end()], self.buffer[found.end():]
                return piece
            if found or len(self.buffer) > cap:
                raise PolicyError(f"{what} longer than {cap} octets")
            searched = max(0, len(self.buffer) - LONGEST_LINE_END)
            if not self._receive():
                raise PolicyError(f"the connection closed in {what}")

    def exactly(self, count, what):
        while len(self.buffer) < count:
            if not self._receive():
                raise PolicyError(f"the connection closed in {what}")
        piece, self.buffer = self.buffer[:count], self.buffer[count:]
        return piece

    def to_the_end(self, cap, what):
        while len(self.buffer) <= cap:
            if not self._receive():
                return self.buffer
        raise PolicyError(f"{what} longer than {cap} octets")


def _head(reader):
    """(status, reason, headers) of the response (RFC 9112 4, 5)."""
    head = reader.until(HEAD_END, MAX_HEAD_OCTETS, "the status line and headers")
    status_line, _, header_lines = head.partition(b"\n")
    found = STATUS_LINE.fullmatch(status_line.rstrip(b"\r"))
    if not found:
        raise PolicyError("not an HTTP/1 response: "
                          f"{status_line[:80].decode('ascii', 'backslashreplace')}")
    reason = found.group(2).decode("ascii", "backslashreplace")
    return int(found.group(1)), reason, http.client.parse_headers(io.BytesIO(header_lines))


def _body(reader, headers):
    """The policy, at most MAX_POLICY_OCTETS: chunked, Content-Length long, or up to the
    end of the connection (RFC 9112 6.3)."""
    coding = headers.get("Transfer-Encoding")
    if coding is not None:
        if coding.strip().lower() != CHUNKED:
            raise PolicyError(f"transfer coding {coding.strip()!r} is not supported")
        return _chunked_body(reader)
    length = headers.get("Content-Length")
    if length is None:
        return reader.to_the_end(MAX_POLICY_OCTETS, "the policy")
    length = length.strip()
    if not (length.isascii() and length.isdigit()):
        raise PolicyError(f"Content-Length {length[:20]!r} is not a number")
    if len(length) > len(str(MAX_POLICY_OCTETS)) or int(length) > MAX_POLICY_OCTETS:
        raise PolicyError(f"the policy is longer than {MAX_POLICY_OCTETS} octets")
    return reader.exactly(int(length), "the policy")


def _chunked_body(reader):
    """RFC 9112 7.1: chunk-size [extensions] CRLF, the data, CRLF; a chunk of size 0 ends
    it (the trailers after it are not read: the connection is closed)."""
    body = b""
    while True:
        line = reader.until(LINE_END, MAX_CHUNK_LINE_OCTETS, "a chunk size line")
        size_text = line.partition(b";")[0].strip()
        if not CHUNK_SIZE.fullmatch(size_text):
            raise PolicyError("chunk size "
                              f"{size_text[:20].decode('ascii', 'backslashreplace')!r}")
        size = int(size_text, 16)
        if size == 0:
            return body
        if len(body) + size > MAX_POLICY_OCTETS:
            raise PolicyError(f"the policy is longer than {MAX_POLICY_OCTETS} octets")
        body += reader.exactly(size, "a chunk")
        if reader.exactly(len(CRLF), "a chunk") != CRLF:
            raise PolicyError("a chunk not ended by CRLF")


def _reason(error):
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate not valid: {error.verify_message}"
    return str(error) or type(error).__name__


# ---------------------------------------------------------------------------------------
# The cache under the spool, and the decision


class PolicyCache:
    """<spool>/mta-sts/<domain>.json, one policy each."""

    def __init__(self, spool_directory):
        self.directory = os.path.join(spool_directory, CACHE_DIRECTORY)

    def path(self, domain):
        return os.path.join(self.directory, f"{domain}.json")

    def load(self, domain):
        """The cached Policy, or None (none, or damaged: then it is fetched anew)."""
        try:
            with open(self.path(domain), encoding="utf-8") as cached:
                return Policy.from_json(json.load(cached))
        except (OSError, ValueError):
            return None

    def save(self, policy):
        durable.make_directories(self.directory)
        content = json.dumps(policy.to_json(), indent=1, sort_keys=True).encode()
        durable.write_file(self.path(policy.domain), content, replace=True, mode=0o600)

    def policies(self):
        """Every cached Policy, by domain (for --tls-domains)."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        found = [self.load(name[:-len(".json")]) for name in names if name.endswith(".json")]
        return [policy for policy in found if policy is not None]


class MtaSts:
    def __init__(self, resolver, context, spool_directory, log, trace=False, timeout=30):
        self.resolver = resolver
        self.fetcher = Fetcher(resolver, context, timeout)
        self.cache = PolicyCache(spool_directory)
        self.log = log
        self.trace = trace
        self._locks = {}
        self._locks_lock = threading.Lock()

    def _say(self, tag, text):
        if self.trace:
            self.log.info("%s    %s", tag, text)

    def _lock(self, domain):
        with self._locks_lock:
            return self._locks.setdefault(domain, threading.Lock())

    def policy_for(self, domain, tag=""):
        """The Policy in force for `domain`, or None. One fetch at a time per domain."""
        with self._lock(domain):
            return self._policy_for(domain, tag, time.time())

    def _policy_for(self, domain, tag, now):
        cached = self.cache.load(domain)
        if cached is not None and cached.expires <= now:
            self._say(tag, f"the cached MTA-STS policy of {domain} is past its max_age "
                           "(RFC 8461 3.2)")
            cached = None
        try:
            policy_id = txt_id(self.resolver.lookup(f"{TXT_LABEL}.{domain}", "TXT").records)
        except LookupFailed as error:
            self._say(tag, f"MTA-STS TXT lookup failed ({error}): "
                           f"{_using(cached)} (RFC 8461 3.3)")
            return cached
        if policy_id is None:
            self._say(tag, f"no valid {TXT_LABEL}.{domain} TXT record: {_using(cached)} "
                           "(RFC 8461 3.1, 10.2)")
            return cached
        if cached is not None and cached.id == policy_id:
            self._say(tag, f"MTA-STS policy of {domain} id {policy_id}: the cached one, "
                           f"mode {cached.mode}: not fetched again (RFC 8461 3.1, 5.1)")
            return cached
        return self._fetch(domain, policy_id, cached, tag, now)

    def _fetch(self, domain, policy_id, cached, tag, now):
        self._say(tag, f"MTA-STS TXT of {domain} says id {policy_id}, "
                       f"{'a new one' if cached else 'none cached'}: fetching the policy "
                       "(RFC 8461 3.3)")
        try:
            policy = parse_policy(self.fetcher.fetch(domain), domain, policy_id, now)
        except PolicyError as error:
            self.log.info("%s MTA-STS policy of %s not fetched: %s; %s", tag, domain, error,
                          _using(cached))
            return cached
        try:
            self.cache.save(policy)
        except OSError as error:
            self.log.error("%s cannot cache the MTA-STS policy of %s: %s", tag, domain, error)
        self.log.info("%s MTA-STS policy of %s (id %s): mode %s, mx %s, max_age %ds", tag,
                      domain, policy_id, policy.mode, ", ".join(policy.mx) or "-",
                      policy.max_age)
        return policy


def _using(cached):
    return (f"the cached policy (id {cached.id}, mode {cached.mode}) stays in force"
            if cached else "no policy")


def preload():
    """Import now what a fetch would import on first use (http.client parses headers with
    the email package)."""
    message = http.client.parse_headers(io.BytesIO(b"Content-Type: text/plain\r\n\r\n"))
    message.get_content_type()
    json.loads(json.dumps(Policy("a.example", "1", NONE, (), 0, 0.0).to_json()))

