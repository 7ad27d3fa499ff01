"""Issue 17 the way users run it: `[server] processes = N` on the real `python smtpd.py`.

With processes = N > 1 the process the user starts is a supervisor that forks a queue process
and N accepting processes (processes.py's docstring is the design). These tests start it as
root (the drop to nobody), find its children in /proc, and prove what a user sees: mail
delivered by every accepting process, limits that hold across processes, children forked
again after a crash, --flush and SIGTERM reaching the supervisor, one log file.

Which accepting process a client reaches is the kernel's choice. Where a test needs a
session on a given process it stops the others (SIGSTOP) while the client connects and is
greeted, so only that one can accept, then lets them go on (SIGCONT); the process holding
the connection is then checked in /proc (the socket's inode in /proc/net/tcp, found among
the process's descriptors). The fixture continues and ends every child a test saw, whatever
happened to the test.
"""
import contextlib
import http.client
import json
import os
import re
import signal
import socketserver
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from tests.daemon import (ROOT, STOP_TIMEOUT, Sandbox, is_root, nonblank_lines, require_root,
                          run_user)
from tests.fake_mx import free_port
from tests.test_daemon import route, temporary_error, text
from tests.waiting import wait_until
from tests.wire import Client

TWO = {"server.processes": "2"}
LOG_LIMIT = 10 << 20                # log.Log's max_bytes: smtpd.log is rotated past 10 MiB
REOPEN_WITHIN = 1.0                 # log.py: the others open the new file within a second
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
STAMP_INSIDE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")  # a second line run in
SESSION_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[([0-9a-f]+)\] "
                          r"127\.0\.0\.1:(\d+) (.*)$")
MAILDIR_PID = re.compile(r"\.M\d+P(\d+)Q\d+\.")    # storage.py: time.M<usec>P<pid>Q<n>.host


# ---------------------------------------------------------------------------------------
# /proc: the supervisor's children, their sockets, stopping and continuing them

_seen = {}                          # pid -> start time of every child a test looked at


def proc_stat(pid):
    """(state, ppid, start time) from /proc/<pid>/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            data = stat_file.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def running(pid):
    """True while `pid` is a process that has not exited (a zombie has)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def children(pid):
    """The live children of `pid`, by the ppid in /proc/*/stat."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = proc_stat(int(name))
        if stat and stat[1] == pid and stat[0] not in ("Z", "X"):
            found.append(int(name))
            _seen.setdefault(int(name), stat[2])
    return sorted(found)


def uids(pid):
    with open(f"/proc/{pid}/status") as status_file:
        for line in status_file:
            if line.startswith("Uid:"):
                return [int(uid) for uid in line.split()[1:]]
    return []


def thread_count(pid):
    with open(f"/proc/{pid}/status") as status_file:
        for line in status_file:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def tcp_sockets():
    """[(local port, remote port, state, inode)] of every TCP socket in /proc/net/tcp{,6}."""
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as table:
                lines = table.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            rows.append((int(fields[1].rsplit(":", 1)[1], 16),
                         int(fields[2].rsplit(":", 1)[1], 16), fields[3], int(fields[9])))
    return rows


def socket_inodes(pid):
    """The inodes of the sockets among the descriptors of `pid`."""
    inodes = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listening_inodes(port):
    return {inode for local, _, state, inode in tcp_sockets()
            if local == port and state == "0A"}


def holder(inodes, pids):
    """The one of `pids` that has one of the sockets `inodes`, or None."""
    inodes = inodes - {0}
    for pid in pids:
        if socket_inodes(pid) & inodes:
            return pid
    return None


def connection_owner(server, client, pids):
    """Which of `pids` holds the server's end of `client`'s connection."""
    client_port = client.sock.getsockname()[1]
    return holder({inode for local, remote, state, inode in tcp_sockets()
                   if local == server.port and remote == client_port and state == "01"}, pids)


@dataclass
class Tree:
    supervisor: int
    queue: int
    accepting: list

    @property
    def children(self):
        return [self.queue, *self.accepting]


def process_tree(server, accepting, timeout=10):
    """The supervisor's children once there are `accepting` processes holding the SMTP
    listening socket and one (the queue process) not holding it."""
    def look():
        kids = children(server.pid)
        listening = listening_inodes(server.port)
        serving = [pid for pid in kids if socket_inodes(pid) & listening]
        others = [pid for pid in kids if pid not in serving]
        if len(serving) == accepting and len(others) == 1:
            return Tree(server.pid, others[0], sorted(serving))
        return None

    tree = wait_until(look, timeout)
    assert tree, (f"no supervisor with {accepting} accepting processes and a queue process: "
                  f"children {children(server.pid)}\n{server.stderr_text(last=30)}")
    return tree


@contextlib.contextmanager
def paused(pids):
    """The processes `pids` stopped (SIGSTOP) for the duration; continued after, always."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        assert wait_until(lambda: all((proc_stat(pid) or ("?",))[0] in "Tt" for pid in pids),
                          5), [proc_stat(pid) for pid in pids]
        yield
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


class ClientFrom(Client):
    """tests.wire.Client connecting from a chosen loopback address."""

    def __init__(self, address, source="127.0.0.1", timeout=10):
        self.sock = socket.create_connection(address[:2], timeout=timeout,
                                             source_address=(source, 0))
        self.buffer = b""
        self.greeting = self.reply()


