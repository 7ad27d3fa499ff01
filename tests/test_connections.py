"""The relay's connection cache (connections.py) over the wire: a QueueRunner, spool files,
loopback DNS and FakeMXs; what each MX saw (sessions, commands, messages) and the spool."""
import socket
import time

import pytest

from connections import CacheKey, CachedSession, ConnectionCache
from queuerunner import QueueRunner
from resolver import Hop
from smtpclient import Response
from tests.conftest import make_config
from tests.queue_world import RecordingSubmit, a_record, make_log, make_router, make_spool, \
    write_spool
from tests.queue_world import world_fixture  # noqa: F401  (the `world` fixture)
from tests.waiting import wait_until

BOB, CAROL, DAVE = "bob@remote.test", "carol@remote.test", "dave@other.test"
ONE_MX = {"remote.test": [("MX", "10 mx1.remote.test.")],
          "other.test": [("MX", "10 mx1.remote.test.")],
          "mx1.remote.test": a_record("127.0.0.2")}
SHORT_IDLE = 0.5            # seconds: the cache's idle limit in these tests


@pytest.fixture
def spool(tmp_path):
    return make_spool(tmp_path)


@pytest.fixture
def runner(tmp_path, world, spool):
    world.resolve(ONE_MX)
    config = make_config(tmp_path, **world.overrides(**{"relay.workers": "1"}))
    queue = QueueRunner(config, spool, make_router(), RecordingSubmit(), make_log(tmp_path))
    queue.connections.idle_limit = SHORT_IDLE
    yield queue
    queue.stop(grace=2)


def deliver(runner, spool, recipients):
    """Queue one message and wait until its pass is over; returns its name."""
    name = write_spool(spool, recipients)
    runner.enqueue(name)
    assert runner.wait_for_one_pass(time.time(), timeout=10)
    return name


def verbs(mx):
    return [line.split()[0].upper() for line in mx.commands]


NO_PIPELINING = ("250-fake.mx", "250-SIZE 100000000", "250 8BITMIME")


@pytest.mark.parametrize("ehlo", [None, NO_PIPELINING], ids=["pipelining", "one-by-one"])
def test_two_messages_for_one_domain_share_one_connection(world, spool, runner, ehlo):
    mx = world.mx("127.0.0.2", **({"ehlo": ehlo} if ehlo else {}))
    runner.start()
    deliver(runner, spool, [BOB])
    deliver(runner, spool, [CAROL])
    assert [rcpts for _, rcpts, _ in mx.messages] == [[BOB], [CAROL]]
    assert mx.sessions == 1
    # RFC 5321 4.1.1.5: RSET between the two transactions, no second greeting or EHLO
    assert verbs(mx) == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"]
    assert spool.names() == []


def test_an_idle_connection_is_closed_with_quit_after_its_limit(world, spool, runner):
    mx = world.mx("127.0.0.2")
    runner.start()
    deliver(runner, spool, [BOB])
    started = time.monotonic()
    assert runner.connections.idle_count() == 1
    assert mx.wait_for_quit(timeout=5)
    assert time.monotonic() - started >= SHORT_IDLE * 0.8
    assert wait_until(lambda: runner.connections.idle_count() == 0, timeout=2)
    deliver(runner, spool, [CAROL])         # and the next message connects anew
    assert mx.sessions == 2 and len(mx.messages) == 2


def test_a_cached_connection_the_remote_closed_is_replaced(world, spool, runner):
    mx = world.mx("127.0.0.2")
    runner.start()
    deliver(runner, spool, [BOB])
    for sock in list(mx.open_sockets):       # the remote hangs up while the session idles
        sock.shutdown(socket.SHUT_RDWR)
    deliver(runner, spool, [CAROL])
    assert [rcpts for _, rcpts, _ in mx.messages] == [[BOB], [CAROL]]    # none lost or twice
    assert mx.sessions == 2
    assert spool.names() == []


def test_a_connection_is_not_shared_between_domains(world, spool, runner):
    """The TLS rules (MTA-STS, the TLS memory) are per domain: so is the cache."""
    mx = world.mx("127.0.0.2")
    runner.start()
    deliver(runner, spool, [BOB])
    deliver(runner, spool, [DAVE])
    assert [rcpts for _, rcpts, _ in mx.messages] == [[BOB], [DAVE]]
    assert mx.sessions == 2


