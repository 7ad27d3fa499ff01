"""RFC 8305 connection racing among equally preferred MXs (racing.py), on loopback: a host
that drops SYNs (tests.fake_mx.Blackhole), one that refuses, one that answers."""
import errno
import smtplib
import socket

import pytest

import racing
from resolver import Hop
from tests.conftest import make_config
from tests.fake_mx import Blackhole, free_port
from tests.queue_world import LoopbackWorld, a_record
from tests.waiting import wait_until


@pytest.fixture
def port():
    return free_port(["127.0.0.3", "127.0.0.4", "127.0.0.5"])


@pytest.fixture
def blackhole(port):
    hole = Blackhole("127.0.0.3", port)
    yield hole
    hole.stop()


@pytest.fixture
def listening(port):
    server = socket.socket()
    server.bind(("127.0.0.5", port))
    server.listen(8)
    yield server
    server.close()


def test_the_host_that_answers_wins_over_one_that_never_does(port, blackhole, listening):
    hops = [Hop("127.0.0.3", port), Hop("127.0.0.5", port)]
    winner, sock, failures = racing.first_to_connect(hops, timeout=10)
    try:
        assert winner == Hop("127.0.0.5", port)
        assert sock.getpeername() == ("127.0.0.5", port)
        assert sock.getblocking()
        assert failures == []
        accepted, _ = listening.accept()     # the connection is real
        accepted.close()
    finally:
        sock.close()


def test_a_refused_host_is_reported_and_the_next_is_tried_at_once(port, listening):
    hops = [Hop("127.0.0.4", port), Hop("127.0.0.5", port)]     # nothing on .4
    winner, sock, failures = racing.first_to_connect(hops, timeout=10, delay=30)
    sock.close()
    assert winner == Hop("127.0.0.5", port)
    assert [(hop, error.errno) for hop, error in failures] == \
        [(Hop("127.0.0.4", port), errno.ECONNREFUSED)]


def test_none_connected_says_how_each_failed(port, blackhole):
    hops = [Hop("127.0.0.3", port), Hop("127.0.0.4", port)]
    with pytest.raises(racing.NoneConnected) as raised:
        racing.first_to_connect(hops, timeout=0.6, delay=0.1)
    failures = dict(raised.value.failures)
    assert failures[Hop("127.0.0.4", port)].errno == errno.ECONNREFUSED
    assert isinstance(failures[Hop("127.0.0.3", port)], TimeoutError)


def test_families_take_turns_starting_with_the_first():
    hops = [Hop("2001:db8::1", 25), Hop("2001:db8::2", 25), Hop("192.0.2.1", 25),
            Hop("192.0.2.2", 25), Hop("2001:db8::3", 25)]
    assert [hop.ip for hop in racing.interleaved(hops)] == \
        ["2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2", "2001:db8::3"]


def test_mail_goes_to_the_equal_mx_that_answers_without_waiting_out_the_others(tmp_path,
                                                                               start_server):
    """Three MXs of preference 10, two of them dropping SYNs. The connect timeout is 60 s and
    the test waits 15 s: tried one by one in the shuffled order, two times in three the mail
    would wait a whole timeout first."""
    world = LoopbackWorld()
    holes = []
    try:
        world.resolve({"remote.test": [("MX", "10 a.remote.test."), ("MX", "10 b.remote.test."),
                                       ("MX", "10 c.remote.test.")],
                       "a.remote.test": a_record("127.0.0.3"),
                       "b.remote.test": a_record("127.0.0.4"),
                       "c.remote.test": a_record("127.0.0.5")})
        holes = [Blackhole("127.0.0.3", world.port), Blackhole("127.0.0.4", world.port)]
        answering = world.mx("127.0.0.5")
        server = start_server(make_config(tmp_path, **world.overrides(
            **{"relay.connect_timeout": "60", "log.trace": "yes"})))
        with smtplib.SMTP(*server.address, timeout=10) as client:
            client.sendmail("alice@test.ru", ["bob@remote.test"],
                            "Subject: race\r\n\r\nwho answers first\r\n")
        assert answering.wait_for(1, timeout=15)
        assert answering.messages[0][1] == ["bob@remote.test"]
        assert wait_until(lambda: not server.system.spool.names())
        log = (tmp_path / "logs" / "smtpd.log").read_text()
        assert f"127.0.0.5:{world.port} connected first of 3 equally preferred addresses " \
               "(RFC 8305)" in log
    finally:
        for hole in holes:
            hole.stop()
        world.stop()


def test_the_real_server_races_equal_mxs(tmp_path):
    """`python smtpd.py` as users run it (root, then nobody), with [server] processes = 2:
    the queue process races a SYN-dropping MX against one that answers."""
    from tests.daemon import Sandbox
    sandbox = Sandbox()
    hole = None
    try:
        mx = sandbox.mx("127.0.0.5")
        hole = Blackhole("127.0.0.3", mx.port)
        dns = sandbox.dns({"remote.test": [("MX", "10 a.remote.test."),
                                           ("MX", "10 b.remote.test.")],
                           "a.remote.test": [("A", "127.0.0.3")],
                           "b.remote.test": [("A", "127.0.0.5")]})
        server = sandbox.start({"relay.nameservers": dns.nameserver, "relay.port": mx.port,
                                "relay.connect_timeout": "60", "server.processes": "2"})
        with smtplib.SMTP(*server.address, timeout=10) as client:
            client.sendmail("alice@test.ru", ["bob@remote.test"],
                            "Subject: race\r\n\r\nwho answers first\r\n")
        assert mx.wait_for(1, timeout=15), server.stderr_text(last=30)
        assert sandbox.wait_for_empty_queue(), sandbox.queued()
        assert server.stop() == 0
    finally:
        if hole:
            hole.stop()
        sandbox.cleanup()