def session_on(server, tree, pid, source="127.0.0.1", timeout=10):
    """A client greeted by accepting process `pid` (the others stopped while it connects).
    Returns the client whatever its greeting; a 220 is checked to be `pid`'s."""
    with paused([other for other in tree.accepting if other != pid]):
        client = ClientFrom(server.address, source, timeout)
    if client.greeting[0] == 220:
        owner = connection_owner(server, client, tree.accepting)
        assert owner == pid, f"the session went to {owner}, not {pid}"
    return client


def greeted_within(connect, timeout=5):
    """Connect (with `connect()`) until a client is greeted 220, bounded: an ended session's
    place is given back asynchronously. The greeted client, or the last one refused."""
    deadline = time.monotonic() + timeout
    for _ in range(200):
        client = connect()
        if client.greeting[0] == 220 or time.monotonic() > deadline:
            return client
        client.close()
        time.sleep(0.05)
    return client


def delivering_pids(sandbox, address):
    """The pids in the Maildir file names of `address` (storage.py names them P<pid>)."""
    local_part, domain = address.split("@")
    folder = os.path.join(sandbox.maildir, domain, local_part, "new")
    return [int(MAILDIR_PID.search(name).group(1)) for name in sorted(os.listdir(folder))]


def log_waits_for(sandbox, pattern, timeout=10):
    """The first match of `pattern` in smtpd.log, waited for (bounded); None if none came."""
    return wait_until(lambda: re.search(pattern, sandbox.log_text(), re.M), timeout)


def transaction(client, sender="bob@test.ru", recipients=("alice@test.ru",),
                subject="hello", helo="client.example"):
    code, lines = client.send_message(sender, list(recipients), text(subject), helo=helo)
    assert code == 250, lines
    assert client.code("QUIT") == 221
    return lines[-1]