def test_a_transaction_that_sent_no_text_ends_with_quit(world, spool, runner):
    mx = world.mx("127.0.0.2", rcpt=["550 5.1.1 no such user"])
    runner.start()
    deliver(runner, spool, [BOB])
    assert mx.wait_for_quit(timeout=SHORT_IDLE / 2)     # at once, not at the idle limit
    assert runner.connections.idle_count() == 0


def test_a_refused_mail_under_pipelining_reads_every_reply_and_quits(world, spool, runner):
    mx = world.mx("127.0.0.2", mail_reply="451 4.3.0 busy")
    runner.start()
    name = deliver(runner, spool, [BOB, CAROL])
    assert mx.wait_for_quit(timeout=SHORT_IDLE / 2)
    assert verbs(mx) == ["EHLO", "MAIL", "RCPT", "RCPT", "QUIT"]
    record = spool.read_state(name)["recipients"]
    assert {record[key]["status"] for key in (BOB, CAROL)} == {"pending"}
    assert record[BOB]["last_error"].startswith("451 4.3.0 busy")
    assert runner.connections.idle_count() == 0


@pytest.mark.parametrize("ehlo", [None, NO_PIPELINING], ids=["pipelining", "one-by-one"])
def test_a_refused_rset_means_a_new_connection(world, spool, runner, ehlo):
    mx = world.mx("127.0.0.2", **({"ehlo": ehlo} if ehlo else {}))
    runner.start()
    deliver(runner, spool, [BOB])
    [key] = runner.connections.idle_keys()
    session = runner.connections.take(key)
    runner.connections.give_back(key, session._replace(client=BrokenRset(session.client)))
    deliver(runner, spool, [CAROL])
    assert [rcpts for _, rcpts, _ in mx.messages] == [[BOB], [CAROL]]
    assert mx.sessions == 2


class BrokenRset:
    """A cached client whose RSET is answered 421 (the remote is shutting down), alone or
    as the first of a pipelined group (RFC 2920)."""

    def __init__(self, client):
        self.client = client
        self.refusing = False

    def __getattr__(self, name):
        return getattr(self.client, name)

    def command(self, line, timeout=None):
        if line == "RSET":
            return SHUTTING_DOWN
        return self.client.command(line, timeout)

    def send_lines(self, lines):
        self.refusing = lines[0] == "RSET"
        if not self.refusing:
            self.client.send_lines(lines)

    def reply(self, timeout):
        return SHUTTING_DOWN if self.refusing else self.client.reply(timeout)


SHUTTING_DOWN = Response(421, ("421 4.3.2 shutting down",))


# The cache itself


class FakeClient:
    def __init__(self):
        self.commands, self.closed = [], False

    def command(self, line, timeout=None):
        self.commands.append(line)

    def close(self):
        self.closed = True


def a_session(opened=None):
    return CachedSession(FakeClient(), {}, "plain", time.monotonic() if opened is None
                         else opened)


def test_a_session_taken_is_nobody_elses():
    cache = ConnectionCache(log=None, idle_limit=10)
    key = CacheKey("remote.test", Hop("127.0.0.2", 25), "plain")
    session = a_session()
    cache.give_back(key, session)
    assert cache.take(key).client is session.client
    assert cache.take(key) is None
    cache.close()


def test_a_session_too_old_is_not_kept():
    cache = ConnectionCache(log=None, idle_limit=10, age_limit=5)
    key = CacheKey("remote.test", Hop("127.0.0.2", 25), "plain")
    session = a_session(opened=time.monotonic() - 6)
    cache.give_back(key, session)
    assert cache.take(key) is None
    assert session.client.commands == ["QUIT"] and session.client.closed


def test_close_quits_every_idle_session():
    cache = ConnectionCache(log=None, idle_limit=10)
    sessions = [a_session(), a_session()]
    for number, session in enumerate(sessions):
        cache.give_back(CacheKey(f"d{number}.test", Hop("127.0.0.2", 25), "plain"), session)
    cache.close()
    assert all(session.client.closed and session.client.commands == ["QUIT"]
               for session in sessions)
    later = a_session()
    cache.give_back(CacheKey("d0.test", Hop("127.0.0.2", 25), "plain"), later)
    assert later.client.closed and cache.idle_count() == 0
