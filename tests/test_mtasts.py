"""MTA-STS (RFC 8461) against a loopback DNS zone and a loopback HTTPS policy host with a
test CA: the TXT record, the fetch, the cache under the spool, and the policy text."""
import json
import os
import socket
import threading

import pytest

import mtasts
from resolver import Resolver
from smtpclient import verifying_context
from tests.conftest import make_config
from tests.dns_responder import DNSResponder
from tests.pki import pki_fixture, self_signed, server_context
from tests.policy_server import PolicyServer, policy_text
from tests.queue_world import log_text, make_log

POLICY_HOST_IP = "127.0.0.5"
POLICY_HOST = "mta-sts.remote.test"
pki_ca = pki_fixture             # the `pki` fixture: the test CA
ENFORCE_BODY = policy_text("enforce", ["mx1.remote.test", "*.backup.remote.test"])


def zone(policy_id="20261202", ip=POLICY_HOST_IP):
    return {"_mta-sts.remote.test": [("TXT", f'"v=STSv1; id={policy_id}"')],
            POLICY_HOST: [("A", ip)]}


class Setup:
    """The DNS zone, the policy host, and an MtaSts of the relay pointed at them."""

    def __init__(self, tmp_path, pki, records, body=ENFORCE_BODY, cert=None, **server):
        self.dns = DNSResponder(records)
        cert, key = cert or pki.leaf(POLICY_HOST)
        self.server = PolicyServer(POLICY_HOST_IP, server_context(cert, key), body, **server)
        config = make_config(tmp_path, **{"relay.nameservers": self.dns.nameserver})
        self.log = make_log(tmp_path)
        self.spool = str(tmp_path / "spool")
        self.sts = mtasts.MtaSts(Resolver(config, self.log), verifying_context(pki.cert_file),
                                 self.spool, self.log, trace=True, timeout=2)

    def stop(self):
        self.server.stop()
        self.dns.stop()


@pytest.fixture
def setup(tmp_path, pki, monkeypatch):
    made = []

    def make(records=None, **more):
        built = Setup(tmp_path, pki, zone() if records is None else records, **more)
        monkeypatch.setattr(mtasts, "HTTPS_PORT", built.server.port)
        made.append(built)
        return built

    yield make
    for built in made:
        built.stop()


def test_an_enforce_policy_is_fetched_and_cached_under_the_spool(setup):
    world = setup()
    policy = world.sts.policy_for("remote.test")
    assert (policy.mode, policy.id, policy.max_age) == ("enforce", "20261202", 86400)
    assert policy.mx == ("mx1.remote.test", "*.backup.remote.test")
    assert world.server.requests == [(f"{POLICY_HOST}:{world.server.port}",
                                      "/.well-known/mta-sts.txt")]
    with open(os.path.join(world.spool, "mta-sts", "remote.test.json")) as cached:
        assert json.load(cached)["id"] == "20261202"


def test_a_cached_policy_is_not_fetched_again(setup, tmp_path):
    world = setup()
    world.sts.policy_for("remote.test")
    again = world.sts.policy_for("remote.test")
    assert again.mode == "enforce"
    assert len(world.server.requests) == 1
    assert "the cached one, mode enforce: not fetched again" in log_text(tmp_path)


def test_the_cache_outlives_the_process(setup, tmp_path, pki):
    world = setup()
    world.sts.policy_for("remote.test")
    fresh = mtasts.MtaSts(world.sts.resolver, verifying_context(pki.cert_file), world.spool,
                          world.log, timeout=2)
    assert fresh.policy_for("remote.test").mode == "enforce"
    assert len(world.server.requests) == 1


def test_a_changed_id_is_fetched_again(setup):
    world = setup()
    world.sts.policy_for("remote.test")
    world.server.body = policy_text("testing", ["mx1.remote.test"])
    world.dns.records["_mta-sts.remote.test"] = [("TXT", '"v=STSv1; id=20261203"')]
    policy = world.sts.policy_for("remote.test")
    assert (policy.mode, policy.id) == ("testing", "20261203")
    assert len(world.server.requests) == 2


def test_the_cached_policy_stays_when_the_txt_record_is_gone(setup, tmp_path):
    world = setup()
    world.sts.policy_for("remote.test")
    del world.dns.records["_mta-sts.remote.test"]
    policy = world.sts.policy_for("remote.test")
    assert (policy.mode, policy.id) == ("enforce", "20261202")
    assert len(world.server.requests) == 1
    assert "no valid _mta-sts.remote.test TXT record: the cached policy (id 20261202, " \
           "mode enforce) stays in force" in log_text(tmp_path)