def web_json(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (path, response.status, body[:300])
        return body
    finally:
        connection.close()


@pytest.fixture
def sandbox():
    box = Sandbox()
    _seen.clear()
    yield box

    def ours(pid, started):
        stat = proc_stat(pid)
        return stat is not None and stat[2] == started and stat[0] not in ("Z", "X")

    for pid, started in list(_seen.items()):       # none left stopped, whatever happened
        if ours(pid, started):
            os.kill(pid, signal.SIGCONT)
    for server in box.processes:                    # stopped as a user stops it...
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(10)
    for pid, started in list(_seen.items()):       # ...and no child left behind, even one
        if ours(pid, started):                      # that outlived its supervisor (it would
            os.kill(pid, signal.SIGKILL)            # hold the console pipes open)
    wait_until(lambda: not any(ours(pid, started) for pid, started in _seen.items()), 10)
    box.cleanup()
    _seen.clear()


# ---------------------------------------------------------------------------------------
# 1-3. Starting


def test_two_processes_run_as_nobody_and_each_accepting_process_delivers(sandbox):
    server = sandbox.start(TWO)
    tree = process_tree(server, 2)
    assert children(server.pid) == sorted(tree.children)         # ps: supervisor + 3
    log = sandbox.log_text()
    assert f"listening on 127.0.0.1:{server.port}\n" in log, log
    assert "2 accepting processes and a queue process ([server] processes)\n" in log, log
    assert thread_count(server.pid) == 1, "the supervisor must not start threads"
    if is_root():
        uid, _ = run_user()
        for pid in (server.pid, *tree.children):
            assert uids(pid) == [uid] * 4, (pid, uids(pid))

    for pid in tree.accepting:                      # one session pinned on each process
        with session_on(server, tree, pid) as client:
            assert client.greeting[0] == 220, client.greeting
            transaction(client, subject=f"from {pid}")
    for number in range(3):                         # and a few wherever the kernel puts them
        with Client(server.address) as client:
            assert client.greeting[0] == 220, client.greeting
            transaction(client, subject=f"free {number}")
    stored = sandbox.maildir_messages("alice@test.ru")
    assert len(stored) == 5, len(stored)
    delivered_by = delivering_pids(sandbox, "alice@test.ru")
    assert set(tree.accepting) <= set(delivered_by) <= set(tree.accepting), delivered_by
    for pid in tree.accepting:
        assert any(f"Subject: from {pid}".encode() in message for message in stored)
    assert server.stop() == 0
    require_root("the privilege drop is only checked when started as root")


def test_the_accepting_processes_give_sessions_and_messages_names_apart(sandbox):
    """ids.py: the accepting processes are forked from one supervisor; each must name its
    sessions and messages from a random state of its own, or they repeat each other's."""
    server = sandbox.start(TWO)
    tree = process_tree(server, 2)
    queue_ids = []
    for pid in tree.accepting:
        for number in range(3):
            with session_on(server, tree, pid) as client:
                assert client.greeting[0] == 220, client.greeting
                queued = transaction(client, subject=f"{pid} {number}")
            queue_ids.append(re.search(r"queued as ([0-9a-f]{16})$", queued).group(1))
    assert server.stop() == 0
    assert len(set(queue_ids)) == len(queue_ids), queue_ids
    session_ids = {SESSION_LINE.match(line).group(1) for line in sandbox.log_text().splitlines()
                   if SESSION_LINE.match(line)}
    assert len(session_ids) == len(queue_ids), session_ids
    stored = sandbox.maildir_messages("alice@test.ru")
    assert len(stored) == len(queue_ids)
    for queue_id in queue_ids:                      # each Received: line names its message
        assert sum(f"id {queue_id}".encode() in message for message in stored) == 1, queue_id


def test_processes_auto_starts_one_accepting_process_per_core(sandbox):
    cores = os.cpu_count() or 1
    server = sandbox.start({"server.processes": "auto"})
    if cores == 1:                                  # auto is then the single process
        assert children(server.pid) == [], children(server.pid)
    else:
        tree = process_tree(server, cores)
        assert len(children(server.pid)) == cores + 1
        assert (f"{cores} accepting processes and a queue process ([server] processes)\n"
                in sandbox.log_text()), sandbox.log_text()
        assert len(tree.accepting) == cores
    with Client(server.address) as client:
        assert client.greeting[0] == 220
        transaction(client)
    assert len(sandbox.maildir_messages("alice@test.ru")) == 1
    assert server.stop() == 0


@pytest.mark.parametrize("value, problem", [("0", "must be at least 1"),
                                            ("lots", "not a number of processes (1 to 256) "
                                                     "or auto")])
def test_a_bad_processes_value_is_refused_with_one_line(sandbox, value, problem):
    rc, stderr = sandbox.start_expecting_exit({"server.processes": value})
    assert rc != 0
    lines = nonblank_lines(stderr)
    assert len(lines) == 1 and "[server] processes" in lines[0], stderr
    assert value in lines[0] and problem in lines[0], lines


# ---------------------------------------------------------------------------------------
# 4. Limits hold across processes


@pytest.mark.parametrize("limit, sources, refusal", [
    ({"server.max_clients_per_ip": "2"}, ("127.0.0.1", "127.0.0.1", "127.0.0.1"),
     "too many connections from your address"),            # replies.TOO_MANY_FROM_YOU
    ({"server.max_clients": "2"}, ("127.0.0.1", "127.0.0.2", "127.0.0.3"),
     "too many connections, try again later"),              # replies.TOO_MANY_CLIENTS
], ids=["max_clients_per_ip", "max_clients"])
def test_client_limits_count_the_sessions_of_every_process(sandbox, limit, sources, refusal):
    server = sandbox.start({**TWO, **limit})
    tree = process_tree(server, 2)
    first_process, second_process = tree.accepting
    first = session_on(server, tree, first_process, sources[0])
    second = session_on(server, tree, second_process, sources[1])
    try:
        assert first.greeting[0] == 220 and second.greeting[0] == 220
        for pid in tree.accepting:                  # each process knows of the other's
            with session_on(server, tree, pid, sources[2]) as third:
                code, lines = third.greeting
                assert code == 421 and "4.7.0" in lines[-1] and refusal in lines[-1], lines
                assert third.closed()
        assert first.code("QUIT") == 221
        first.close()
        # the place first held is given back (asynchronously) and usable on the other process
        again = greeted_within(lambda: session_on(server, tree, second_process, sources[2]))
        with again:
            assert again.greeting[0] == 220, again.greeting
            # the freed place is taken again, on either process: the count did not drift
            with session_on(server, tree, first_process, sources[2]) as after:
                assert after.greeting[0] == 421, after.greeting
            transaction(again)
        assert len(sandbox.maildir_messages("alice@test.ru")) == 1
        assert second.code("NOOP") == 250
    finally:
        first.close()
        second.close()
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 5-6. The queue process relays; --flush reaches it


def test_relayed_mail_is_delivered_by_the_queue_process(sandbox):
    mx = sandbox.mx("127.0.0.2", hang_on_quit=True)     # the connection stays open after 250
    server = sandbox.start({**TWO, "relay.routes": route("remote.test", mx)})
    tree = process_tree(server, 2)
    with Client(server.address) as client:
        transaction(client, "alice@test.ru", ["bob@remote.test"], subject="relayed")
    assert mx.wait_for(1, timeout=15), sandbox.log_text()[-3000:]
    assert mx.messages[0][:2] == ("alice@test.ru", ["bob@remote.test"])
    assert b"Subject: relayed" in mx.messages[0][2]
    to_mx = {inode for local, remote, state, inode in tcp_sockets()
             if remote == mx.port and local != mx.port and state == "01"}
    assert holder(to_mx, tree.children) == tree.queue, \
        f"the MX connection is held by {holder(to_mx, tree.children)}, not the queue process"
    mx.stop()                                       # ends the QUIT it never answers
    assert sandbox.wait_for_empty_queue(), sandbox.queued()
    assert server.stop() == 0


def test_flush_asks_the_supervisor_and_the_queue_process_delivers_at_once(sandbox):
    mx = sandbox.mx("127.0.0.4", rcpt=("450 4.2.0 busy", "250 2.1.5 ok"))
    server = sandbox.start({**TWO, "relay.routes": route("remote.test", mx),
                            "relay.retry": "3600"})     # only the flush explains a delivery
    process_tree(server, 2)
    with Client(server.address) as client:
        transaction(client, "alice@test.ru", ["bob@remote.test"], subject="flushed")
    listing = sandbox.wait_for_listing(lambda listing: temporary_error(listing,
                                                                       "bob@remote.test"))
    assert "450 4.2.0" in listing, listing
    assert not mx.messages

    rc, out, err = sandbox.run_cli("--flush")
    assert rc == 0, out + err
    assert f"asked the running server (pid {server.pid})" in out + err, out + err
    assert mx.wait_for(1, timeout=15), sandbox.log_text()[-3000:]
    assert b"Subject: flushed" in mx.messages[0][2]
    assert sandbox.wait_for_empty_queue(), sandbox.queued()
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 7-8. A child killed is forked again


def test_a_killed_accepting_process_is_restarted_and_its_clients_places_freed(sandbox):
    server = sandbox.start({**TWO, "server.max_clients_per_ip": "1"})
    tree = process_tree(server, 2)
    held = Client(server.address)
    try:
        assert held.greeting[0] == 220
        assert held.code("EHLO held.example") == 250
        victim = connection_owner(server, held, tree.accepting)
        assert victim in tree.accepting
        os.kill(victim, signal.SIGKILL)
        assert held.closed(), "the killed process's client is still connected"
    finally:
        held.close()
    ended = log_waits_for(sandbox, rf"^.* accepting process (\d+) \(pid {victim}\) ended "
                                   r"unexpectedly \(killed by signal 9\); starting it again$")
    assert ended, sandbox.log_text()[-2000:]
    number = ended.group(1)
    # its one place from 127.0.0.1 is free at once: the supervisor frees it before that line
    with Client(server.address) as client:
        assert client.greeting[0] == 220, client.greeting
        transaction(client, subject="after the crash")
    restarted = log_waits_for(sandbox, rf"^.* accepting process {number} started again "
                                       r"\(pid (\d+)\)$")
    assert restarted, sandbox.log_text()[-2000:]
    new_pid = int(restarted.group(1))
    tree = process_tree(server, 2)
    assert victim not in tree.children and new_pid in tree.accepting, (tree, new_pid)
    with greeted_within(lambda: session_on(server, tree, new_pid)) as client:
        assert client.greeting[0] == 220, client.greeting
        transaction(client, subject="on the new process")
    assert len(sandbox.maildir_messages("alice@test.ru")) == 2
    assert new_pid in delivering_pids(sandbox, "alice@test.ru")
    assert server.stop() == 0


def test_a_killed_queue_process_is_restarted_and_mail_queued_meanwhile_is_delivered(sandbox):
    mx = sandbox.mx("127.0.0.3")
    server = sandbox.start({**TWO, "relay.routes": route("remote.test", mx),
                            "relay.retry": "3600"})
    tree = process_tree(server, 2)
    with paused([tree.queue]):                          # it cannot take the mail...
        with Client(server.address) as client:
            transaction(client, "alice@test.ru", ["bob@remote.test"], subject="meanwhile")
        assert [name for name in sandbox.queued() if name.endswith(".smtp")], sandbox.queued()
        os.kill(tree.queue, signal.SIGKILL)              # ...and dies with it handed over
    ended = log_waits_for(sandbox, rf"^.* queue process \(pid {tree.queue}\) ended "
                                   r"unexpectedly \(killed by signal 9\); starting it again$")
    assert ended, sandbox.log_text()[-2000:]
    restarted = log_waits_for(sandbox, r"^.* queue process started again \(pid (\d+)\)$")
    assert restarted, sandbox.log_text()[-2000:]
    assert mx.wait_for(1, timeout=15), sandbox.log_text()[-3000:]
    assert b"Subject: meanwhile" in mx.messages[0][2]
    assert sandbox.wait_for_empty_queue(), sandbox.queued()
    assert len(mx.messages) == 1
    assert process_tree(server, 2).queue == int(restarted.group(1))
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 9-10. Stopping; the supervisor killed


def test_a_child_stops_on_a_sigterm_that_one_of_its_other_threads_took(sandbox):
    """The supervisor's SIGTERM goes to the child process, and the kernel may give it to any
    of its threads (kill(2) with a thread's id makes it that one); the child must still
    stop, each one here is then started again."""
    server = sandbox.start(TWO)
    tree = process_tree(server, 2)
    for pid in [tree.queue, *tree.accepting]:
        threads = wait_until(lambda: [int(tid) for tid in os.listdir(f"/proc/{pid}/task")
                                      if int(tid) != pid], timeout=10)
        assert threads, f"process {pid} started no thread"      # started after its Signals
        os.kill(threads[-1], signal.SIGTERM)
        ended = log_waits_for(sandbox, rf"^.* \(pid {pid}\) ended unexpectedly "
                                       r"\(exit status 0\); starting it again$")
        assert ended, sandbox.log_text()[-2000:]
    assert server.stop() == 0


def test_sigterm_lets_data_finish_says_421_to_idle_sessions_and_leaves_no_child(sandbox):
    server = sandbox.start(TWO)
    tree = process_tree(server, 2)
    idle = session_on(server, tree, tree.accepting[0])
    busy = session_on(server, tree, tree.accepting[1])
    with idle, busy:
        assert idle.code("EHLO idle.example") == 250
        assert busy.code("EHLO busy.example") == 250
        assert busy.code("MAIL FROM:<bob@test.ru>") == 250
        assert busy.code("RCPT TO:<alice@test.ru>") == 250
        assert busy.code("DATA") == 354
        busy.send("Subject: in flight\r\n\r\nfirst half\r\n")

        server.signal(signal.SIGTERM)
        code, lines = idle.reply()
        assert code == 421 and "4.3.2" in lines[-1], lines
        busy.send("second half\r\n.\r\n")
        code, lines = busy.reply()
        assert code == 250, lines
    assert server.wait_exit() == 0, server.stderr_text(last=30)
    assert not [pid for pid in tree.children if running(pid)]
    assert nonblank_lines(sandbox.log_text())[-1].endswith(" stopped"), \
        sandbox.log_text()[-1500:]
    stored = sandbox.maildir_messages("alice@test.ru")
    assert len(stored) == 1 and b"second half" in stored[0]


@pytest.mark.parametrize("processes", ["1", "2"])
def test_sighup_stops_like_sigterm_and_a_session_past_the_grace_is_logged(sandbox, processes):
    """A closed terminal sends SIGHUP to every process: the server stops as on SIGTERM
    (nothing needs reloading). A session still in DATA after the grace ([server] timeout,
    5 s here) is cut off, and the log says so rather than that the client left."""
    server = sandbox.start({"server.processes": processes})
    children_of_it = process_tree(server, 2).children if processes == "2" else []
    with Client(server.address) as busy:
        assert busy.code("EHLO busy.example") == 250
        assert busy.code("MAIL FROM:<bob@test.ru>") == 250
        assert busy.code("RCPT TO:<alice@test.ru>") == 250
        assert busy.code("DATA") == 354
        for pid in [server.pid, *children_of_it]:       # as a terminal's hang-up does
            os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        try:
            while server.returncode is None and time.monotonic() < deadline:
                busy.send("a line every second, never the end\r\n")
                time.sleep(1)
        except OSError:
            pass
    assert server.wait_exit() == 0, server.stderr_text(last=30)
    assert not [pid for pid in children_of_it if running(pid)]
    log = sandbox.log_text()
    assert "cut off at the end of the shutdown grace during DATA; nothing stored" in log, \
        log[-1500:]
    assert nonblank_lines(log)[-1].endswith(" stopped"), log[-1500:]
    assert sandbox.maildir_messages("alice@test.ru") == []


def test_children_of_a_killed_supervisor_exit_and_free_the_port_and_spool(sandbox):
    server = sandbox.start(TWO)
    tree = process_tree(server, 2)
    os.kill(server.pid, signal.SIGKILL)         # kill -9 of the supervisor (not server.kill():
    server.process.wait(10)                     # that waits for the console pipes to close)
    assert wait_until(lambda: not [pid for pid in tree.children if running(pid)], 8), \
        f"children still running 8 s after the supervisor died: " \
        f"{[pid for pid in tree.children if running(pid)]}"
    again = sandbox.start(port=server.port)             # same port, same spool lock
    process_tree(again, 2)
    with Client(again.address) as client:
        assert client.greeting[0] == 220
        transaction(client, subject="second life")
    assert len(sandbox.maildir_messages("alice@test.ru")) == 1
    assert again.stop() == 0


def test_a_session_in_data_outlives_a_killed_supervisor_and_keeps_the_spool(sandbox):
    server = sandbox.start(TWO)
    tree = process_tree(server, 2)
    with Client(server.address) as busy:
        assert busy.code("EHLO busy.example") == 250
        assert busy.code("MAIL FROM:<bob@test.ru>") == 250
        assert busy.code("RCPT TO:<alice@test.ru>") == 250
        assert busy.code("DATA") == 354
        busy.send("Subject: orphaned\r\n\r\nfirst half\r\n")
        owner = connection_owner(server, busy, tree.accepting)
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(10)
        # the queue process stops at once; the session's process lets the DATA finish
        assert wait_until(lambda: not running(tree.queue), 5), proc_stat(tree.queue)
        # while that session lasts, its process keeps the spool: no second server on it
        rc, stderr = sandbox.start_expecting_exit(port=free_port(["127.0.0.1"]))
        refusal = nonblank_lines(stderr)[-1]
        assert rc != 0 and "traceback" not in stderr.lower(), stderr
        # the lock names the supervisor, which has gone: the line says so
        assert refusal == f"smtpd: spool {sandbox.spool} is in use by the processes of a " \
            f"server that has ended (pid {server.pid}); they stop within a few seconds", stderr
        rc, out, err = sandbox.run_cli("--flush")   # nobody to ask: one line, no traceback
        assert rc != 0 and nonblank_lines(err) == [
            f"smtpd: the server that holds the spool (pid {server.pid}) has ended, and its "
            "processes are stopping; try again in a few seconds"], out + err
        assert running(owner)
        busy.send("second half\r\n.\r\n")
        code, lines = busy.reply()
        assert code == 250, lines
    assert wait_until(lambda: not [pid for pid in tree.children if running(pid)], 8), \
        [pid for pid in tree.children if running(pid)]
    stored = sandbox.maildir_messages("alice@test.ru")
    assert len(stored) == 1 and b"second half" in stored[0]
    again = sandbox.start(port=server.port)
    assert again.stop() == 0


# ---------------------------------------------------------------------------------------
# 11. The web view sees every process's sessions


def test_the_web_view_shows_sessions_of_every_accepting_process(sandbox):
    port = free_port(["127.0.0.1"])
    server = sandbox.start({**TWO, "web.listen": f"127.0.0.1:{port}"})
    tree = process_tree(server, 2)
    assert log_waits_for(sandbox, rf"web view on http://127\.0\.0\.1:{port}/$"), \
        sandbox.log_text()
    first = session_on(server, tree, tree.accepting[0])
    second = session_on(server, tree, tree.accepting[1])
    with first, second:
        assert first.code("EHLO first.example") == 250
        assert first.code("MAIL FROM:<bob@test.ru>") == 250
        assert second.code("EHLO second.example") == 250

        def live():
            return {(item["helo"], item["state"])
                    for item in json.loads(web_json(port, "/api/sessions"))["live"]}
        expected = {("first.example", "MAIL"), ("second.example", "GREETED")}
        assert wait_until(lambda: live() == expected, 10), live()

        assert first.code("RCPT TO:<alice@test.ru>") == 250
        assert first.code("DATA") == 354
        first.send(text("seen on the web"))
        assert first.reply()[0] == 250
        assert wait_until(lambda: b"\nsmtpd_messages_accepted_total 1\n"
                          in web_json(port, "/metrics"), 10), web_json(port, "/metrics")
        assert first.code("QUIT") == 221
        assert second.code("QUIT") == 221
    assert wait_until(lambda: live() == set(), 10), live()
    assert server.stop() == 0


def test_a_stopped_queue_process_holds_up_no_session_and_loses_no_web_line(sandbox):
    port = free_port(["127.0.0.1"])
    server = sandbox.start({**TWO, "web.listen": f"127.0.0.1:{port}"})
    tree = process_tree(server, 2)
    assert log_waits_for(sandbox, rf"web view on http://127\.0\.0\.1:{port}/$"), \
        sandbox.log_text()
    sessions = 200              # ~25 web view lines each: far more than its socket holds
    began = time.monotonic()
    with paused([tree.queue]):                      # it reads nothing the supervisor sends
        for number in range(sessions):
            with Client(server.address, timeout=5) as client:
                assert client.greeting[0] == 220, (number, client.greeting)
                transaction(client, subject=f"while stopped {number}")
        elapsed = time.monotonic() - began
        assert len(sandbox.maildir_messages("alice@test.ru")) == sessions
    assert elapsed < 8, f"{sessions} sessions took {elapsed:.1f} s with the queue stopped"
    assert wait_until(lambda: f"\nsmtpd_messages_accepted_total {sessions}\n".encode()
                      in web_json(port, "/metrics"), 10), \
        [line for line in web_json(port, "/metrics").split(b"\n") if b"accepted" in line]
    assert server.stop() == 0


def test_a_supervisor_that_does_not_answer_gets_clients_a_421_and_a_log_line(sandbox):
    """The supervisor stopped (SIGSTOP): after 10 s of waiting for its admission a client
    gets 421 4.3.0, not "shutting down", and the log says why. Once it goes on, its late
    answer's place is given back at once: with one place per address, the next client is
    greeted, even by the other accepting process (which never asked the question)."""
    server = sandbox.start({**TWO, "server.max_clients_per_ip": "1"})
    tree = process_tree(server, 2)
    asked, other = tree.accepting
    with paused([server.pid]):
        with session_on(server, tree, asked, timeout=20) as client:
            assert client.greeting[0] == 421, client.greeting
            assert client.greeting[1][0].startswith("421 4.3.0 "), client.greeting
    assert log_waits_for(sandbox, r"the supervisor did not answer within 10 s whether "
                                  r"127\.0\.0\.1 may start a session$"), sandbox.log_text()
    with greeted_within(lambda: session_on(server, tree, other, timeout=5)) as client:
        assert client.greeting[0] == 220, client.greeting
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 12-13. One log file


def test_every_process_writes_whole_sessions_to_one_log(sandbox):
    server = sandbox.start(TWO)
    tree = process_tree(server, 2)
    clients = [session_on(server, tree, pid) for pid in tree.accepting for _ in range(4)]
    on_first = {client.sock.getsockname()[1] for client in clients[:4]}
    # what each client sent and was answered, as the log writes it (log.py, sessionlog.py)
    transcripts = {client.sock.getsockname()[1]: [f"-> {line}" for line in client.greeting[1]]
                   for client in clients}
    steps = ["EHLO", "MAIL FROM:<bob@test.ru>", "RCPT TO:<alice@test.ru>", "DATA", "TEXT"] * 3
    steps.append("QUIT")
    barrier = threading.Barrier(len(clients), timeout=20)
    failures = []

    def run(client, number):
        transcript = transcripts[client.sock.getsockname()[1]]
        try:
            for step in steps:
                barrier.wait()                  # every session does each step at once
                if step == "TEXT":
                    message = text(f"session {number}")
                    client.send(message)
                    code, lines = client.reply()
                    transcript.append("<- (message text, ")
                else:
                    command = f"EHLO session{number}.example" if step == "EHLO" else step
                    code, lines = client.command(command)
                    transcript.append(f"<- {command}")
                transcript.extend(f"-> {line}" for line in lines)
                expected = {"DATA": 354, "QUIT": 221}.get(step, 250)
                assert code == expected, (number, step, code, lines)
            transcript.append("disconnected")
        except BaseException as error:          # reported by the test
            failures.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(client, number), daemon=True)
               for number, client in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for client in clients:
        client.close()
    assert not failures, failures
    assert server.stop() == 0
    assert len(sandbox.maildir_messages("alice@test.ru")) == 3 * len(clients)

    content = sandbox.log_text()
    assert content.endswith("\n"), content[-200:]
    lines = content.split("\n")[:-1]
    torn = [line for line in lines
            if not STAMP.match(line) or STAMP_INSIDE.search(line, 1)]
    assert not torn, torn[:5]
    sessions = {}                               # client port -> [(index, session id, text)]
    for index, line in enumerate(lines):
        match = SESSION_LINE.match(line)
        if match and int(match.group(2)) in transcripts:
            sessions.setdefault(int(match.group(2)), []).append(
                (index, match.group(1), match.group(3)))
    assert set(sessions) == set(transcripts), set(transcripts) - set(sessions)
    for port, entries in sessions.items():
        assert len({session_id for _, session_id, _ in entries}) == 1, entries[:3]
        logged = [entry[2] for entry in entries]
        expected = transcripts[port]
        assert len(logged) == len(expected), (port, logged, expected)
        for got, wanted in zip(logged, expected):   # every line, whole and in order
            assert got.startswith(wanted) if wanted.endswith(", ") else got == wanted, \
                (port, got, wanted)
        assert logged[0].startswith("-> 220 ") and logged[-2].startswith("-> 221 ")
    # the two processes wrote at the same time: their sessions' lines are interleaved
    spans = {port: (entries[0][0], entries[-1][0]) for port, entries in sessions.items()}
    assert any(spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
               for a in spans if a in on_first for b in spans if b not in on_first), spans