def test_the_cached_policy_stays_when_a_new_one_cannot_be_fetched(setup):
    world = setup()
    world.sts.policy_for("remote.test")
    world.server.status = 500
    world.dns.records["_mta-sts.remote.test"] = [("TXT", '"v=STSv1; id=20261203"')]
    assert world.sts.policy_for("remote.test").id == "20261202"


def test_a_policy_past_its_max_age_is_fetched_again(setup):
    world = setup(body=policy_text("enforce", ["mx1.remote.test"], max_age=60))
    world.sts.policy_for("remote.test")
    later = world.sts._policy_for("remote.test", "", world.sts.cache.load("remote.test")
                                  .fetched + 61)
    assert later.mode == "enforce"
    assert len(world.server.requests) == 2


def test_no_txt_record_means_no_policy_and_no_fetch(setup):
    world = setup(records={POLICY_HOST: [("A", POLICY_HOST_IP)]})
    assert world.sts.policy_for("remote.test") is None
    assert world.server.requests == []


@pytest.mark.parametrize("problem", [{"status": 404}, {"status": 301},
                                     {"content_type": "text/html"},
                                     {"content_type": "html"},          # RFC 8461 3.2
                                     {"content_type": "text/plain-ish"},
                                     {"body": "version: STSv1\r\nmode: enforce\r\n"},
                                     {"body": "x" * (mtasts.MAX_POLICY_OCTETS + 1)}])
def test_a_policy_that_cannot_be_had_is_no_policy(setup, tmp_path, problem):
    world = setup(**problem)
    assert world.sts.policy_for("remote.test") is None
    assert len(world.server.requests) == 1
    assert "MTA-STS policy of remote.test not fetched" in log_text(tmp_path)
    assert not os.path.exists(os.path.join(world.spool, "mta-sts", "remote.test.json"))


@pytest.mark.parametrize("content_type", ["text/plain; charset=utf-8", " Text/Plain "])
def test_text_plain_with_parameters_or_in_capitals_is_text_plain(setup, content_type):
    world = setup(content_type=content_type)
    assert world.sts.policy_for("remote.test").mode == "enforce"


def test_a_policy_host_with_a_certificate_no_ca_vouches_for_is_no_policy(setup, tmp_path,
                                                                       pki):
    world = setup(cert=self_signed(pki.directory, POLICY_HOST))
    assert world.sts.policy_for("remote.test") is None
    assert world.server.requests == []          # the handshake failed before any GET
    assert "certificate not valid" in log_text(tmp_path)


def test_a_policy_host_certificate_for_another_name_is_no_policy(setup, tmp_path, pki):
    world = setup(cert=pki.leaf("mta-sts.other.test"))
    assert world.sts.policy_for("remote.test") is None
    assert "certificate not valid" in log_text(tmp_path)


# ---------------------------------------------------------------------------------------
# The response as the policy host sends it, byte for byte


class RawPolicyHost:
    """A loopback HTTPS host that answers every request with `pieces` (bytes), `pause`
    seconds apart, then closes; `requests` counts the requests it read."""

    ACCEPT_POLL = 0.05
    SOCKET_TIMEOUT = 5
    MAX_REQUEST = 16 * 1024

    def __init__(self, ip, context, pieces, pause=0.0):
        self.listener = socket.create_server((ip, 0))
        self.listener.settimeout(self.ACCEPT_POLL)
        self.context = context
        self.pieces = pieces
        self.pause = pause
        self.requests = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def port(self):
        return self.listener.getsockname()[1]

    def _serve(self):
        while not self.stopped.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return                                  # the listener was closed
            try:
                self._answer(sock)
            except OSError:
                pass                                    # the client went away
            finally:
                sock.close()

    def _answer(self, sock):
        sock.settimeout(self.SOCKET_TIMEOUT)
        with self.context.wrap_socket(sock, server_side=True) as tls:
            request = b""
            while b"\r\n\r\n" not in request and len(request) < self.MAX_REQUEST:
                data = tls.recv(4096)
                if not data:
                    return
                request += data
            self.requests += 1
            for number, piece in enumerate(self.pieces):
                if number and self.stopped.wait(self.pause):
                    return
                tls.sendall(piece)

    def stop(self):
        self.stopped.set()
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def raw_host(setup, pki, monkeypatch):
    """make(pieces, pause) -> (Setup, RawPolicyHost), the MtaSts pointed at the raw host."""
    hosts = []

    def make(pieces, pause=0.0, world=None):
        world = world or setup()
        host = RawPolicyHost(POLICY_HOST_IP, server_context(*pki.leaf(POLICY_HOST)), pieces,
                             pause)
        hosts.append(host)
        monkeypatch.setattr(mtasts, "HTTPS_PORT", host.port)
        return world, host

    yield make
    for host in hosts:
        host.stop()


TEXT_PLAIN = b"Content-Type: text/plain\r\n"
POLICY = ENFORCE_BODY.encode()


def response(*headers, body=POLICY, status=b"HTTP/1.1 200 OK"):
    return status + b"\r\n" + b"".join(headers) + b"\r\n" + body


def chunked(body, size=16):
    chunks = [body[at:at + size] for at in range(0, len(body), size)]
    return b"".join(b"%x;name=value\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) \
        + b"0\r\nTrailer: ignored\r\n\r\n"


@pytest.mark.parametrize("pieces", [
    [response(TEXT_PLAIN, b"Transfer-Encoding: chunked\r\n", body=chunked(POLICY))],
    [response(TEXT_PLAIN, b"Transfer-Encoding: Chunked\r\n", body=b"")]        # piece by
    + [bytes([octet]) for octet in chunked(POLICY, 7)],                        # piece
    [response(TEXT_PLAIN)],                                                    # to the close
    [b"HTTP/1.0 200 OK\nContent-Type: text/plain\nContent-Length: %d\n\n%s"     # bare LFs
     % (len(POLICY), POLICY)],
])
def test_the_ways_a_body_may_come(raw_host, pieces):
    world, host = raw_host(pieces)
    policy = world.sts.policy_for("remote.test")
    assert (policy.mode, policy.mx) == ("enforce", ("mx1.remote.test", "*.backup.remote.test"))
    assert host.requests == 1


@pytest.mark.parametrize("pieces, reason", [
    ([response(b"Content-Length: %d\r\n" % len(POLICY))], "media type missing, not text/plain"),
    ([response(b"Content-Type: html\r\n")], "media type html, not text/plain"),
    ([response(TEXT_PLAIN, b"Transfer-Encoding: gzip, chunked\r\n", body=chunked(POLICY))],
     "transfer coding 'gzip, chunked' is not supported"),
    ([response(TEXT_PLAIN, b"Transfer-Encoding: chunked\r\n", body=b"zz\r\n")],
     "chunk size 'zz'"),
    ([response(TEXT_PLAIN, b"Transfer-Encoding: chunked\r\n",
               body=b"10000\r\n" + b"x" * 65536 + b"\r\n1\r\nx\r\n0\r\n\r\n")],
     f"the policy is longer than {mtasts.MAX_POLICY_OCTETS} octets"),
    ([response(TEXT_PLAIN, b"Content-Length: 999999999999\r\n")],
     f"the policy is longer than {mtasts.MAX_POLICY_OCTETS} octets"),
    ([response(TEXT_PLAIN, b"Content-Length: %d\r\n" % (len(POLICY) + 1))],
     "the connection closed in the policy"),
    ([response(TEXT_PLAIN, b"X-Padding: " + b"x" * mtasts.MAX_HEAD_OCTETS + b"\r\n")],
     f"the status line and headers longer than {mtasts.MAX_HEAD_OCTETS} octets"),
    ([b"SSH-2.0-OpenSSH_9.6\r\n\r\n"], "not an HTTP/1 response: SSH-2.0-OpenSSH_9.6"),
])
def test_a_response_that_is_not_a_policy_is_no_policy(raw_host, tmp_path, pieces, reason):
    world, host = raw_host(pieces)
    assert world.sts.policy_for("remote.test") is None
    assert f"MTA-STS policy of remote.test not fetched: {reason}" in log_text(tmp_path)
    assert host.requests == 1


DRIBBLE_PAUSE = 0.05            # well within a read's timeout (2 s in Setup)
DRIBBLES = 100                  # 5 s of them: far past the deadline below


@pytest.mark.parametrize("dribbled", ["headers", "body"])
def test_a_host_that_dribbles_is_cut_off_at_the_fetch_deadline(raw_host, setup, tmp_path,
                                                               monkeypatch, dribbled):
    """RFC 8461 3.3: the fetch is over within its deadline whatever part of the response is
    slow; had it waited, the host would have delivered a new, valid policy in the end."""
    world = setup()
    world.sts.policy_for("remote.test")                         # id 20261202, cached
    world.dns.records["_mta-sts.remote.test"] = [("TXT", '"v=STSv1; id=20261203"')]
    new = policy_text("testing", ["mx1.remote.test"]).encode()
    head = b"HTTP/1.1 200 OK\r\n" + TEXT_PLAIN
    if dribbled == "headers":
        pieces = [head, *[b"X"] * DRIBBLES, b": y\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(new), new)]
    else:
        padded = new + b" " * DRIBBLES
        pieces = [head + b"Content-Length: %d\r\n\r\n" % len(padded),
                  *[bytes([octet]) for octet in padded]]
    monkeypatch.setattr(mtasts, "FETCH_DEADLINE", 1)            # stands for the minute
    _, host = raw_host(pieces, pause=DRIBBLE_PAUSE, world=world)
    policy = world.sts.policy_for("remote.test")
    assert (policy.id, policy.mode) == ("20261202", "enforce")
    assert host.requests == 1
    assert "MTA-STS policy of remote.test not fetched: no complete answer within 1s " \
           "(RFC 8461 3.3); the cached policy (id 20261202, mode enforce) stays in force" \
           in log_text(tmp_path)
    assert world.sts.cache.load("remote.test").id == "20261202"


def test_a_dns_failure_keeps_the_cached_policy(setup):
    world = setup()
    world.sts.policy_for("remote.test")
    world.dns.records["_mta-sts.remote.test"] = "SERVFAIL"
    assert world.sts.policy_for("remote.test").mode == "enforce"


def test_the_real_https_port_443(tmp_path, pki, monkeypatch):
    """RFC 8461 3.3: the policy host is asked on port 443, which needs root to listen on."""
    if os.geteuid() != 0:
        if os.environ.get("SMTPD_CI"):
            pytest.fail("CI runs as root: port 443 must be usable here")
        pytest.skip("listening on port 443 needs root (CI runs this as root)")
    assert mtasts.HTTPS_PORT == 443
    dns_server = DNSResponder(zone(ip="127.0.0.21"))
    cert, key = pki.leaf(POLICY_HOST)
    server = PolicyServer("127.0.0.21", server_context(cert, key), ENFORCE_BODY, port=443)
    try:
        config = make_config(tmp_path, **{"relay.nameservers": dns_server.nameserver})
        log = make_log(tmp_path)
        sts = mtasts.MtaSts(Resolver(config, log), verifying_context(pki.cert_file),
                            str(tmp_path / "spool"), log, timeout=2)
        assert sts.policy_for("remote.test").mode == "enforce"
        assert server.requests == [(POLICY_HOST, "/.well-known/mta-sts.txt")]
    finally:
        server.stop()
        dns_server.stop()


# ---------------------------------------------------------------------------------------
# The record and the text


class _Txt:
    def __init__(self, *strings):
        self.strings = [text.encode() for text in strings]


@pytest.mark.parametrize("records, expected", [
    ([_Txt("v=STSv1; id=abc123")], "abc123"),
    ([_Txt("v=STSv1; ", "id=abc123;")], "abc123"),            # split strings join
    ([_Txt("v=spf1 -all"), _Txt("v=STSv1; id=x1")], "x1"),    # others are ignored
    ([_Txt("v=STSv1; id=a"), _Txt("v=STSv1; id=b")], None),   # RFC 8461 3.1: not one
    ([_Txt("v=STSv1")], None),                                # no id
    ([_Txt("v=STSv1; id=not-alnum")], None),
    ([_Txt("v=STSv1; id=" + "a" * 33)], None),                # at most 32
    ([_Txt("v=STSv1 ; id=20261202")], "20261202"),            # RFC 8461 3.1: *WSP ";"
    ([_Txt("v=STSv1\t;\tid=abc ;")], "abc"),                   # *WSP, a trailing delimiter
    ([_Txt("v=STSv1;id=abc;ext_1=x")], "abc"),                # an extension
    ([_Txt("v=STSv10; id=abc")], None),                       # another version
    ([_Txt("v=STSv1 ; id=a"), _Txt("v=STSv1; id=b")], None),  # still two
    ([], None),
])
def test_the_txt_record(records, expected):
    assert mtasts.txt_id(records) == expected


def test_the_policy_text_and_its_mx_patterns():
    text = "version: STSv1\nmode: enforce\nmx: MX1.Remote.Test.\nmx: *.b.remote.test\n" \
           "max_age: 999999999\nextension: ignored\n"
    policy = mtasts.parse_policy(text, "remote.test", "1", 0.0)
    assert policy.max_age == mtasts.MAX_AGE_LIMIT               # RFC 8461 3.2: a year
    assert policy.allows("mx1.remote.test") and policy.allows("MX1.REMOTE.TEST.")
    assert policy.allows("x.b.remote.test")
    assert not policy.allows("b.remote.test")                   # the wildcard needs a label
    assert not policy.allows("y.x.b.remote.test")               # and only one
    assert not policy.allows("mx2.remote.test")


@pytest.mark.parametrize("text", [
    "mode: enforce\nmx: a.test\nmax_age: 1\n",                  # no version
    "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmax_age: 1\n",              # no mx
    "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
])
def test_a_policy_text_that_is_not_valid(text):
    with pytest.raises(mtasts.PolicyError):
        mtasts.parse_policy(text, "remote.test", "1", 0.0)