def test_the_log_is_rotated_once_and_every_process_follows_it(sandbox):
    os.makedirs(sandbox.log_dir)
    filler = "2026-01-01 00:00:00 " + "x" * 79 + "\n"          # 100 octets
    log_path = os.path.join(sandbox.log_dir, "smtpd.log")
    # room for the start-up lines and one session, not two (a session logs < 2000 octets)
    Sandbox.write_file(log_path, filler * ((LOG_LIMIT - 3000) // len(filler)))
    sandbox.give_to_run_user(sandbox.log_dir)
    mx = sandbox.mx("127.0.0.5")
    server = sandbox.start({**TWO, "relay.routes": route("remote.test", mx)})
    opened = time.monotonic()                       # the log file was opened before this
    tree = process_tree(server, 2)
    first, second = tree.accepting
    rotated = log_path + ".1"

    # `second` checks its file on its first write more than a second after it was opened
    # (log.py), then keeps writing there for a second: past the rotation that `first` makes
    # in between. It must then follow to the new file, not rotate that one away too.
    time.sleep(max(0.0, opened + REOPEN_WITHIN + 0.2 - time.monotonic()))
    with session_on(server, tree, second) as client:
        transaction(client, helo="checked.example")
    assert os.path.getsize(log_path) < LOG_LIMIT and not os.path.exists(rotated)
    with session_on(server, tree, first) as client:                 # goes over the limit
        transaction(client, helo="over.example")
    assert wait_until(lambda: os.path.exists(rotated), 5), os.listdir(sandbox.log_dir)
    rotated_at = time.monotonic()
    with session_on(server, tree, second) as client:                # still on the old file
        transaction(client, helo="during.example")
    # The others open the new file within a second of the rotation (log.py): let that
    # second pass, so that every line from here on must be in the new file.
    time.sleep(max(0.0, rotated_at + REOPEN_WITHIN + 0.5 - time.monotonic()))

    for number, pid in enumerate(tree.accepting):
        with session_on(server, tree, pid) as client:
            transaction(client, helo=f"after{number}.example")
    with Client(server.address) as client:
        reply = transaction(client, "alice@test.ru", ["bob@remote.test"], subject="relayed")
    queue_id = reply.rsplit(" ", 1)[1]
    assert mx.wait_for(1, timeout=15), sandbox.log_text()[-2000:]
    assert sandbox.wait_for_empty_queue(), sandbox.queued()
    assert server.stop() == 0

    assert sorted(os.listdir(sandbox.log_dir)) == ["smtpd.log", "smtpd.log.1"]
    with open(rotated, encoding="utf-8", errors="replace") as old_file:
        old = old_file.read()
    new = sandbox.log_text()
    assert old.startswith(filler) and len(old) > LOG_LIMIT, len(old)
    assert len(new) < 1 << 20, len(new)
    for label, content in (("smtpd.log.1", old), ("smtpd.log", new)):
        assert content.endswith("\n"), label
        torn = [line for line in content.split("\n")[:-1] if not STAMP.match(line)]
        assert not torn, (label, torn[:5])
    assert "<- EHLO over.example" in old + new and "<- EHLO during.example" in old + new
    for marker in ("<- EHLO after0.example", "<- EHLO after1.example",       # each process
                   f"[{queue_id}] <bob@remote.test>: done: sent"):          # the queue's
        assert marker in new and marker not in old, marker
    assert nonblank_lines(new)[-1].endswith(" stopped"), new[-500:]       # the supervisor's
    assert "stopped" not in old.split("\n")[-2], old[-300:]


# ---------------------------------------------------------------------------------------
# Found in review: a killed supervisor's queue process mid-delivery, and the console


class SlowDotMX(socketserver.ThreadingTCPServer):
    """An MX that answers the final dot only when `release` is set (bounded: 20 s), and
    counts every message it took."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address):
        self.messages = []
        self.dot_seen = threading.Event()
        self.release = threading.Event()
        super().__init__(address, SlowDotHandler)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self):
        self.release.set()
        self.shutdown()
        self.server_close()


class SlowDotHandler(socketserver.StreamRequestHandler):
    def handle(self):
        def say(line):
            self.wfile.write(line.encode() + b"\r\n")

        say("220 slow.mx ESMTP")
        in_text, text = False, []
        for line in iter(self.rfile.readline, b""):
            if in_text:
                if line != b".\r\n":
                    text.append(line)
                    continue
                self.server.dot_seen.set()
                self.server.release.wait(20)
                self.server.messages.append(b"".join(text))
                say("250 2.0.0 queued")
                in_text, text = False, []
                continue
            verb = line[:4].upper()
            if verb == b"QUIT":
                say("221 bye")
                return
            in_text = verb == b"DATA"
            say("354 go" if in_text else "250 slow.mx" if verb in (b"EHLO", b"HELO") else
                "250 ok")


def test_a_killed_supervisors_queue_process_finishes_its_delivery_and_nothing_goes_twice(
        sandbox):
    """kill -9 of the supervisor while its queue process waits for an MX's 250: a new
    server (systemd's Restart=) is refused the spool until that process has stopped, so the
    message is not delivered again by the new one."""
    mx_port = free_port(["127.0.0.2"])
    mx = SlowDotMX(("127.0.0.2", mx_port))
    try:
        server = sandbox.start({**TWO, "relay.routes": f"remote.test=127.0.0.2:{mx_port}"})
        tree = process_tree(server, 2)
        with Client(server.address) as client:
            assert client.greeting[0] == 220
            code, lines = client.send_message("alice@test.ru", ["bob@remote.test"],
                                              text("once only"))
            assert code == 250, lines
        assert mx.dot_seen.wait(15), sandbox.log_text()
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(10)
        rc, stderr = sandbox.start_expecting_exit(port=free_port(["127.0.0.1"]))
        assert rc != 0 and "in use by the processes of a server that has ended" in stderr, \
            stderr
        mx.release.set()                        # the old queue process gets its 250
        assert wait_until(lambda: not running(tree.queue), 10), proc_stat(tree.queue)
        assert wait_until(lambda: not [pid for pid in tree.children if running(pid)], 10)
        again = sandbox.start(port=server.port)
        assert sandbox.wait_for_empty_queue(), sandbox.queued()
        assert again.stop() == 0
        assert len(mx.messages) == 1, f"delivered {len(mx.messages)} times"
    finally:
        mx.stop()


def test_console_lines_of_every_process_come_out_whole_through_a_pipe(sandbox):
    """stderr to a pipe read slowly (journald, `| tee`), eight clients flooding two
    accepting processes with pipelined NOOPs: no console line may be torn or run into
    another, and none is lost."""
    port = free_port(["127.0.0.1"])
    config = sandbox.write_config({**TWO, "server.max_clients_per_ip": "100"})
    supervisor = subprocess.Popen([sys.executable, "smtpd.py", "127.0.0.1", "--port",
                                   str(port), "--config", config], cwd=ROOT,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
    chunks = []

    def read_slowly():
        for data in iter(lambda: supervisor.stderr.read1(1000), b""):
            chunks.append(data)
            time.sleep(0.001)

    reader = threading.Thread(target=read_slowly, daemon=True)
    reader.start()

    def flood():
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"EHLO flood.example\r\n" + b"NOOP\r\n" * 300 + b"QUIT\r\n")
                reader = sock.makefile("rb")
                while reader.readline():
                    pass

    try:
        assert wait_until(lambda: b"listening on" in b"".join(chunks), 20), b"".join(chunks)
        assert wait_until(lambda: len(children(supervisor.pid)) == 3, 10)
        floods = [threading.Thread(target=flood) for _ in range(8)]
        for thread in floods:
            thread.start()
        for thread in floods:
            thread.join(60)
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            supervisor.kill()
            supervisor.wait(10)
        reader.join(10)
    assert supervisor.returncode == 0
    console = b"".join(chunks).decode("utf-8", "replace").splitlines()
    torn = [line for line in console
            if not STAMP.match(line) or STAMP_INSIDE.search(line, 20)]
    noops = sum(1 for line in console if line.endswith("<- NOOP"))
    assert not torn, f"{len(torn)} of {len(console)} lines torn, e.g. {torn[:3]}"
    assert noops == 8 * 5 * 300, f"{noops} NOOP lines on the console"
