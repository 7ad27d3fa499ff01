"""The daemon tier: the real `python smtpd.py` process, run as users run it (issue 11).

Each test starts the server as a subprocess (tests/daemon.py) with its own base directory
and config, as root with the default drop to `nobody` when the suite runs as root (CI), talks
to it over loopback, asserts what a user sees (bytes on the wire, files in the Maildir, exit
codes, the one line on stderr) and stops it. Remote MXs are FakeMXs on 127.0.0.x and DNS is a
responder on 127.0.0.1; nothing leaves the loopback.
"""
import email
import email.policy
import errno
import os
import re
import select
import shutil
import signal
import socket
import ssl
import time

import pytest

from tests.daemon import (Sandbox, is_root, need, nonblank_lines, plain_credentials,
                          require_root, run_user, spool_file_text, state_json)
from tests.fake_mx import free_port
from tests.waiting import wait_until
from tests.wire import Client

MB = 1024                               # VmRSS is in KiB
RSS_BOUND = 200 * MB                    # generous: a bounded server stays far below it


@pytest.fixture
def sandbox():
    box = Sandbox()
    yield box
    box.cleanup()


def text(subject, body="hello"):
    """A message as sent after 354, with its terminator."""
    return f"Subject: {subject}\r\n\r\n{body}\r\n.\r\n"


def send(server, sender, recipients, message, helo="client.example"):
    """One whole transaction in its own session: the final reply's (code, lines)."""
    with Client(server.address) as client:
        assert client.greeting[0] == 220, client.greeting
        code, lines = client.send_message(sender, recipients, message, helo=helo)
        client.command("QUIT")
        return code, lines


def route(domain, mx):
    return f"{domain}={mx.server_address[0]}:{mx.port}"


def temporary_error(listing, address):
    """True when --queue shows `address` still queued with a 4xx reply (code and enhanced
    code, e.g. `451 4.4.3`) as its last error."""
    return any(re.search(r"\b4\d\d[ -]4\.\d{1,3}\.\d{1,3}\b", line)
               for line in listing.splitlines() if f"<{address}>" in line)


def assert_dsn(raw, recipient, status):
    """A bounce as a user's mail reader sees it: an RFC 3464 multipart/report from
    MAILER-DAEMON with the recipient and a status starting with `status`."""
    assert raw.startswith(b"Return-Path: <>"), raw[:200]
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report", raw[:500]
    assert message.get_param("report-type") == "delivery-status"
    assert "mailer-daemon" in str(message["From"]).lower()
    kinds = [part.get_content_type() for part in message.walk()]
    assert "message/delivery-status" in kinds, kinds
    report = raw.decode("utf-8", "replace")
    assert re.search(rf"Final-Recipient:\s*rfc822;\s*<?{re.escape(recipient)}", report, re.I)
    assert re.search(r"Action:\s*failed", report, re.I)
    assert re.search(rf"Status:\s*{re.escape(status)}", report), report


def dribble(client, data, interval, limit):
    """Send `data` one byte every `interval` seconds (a slow client) until the server
    answers, at most `limit` seconds; returns the server's reply (code, lines)."""
    deadline = time.monotonic() + limit
    for byte in data:
        if time.monotonic() >= deadline:
            break
        readable, _, _ = select.select([client.sock], [], [], interval)
        if readable:
            break
        try:
            client.send(bytes([byte]))
        except OSError:
            break
    readable, _, _ = select.select([client.sock], [], [], 5)
    if not readable:
        return None, []
    try:
        return client.reply()
    except OSError:
        return None, []


# ---------------------------------------------------------------------------------------
# 1. The plain case, after the drop


def test_local_delivery_lands_in_the_maildir_and_the_server_runs_as_nobody(sandbox):
    server = sandbox.start()
    code, lines = send(server, "bob@test.ru", ["alice@test.ru"], text("hello"))
    assert code == 250, lines
    new = os.path.join(sandbox.maildir, "test.ru", "alice", "new")
    stored = sandbox.maildir_messages("alice@test.ru")
    assert len(stored) == 1 and b"Subject: hello" in stored[0]
    if is_root():
        uid, _ = run_user()
        assert server.uids() == [uid] * 4, server.status()["Uid"]
        assert os.stat(os.path.join(new, os.listdir(new)[0])).st_uid == uid
    assert server.stop() == 0
    require_root("the privilege drop is only checked when started as root")


# ---------------------------------------------------------------------------------------
# 2-5. Bounces, DNS, MX lookups


@pytest.mark.parametrize("via", ["routes", "dns"])
def test_a_550_bounces_to_the_sender_and_the_mx_is_asked_once(sandbox, via):
    mx = sandbox.mx("127.0.0.2", rcpt=("550 5.1.1 no such user",))
    if via == "routes":
        settings = {"relay.routes": route("remote.test", mx)}
    else:
        dns = sandbox.dns({"remote.test": [("MX", "10 mx.remote.test.")],
                           "mx.remote.test": [("A", "127.0.0.2")]})
        settings = {"relay.nameservers": dns.nameserver, "relay.port": mx.port}
    server = sandbox.start(settings)
    code, lines = send(server, "alice@test.ru", ["bob@remote.test"], text("will bounce"))
    assert code == 250, lines

    bounces = sandbox.wait_for_messages("alice@test.ru", timeout=20)
    assert len(bounces) == 1, f"no bounce in alice's Maildir:\n{server.stderr_text(last=40)}"
    assert_dsn(bounces[0], "bob@remote.test", "5.1.1")
    assert b"Subject: will bounce" in bounces[0]            # the original headers come back
    assert sandbox.wait_for_empty_queue(), sandbox.queued()

    # The message has left the queue, so nothing can ask the MX again; a --flush finds
    # nothing to do (the old server kept the 550 recipient and retried it every minute).
    rc, out, err = sandbox.run_cli("--flush")
    assert rc == 0, out + err
    assert mx.sessions == 1, "the MX was asked again after its 550"
    assert len(sandbox.maildir_messages("alice@test.ru")) == 1
    assert not sandbox.queued()
    assert server.stop() == 0


def test_a_domain_that_does_not_exist_bounces_and_is_looked_up_once(sandbox):
    dns = sandbox.dns({})                                   # every name: NXDOMAIN
    server = sandbox.start({"relay.nameservers": dns.nameserver})
    code, lines = send(server, "alice@test.ru", ["bob@nowhere.test"], text("nowhere"))
    assert code == 250, lines

    bounces = sandbox.wait_for_messages("alice@test.ru", timeout=20)
    assert len(bounces) == 1, f"no bounce in alice's Maildir:\n{server.stderr_text(last=40)}"
    assert_dsn(bounces[0], "bob@nowhere.test", "5.")
    assert sandbox.wait_for_empty_queue(), sandbox.queued()

    rc, out, err = sandbox.run_cli("--flush")               # nothing is left to look up
    assert rc == 0, out + err
    assert dns.count("nowhere.test", "MX") == 1, dns.queries
    assert len(sandbox.maildir_messages("alice@test.ru")) == 1
    assert server.stop() == 0


@pytest.mark.parametrize("records, recipient", [
    ({"slow.test": "TIMEOUT"}, "bob@slow.test"),
    ({"broken.test": "SERVFAIL"}, "bob@broken.test"),
    # an empty MX answer (NOERROR, no MX) whose A/AAAA lookups time out: not "no address"
    ({"empty.test": {"MX": [], "A": "TIMEOUT", "AAAA": "TIMEOUT"}}, "bob@empty.test"),
], ids=["timeout", "servfail", "empty-mx-then-a-timeout"])
def test_a_dns_failure_is_temporary_and_the_message_stays_queued(sandbox, records, recipient):
    dns = sandbox.dns(records)
    server = sandbox.start({"relay.nameservers": dns.nameserver, "relay.retry": "3600",
                            "relay.connect_timeout": "1"})       # a DNS timeout takes 1 s
    code, lines = send(server, "alice@test.ru", [recipient], text("dns trouble"))
    assert code == 250, lines

    listing = sandbox.wait_for_listing(lambda listing: temporary_error(listing, recipient))
    assert temporary_error(listing, recipient), \
        f"--queue does not show a 4xx for {recipient}:\n{listing}\n{server.stderr_text(last=30)}"
    assert sandbox.maildir_messages("alice@test.ru") == [], "bounced on a temporary failure"
    assert [name for name in sandbox.queued() if name.endswith(".smtp")]
    assert server.stop() == 0


def test_an_mx_lookup_through_the_loopback_resolver_reaches_the_mx(sandbox):
    mx = sandbox.mx("127.0.0.5")
    dns = sandbox.dns({"remote.test": [("MX", "10 mx1.remote.test.")],
                       "mx1.remote.test": [("A", "127.0.0.5")]})
    server = sandbox.start({"relay.nameservers": dns.nameserver, "relay.port": mx.port})
    code, lines = send(server, "alice@test.ru", ["bob@remote.test"], text("via mx"))
    assert code == 250, lines

    assert mx.wait_for(1, timeout=20), server.stderr_text(last=40)
    sender, recipients, data = mx.messages[0]
    assert (sender, recipients) == ("alice@test.ru", ["bob@remote.test"])
    assert b"Subject: via mx" in data
    assert ("remote.test", "MX") in dns.queries
    assert ("mx1.remote.test", "A") in dns.queries
    assert sandbox.wait_for_empty_queue(), sandbox.queued()
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 6-7. STARTTLS and AUTH


def test_starttls_delivers_and_closes_tls_cleanly_after_quit(sandbox):
    cert, key = sandbox.make_certificate()
    server = sandbox.start({"tls.cert": cert, "tls.key": key})
    with Client(server.address) as client:
        code, lines = client.command("EHLO client.example")
        assert code == 250 and any("STARTTLS" in line for line in lines), lines
        assert client.code("STARTTLS") == 220
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client.sock = context.wrap_socket(client.sock, server_hostname="mail.test.ru")
        code, lines = client.send_message("bob@test.ru", ["alice@test.ru"], text("secret"))
        assert code == 250, lines
        assert client.code("QUIT") == 221
        try:
            client.sock = client.sock.unwrap()              # needs the server's close_notify
        except (ssl.SSLError, OSError) as error:
            pytest.fail(f"the server did not close TLS cleanly after QUIT: {error!r}")
    stored = sandbox.maildir_messages("alice@test.ru")
    assert len(stored) == 1 and b"Subject: secret" in stored[0]
    assert server.stop() == 0


def test_auth_plain_with_a_user_added_by_the_cli_allows_relaying(sandbox):
    rc, out, err = sandbox.run_cli("--add-user", "alice@test.ru", input="s3cret pass\n")
    assert rc == 0, out + err
    mx = sandbox.mx("127.0.0.3")
    server = sandbox.start({"relay.networks": "192.0.2.0/24",       # loopback may not relay
                            "relay.routes": route("remote.test", mx)})
    with Client(server.address) as client:
        code, lines = client.command("EHLO client.example")
        assert any("AUTH" in line and "PLAIN" in line for line in lines), lines
        assert client.code("MAIL FROM:<alice@test.ru>") == 250
        code, lines = client.command("RCPT TO:<bob@remote.test>")
        assert code == 554 and "5.7.1" in lines[-1], lines
        assert client.code("RSET") == 250
        code, lines = client.command("AUTH PLAIN " + plain_credentials("alice@test.ru", "no"))
        assert code == 535, lines
        code, lines = client.command("AUTH PLAIN " + plain_credentials("alice@test.ru",
                                                                       "s3cret pass"))
        assert code == 235, lines
        assert client.code("MAIL FROM:<alice@test.ru>") == 250
        assert client.code("RCPT TO:<bob@remote.test>") == 250
        assert client.code("DATA") == 354
        client.send(text("authenticated"))
        code, lines = client.reply()
        assert code == 250, lines
        assert client.code("QUIT") == 221
    assert mx.wait_for(1, timeout=20), server.stderr_text(last=40)
    assert b"Subject: authenticated" in mx.messages[0][2]
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 8. --queue and --flush against the running server


def test_queue_and_flush_talk_to_the_running_server(sandbox):
    mx = sandbox.mx("127.0.0.4", rcpt=("450 4.2.0 busy", "250 2.1.5 ok"))
    server = sandbox.start({"relay.routes": route("remote.test", mx), "relay.retry": "3600"})
    code, lines = send(server, "alice@test.ru", ["bob@remote.test"], text("queued"))
    assert code == 250, lines

    listing = sandbox.wait_for_listing(lambda listing: "450 4.2.0" in listing)
    assert "450 4.2.0" in listing and "<bob@remote.test>" in listing, listing
    assert "from <alice@test.ru>" in listing, listing
    assert "cannot listen" not in listing, listing

    rc, out, err = sandbox.run_cli("--flush")
    assert rc == 0, out + err
    assert "asked the running server" in out + err          # the README's wording
    assert "cannot listen" not in out + err
    assert mx.wait_for(1, timeout=15), server.stderr_text(last=40)
    assert b"Subject: queued" in mx.messages[0][2]
    assert sandbox.wait_for_empty_queue(), sandbox.queued()
    listing = sandbox.queue_listing()
    assert "bob@remote.test" not in listing and "cannot listen" not in listing, listing
    assert server.stop() == 0


def test_flush_with_no_server_running_delivers_as_the_run_user(sandbox):
    """`sudo python smtpd.py --flush` with the server stopped: one delivery attempt as
    nobody, whose Python (here under a 0700 /root) must have been loaded while still root."""
    mx = sandbox.mx("127.0.0.4", rcpt=("450 4.2.0 busy", "250 2.1.5 ok"))
    server = sandbox.start({"relay.routes": route("remote.test", mx), "relay.retry": "3600"})
    code, lines = send(server, "alice@test.ru", ["bob@remote.test"], text("flushed offline"))
    assert code == 250, lines
    assert "450 4.2.0" in sandbox.wait_for_listing(lambda listing: "450 4.2.0" in listing)
    assert server.stop() == 0

    rc, out, err = sandbox.run_cli("--flush")
    assert rc == 0 and "Traceback" not in err, out + err
    assert mx.wait_for(1, timeout=15), out + err
    assert b"Subject: flushed offline" in mx.messages[-1][2]
    assert "Mail queue is empty" in out or "bob@remote.test" not in out, out
    assert sandbox.queued() == []


def test_a_second_server_on_the_same_spool_is_refused_with_one_line_naming_it(sandbox):
    """Same spool, same web port, another SMTP port: the line is about the spool (checked
    before any port is bound), not a web port "already in use"."""
    web = f"127.0.0.1:{free_port(['127.0.0.1'])}"
    first = sandbox.start({"web.listen": web})
    rc, stderr = sandbox.start_expecting_exit(port=free_port(["127.0.0.1"]))
    assert rc != 0 and "Traceback" not in stderr, stderr
    assert nonblank_lines(stderr)[-1] == \
        f"smtpd: spool {sandbox.spool} is in use by process {first.pid}", stderr
    assert first.stop() == 0


# ---------------------------------------------------------------------------------------
# 9. SIGTERM


def test_sigterm_says_421_to_idle_sessions_lets_data_finish_and_exits_0(sandbox):
    server = sandbox.start()
    with Client(server.address) as idle, Client(server.address) as busy:
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
    stored = sandbox.maildir_messages("alice@test.ru")
    assert len(stored) == 1 and b"second half" in stored[0]


def other_threads(pid):
    """The ids of `pid`'s threads but its main one (/proc/<pid>/task)."""
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]


def test_sigterm_taken_by_a_thread_other_than_the_main_one_stops_it(sandbox):
    """The kernel gives a signal sent to the process to any of its threads; kill(2) with a
    thread's id makes it that thread. Python runs handlers in the main thread only."""
    server = sandbox.start()
    threads = other_threads(server.pid)
    assert threads, "the server runs an accept thread at least"
    os.kill(threads[-1], signal.SIGTERM)
    assert server.wait_exit() == 0, server.stderr_text(last=10)
    assert sandbox.log_text().rstrip().endswith("stopped"), sandbox.log_text()[-500:]


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_sigterm_during_start_up_stops_the_server_in_order_once_it_is_up(sandbox,
                                                                            processes):
    """The users file as a named pipe holds the start-up at its read: a SIGTERM then must
    not kill the server (the default action) but stop it once it is up, as any SIGTERM."""
    os.unlink(sandbox.users_file)
    os.mkfifo(sandbox.users_file, 0o644)
    server = sandbox.start({"server.processes": processes}, wait=False)

    def reader_is_there():
        try:
            return os.open(sandbox.users_file, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as error:             # ENXIO: nobody has it open for reading yet
            assert error.errno == errno.ENXIO, error
            return None

    writer = wait_until(reader_is_there, 10)
    assert writer, server.stderr_text(last=10)
    server.signal(signal.SIGTERM)
    os.write(writer, b"alice\n")
    os.close(writer)
    assert server.wait_exit() == 0, server.stderr_text(last=10)
    assert sandbox.log_text().rstrip().endswith("stopped"), sandbox.log_text()[-500:]


def test_sigusr1_taken_by_a_thread_other_than_the_main_one_flushes_the_queue(sandbox):
    mx = sandbox.mx("127.0.0.4", rcpt=("450 4.2.0 busy", "250 2.1.5 ok"))
    server = sandbox.start({"relay.routes": route("remote.test", mx), "relay.retry": "3600"})
    code, lines = send(server, "alice@test.ru", ["bob@remote.test"], text("flushed by a thread"))
    assert code == 250, lines
    assert "450 4.2.0" in sandbox.wait_for_listing(lambda listing: "450 4.2.0" in listing)
    os.kill(other_threads(server.pid)[-1], signal.SIGUSR1)
    assert mx.wait_for(1, timeout=10), server.stderr_text(last=20)
    assert b"Subject: flushed by a thread" in mx.messages[0][2]
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 10. Another working directory, relative paths in the config file


def test_relative_paths_in_the_config_are_relative_to_its_directory(sandbox):
    for name in ("mail", "spool", "logs", "users"):
        sandbox.remove_at_cleanup(os.path.join("/", name))  # if the server gets it wrong
    elsewhere = sandbox.path("elsewhere")
    os.mkdir(elsewhere)
    os.chmod(elsewhere, 0o755)
    root_before = set(os.listdir("/"))

    server = sandbox.start(relative=True, cwd="/")
    code, lines = send(server, "bob@test.ru", ["alice@test.ru"], text("relative"))
    assert code == 250, lines
    stored = sandbox.maildir_messages("alice@test.ru")       # <base>/mail
    assert len(stored) == 1 and b"Subject: relative" in stored[0]
    assert os.path.exists(os.path.join(sandbox.log_dir, "smtpd.log"))

    for cwd in ("/", elsewhere):
        rc, out, err = sandbox.run_cli("--queue", cwd=cwd)
        assert rc == 0, out + err
        assert "cannot listen" not in out + err
    created = (set(os.listdir("/")) - root_before) & {"mail", "spool", "logs"}
    assert not created, f"created in /: {created}"
    assert os.listdir(elsewhere) == []
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 11. A damaged queue


def test_a_damaged_queue_is_moved_to_corrupt_and_the_good_mail_is_delivered(sandbox):
    mx = sandbox.mx("127.0.0.6")
    os.makedirs(sandbox.spool)
    now = time.time()

    def spool(name, subject, recipients=("bob@remote.test",)):
        Sandbox.write_file(os.path.join(sandbox.spool, name + ".smtp"),
                           spool_file_text("alice@test.ru", list(recipients),
                                           f"Subject: {subject}\r\n\r\nbody\r\n"))

    def state(name, value):
        Sandbox.write_file(os.path.join(sandbox.spool, name + ".state"),
                           value if isinstance(value, str) else state_json(value))

    def recipient(**fields):
        return {"status": "pending", "attempts": 0, "next_attempt": 0, "last_error": "",
                **fields}

    spool("40001-00000000000000a1", "good")
    bad_states = {
        "40002-00000000000000a2": {"recipients": {"bob@remote.test": {"status": "pending"}}},
        "40003-00000000000000a3": {"queue_id": None, "created": None, "recipients": {
            "bob@remote.test": {"status": None, "attempts": None, "next_attempt": None,
                                "last_error": None}}},
        "40004-00000000000000a4": {"queue_id": 4, "created": "yesterday", "recipients": {
            "bob@remote.test": recipient(attempts="two", next_attempt="soon", last_error=7)}},
        "40005-00000000000000a5": {"queue_id": "00000000000000a5", "created": now,
                                   "recipients": ["bob@remote.test"]},
        "40006-00000000000000a6": [1, 2, 3],
        "40007-00000000000000a7": {"queue_id": "00000000000000a7", "created": now,
                                   "recipients": {"bob@remote.test": recipient(status="weird")}},
        # names a recipient the spool file lacks
        "40008-00000000000000a8": {"queue_id": "00000000000000a8", "created": now,
                                   "recipients": {"x@remote.test": recipient()}},
    }
    for number, (name, value) in enumerate(bad_states.items()):
        spool(name, f"bad {number}")
        state(name, value)
    unparseable = "40009-00000000000000a9"
    Sandbox.write_file(os.path.join(sandbox.spool, unparseable + ".smtp"),
                       b"this is not a transaction\r\n")
    bad = {name: [name + ".smtp", name + ".state"] for name in bad_states}
    bad[unparseable] = [unparseable + ".smtp"]
    sandbox.give_to_run_user(sandbox.spool)

    server = sandbox.start({"relay.routes": route("remote.test", mx)})
    assert mx.wait_for(1, timeout=20), server.stderr_text(last=40)
    corrupt = os.path.join(sandbox.spool, "corrupt")
    wanted = [file_name for files in bad.values() for file_name in files]
    moved = wait_until(lambda: os.path.isdir(corrupt)
                       and set(wanted) <= set(os.listdir(corrupt)), timeout=15)
    found = sorted(os.listdir(corrupt)) if os.path.isdir(corrupt) else []
    assert moved, f"spool/corrupt/ holds {found}, wanted {sorted(wanted)}"
    assert sandbox.wait_for_empty_queue(), sandbox.queued()  # the good one went, bad ones moved
    assert [data.split(b"Subject: ")[1].split(b"\r\n")[0] for _, _, data in mx.messages] \
        == [b"good"]
    assert server.alive()

    listing = sandbox.queue_listing()
    assert "corrupt" in listing.lower(), listing
    for name in bad:
        assert name in listing or name.partition("-")[2] in listing, f"{name}:\n{listing}"
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 12. Hostile remote MXs


def test_hostile_mxs_are_cut_off_and_other_mail_still_flows(sandbox):
    flood = sandbox.mx("127.0.0.7", ehlo_flood=True)
    slow = sandbox.mx("127.0.0.8", dribble=0.05)
    good = sandbox.mx("127.0.0.9")
    routes = ", ".join([route("flood.test", flood), route("dribble.test", slow),
                        route("remote.test", good)])
    server = sandbox.start({"relay.routes": routes, "relay.retry": "2",
                            "relay.command_timeout": "2"})       # the per-reply deadline
    assert send(server, "alice@test.ru", ["x@flood.test"], text("flood"))[0] == 250
    assert send(server, "alice@test.ru", ["y@dribble.test"], text("dribble"))[0] == 250
    assert flood.wait_for_sessions(1) and slow.wait_for_sessions(1)

    listing = sandbox.wait_for_listing(lambda listing: temporary_error(listing, "x@flood.test")
                                       and temporary_error(listing, "y@dribble.test"),
                                       timeout=25)
    assert server.alive(), server.stderr_text(last=30)
    rss = server.rss_kib()
    assert rss < RSS_BOUND, f"VmRSS {rss} KiB after the hostile MXs"
    assert temporary_error(listing, "x@flood.test"), f"(VmRSS {rss} KiB)\n{listing}"
    assert temporary_error(listing, "y@dribble.test"), f"(VmRSS {rss} KiB)\n{listing}"

    assert send(server, "alice@test.ru", ["z@remote.test"], text("good"))[0] == 250
    assert good.wait_for(1, timeout=15), server.stderr_text(last=30)
    assert server.rss_kib() < RSS_BOUND
    listing = sandbox.queue_listing()
    assert "<x@flood.test>" in listing and "<y@dribble.test>" in listing, listing
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 13. Slow clients: the DATA deadline and the session deadline


def test_a_client_dribbling_its_message_is_cut_off_by_the_data_timeout(sandbox):
    server = sandbox.start({"server.data_timeout": "2"})     # [server] timeout stays 5
    with Client(server.address) as client:
        assert client.code("EHLO slow.example") == 250
        assert client.code("MAIL FROM:<bob@test.ru>") == 250
        assert client.code("RCPT TO:<alice@test.ru>") == 250
        assert client.code("DATA") == 354
        # a byte a second, with line ends, so no idle or per-line timeout ever fires
        code, lines = dribble(client, b"Subject: slow\r\n\r\na\r\nb\r\nc\r\n", 1.0, limit=15)
        assert code == 421, lines
        assert client.closed()
    assert sandbox.maildir_messages("alice@test.ru") == []
    folder = os.path.join(sandbox.maildir, "test.ru", "alice", "tmp")
    assert not os.path.isdir(folder) or os.listdir(folder) == []
    assert server.alive()
    assert server.stop() == 0


def test_a_session_kept_busy_with_noops_is_cut_off_by_the_session_timeout(sandbox):
    server = sandbox.start({"server.session_timeout": "2"})  # [server] timeout stays 5
    codes = []
    with Client(server.address) as client:
        assert client.code("EHLO busy.example") == 250
        for _ in range(30):                                 # at most 15 s
            readable, _, _ = select.select([client.sock], [], [], 0.5)
            if readable:                                    # the server spoke first
                codes.append(client.reply()[0])
                break
            try:
                code, _lines = client.command("NOOP")
            except OSError:
                break
            codes.append(code)
            if code != 250:
                break
    assert codes and codes[-1] == 421, codes
    assert codes.count(250) >= 2, codes
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 14. Done is durable before QUIT


def test_a_delivery_recorded_before_quit_is_not_sent_again_after_a_crash(sandbox):
    mx = sandbox.mx("127.0.0.10", hang_on_quit=True)
    server = sandbox.start({"relay.routes": route("remote.test", mx)})
    assert send(server, "alice@test.ru", ["bob@remote.test"], text("once"))[0] == 250
    assert mx.wait_for(1, timeout=20), server.stderr_text(last=40)
    assert mx.wait_for_quit(timeout=15)                     # it has the message and waits
    server.kill()

    restarted = sandbox.start()                             # the same dirs and config
    rc, out, err = sandbox.run_cli("--flush")
    assert rc == 0, out + err
    # The queue empties only after an attempt has finished, and a resent copy would reach
    # the MX before that: so once it is empty, a second copy would already be there.
    assert sandbox.wait_for_empty_queue(), sandbox.queued()
    assert len(mx.messages) == 1, "the message was delivered a second time"
    assert restarted.stop() == 0


def test_kill_9_with_ten_queued_then_a_restart_delivers_each_message_once(sandbox):
    nothing_listens = f"remote.test=127.0.0.11:{free_port(['127.0.0.11'])}"
    server = sandbox.start({"relay.routes": nothing_listens, "relay.retry": "1"})
    for number in range(10):
        assert send(server, "alice@test.ru", ["bob@remote.test"],
                    text(f"crash {number}"))[0] == 250
    server.kill()
    assert len(sandbox.queued()) >= 10                      # the queue survived the crash
    mx = sandbox.mx("127.0.0.11", port=int(nothing_listens.rsplit(":", 1)[1]))
    restarted = sandbox.start()
    assert mx.wait_for(10, timeout=20), restarted.stderr_text(last=40)
    assert sandbox.wait_for_empty_queue(), sandbox.queued()
    subjects = sorted(data.split(b"Subject: ")[1].split(b"\r\n")[0] for _, _, data in mx.messages)
    assert subjects == sorted(f"crash {n}".encode() for n in range(10))
    assert restarted.stop() == 0


# ---------------------------------------------------------------------------------------
# 15. Only its own files; unusable paths stop it with one line


def test_an_existing_maildir_it_cannot_write_is_refused_and_never_chowned(sandbox):
    require_root("the privilege drop needs root")
    tree = sandbox.path("tree")
    os.mkdir(tree, 0o755)                                    # root's, not writable by nobody
    keep = Sandbox.write_file(os.path.join(tree, "keep.txt"), "mine\n")
    rc, stderr = sandbox.start_expecting_exit(args=("--maildir", tree))
    assert rc != 0
    lines = nonblank_lines(stderr)
    assert len(lines) == 1 and tree in lines[0], stderr
    assert "Traceback" not in stderr
    assert os.stat(tree).st_uid == 0 and os.stat(keep).st_uid == 0


def test_an_existing_maildir_it_can_write_is_used_without_chowning_what_is_in_it(sandbox):
    require_root("the privilege drop needs root")
    uid, gid = run_user()
    tree = sandbox.path("tree")
    os.mkdir(tree, 0o755)
    os.chown(tree, uid, gid)                                 # the admin gave it to nobody
    keep = Sandbox.write_file(os.path.join(tree, "keep.txt"), "root's file\n")
    server = sandbox.start(args=("--maildir", tree))
    assert send(server, "bob@test.ru", ["alice@test.ru"], text("tree"))[0] == 250
    assert len(sandbox.maildir_messages("alice@test.ru", maildir=tree)) == 1
    assert (os.stat(keep).st_uid, os.stat(keep).st_gid) == (0, 0)
    assert server.stop() == 0
    assert os.stat(keep).st_uid == 0


def test_a_maildir_that_is_a_plain_file_stops_it_with_one_line(sandbox):
    plain = Sandbox.write_file(sandbox.path("not-a-directory"), "x\n")
    rc, stderr = sandbox.start_expecting_exit(args=("--maildir", plain))
    assert rc != 0
    lines = nonblank_lines(stderr)
    assert len(lines) == 1 and plain in lines[0], stderr
    assert "Traceback" not in stderr


def test_a_users_file_the_run_user_cannot_read_stops_it_with_one_line(sandbox):
    require_root("the privilege drop needs root")
    os.chmod(sandbox.users_file, 0o600)
    rc, stderr = sandbox.start_expecting_exit()
    assert rc != 0
    lines = nonblank_lines(stderr)
    assert len(lines) == 1 and sandbox.users_file in lines[0], stderr
    assert "Traceback" not in stderr


# ---------------------------------------------------------------------------------------
# 16-18. Crash leftovers, directories removed at run time, a full disk


def test_crash_leftovers_are_removed_at_start_up(sandbox):
    mailbox = os.path.join(sandbox.maildir, "test.ru", "alice")
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(mailbox, sub))
    os.makedirs(os.path.join(sandbox.spool, "tmp"))
    day = 86400
    now = time.time()

    def leftover(path, age, content="left over\n"):
        Sandbox.write_file(path, content)
        os.utime(path, (now - age, now - age))
        return path

    old_tmp = leftover(os.path.join(mailbox, "tmp", "1000.M1P1Q1.old"), 2 * day)
    fresh_tmp = leftover(os.path.join(mailbox, "tmp", "1000.M2P1Q2.fresh"), 600)
    stale_spool = leftover(os.path.join(sandbox.spool, "tmp", "40020-00000000000000b1.smtp"),
                           600, "EHLO x\r\n")
    state_tmp = leftover(os.path.join(sandbox.spool,
                                      "40021-00000000000000b2.state.tmp1234.5678"), 600, "{")
    orphan = leftover(os.path.join(sandbox.spool, "40022-00000000000000b3.state"), 600,
                      state_json({"queue_id": "00000000000000b3", "created": now,
                                  "recipients": {"bob@remote.test": {
                                      "status": "pending", "attempts": 0,
                                      "next_attempt": 0, "last_error": ""}}}))
    sandbox.give_to_run_user(sandbox.maildir)
    sandbox.give_to_run_user(sandbox.spool)

    server = sandbox.start()
    gone = (old_tmp, stale_spool, state_tmp, orphan)
    assert wait_until(lambda: not any(os.path.exists(path) for path in gone), timeout=10), \
        [path for path in gone if os.path.exists(path)]
    assert os.path.exists(fresh_tmp), "a Maildir tmp/ file newer than a day was removed"
    assert send(server, "bob@test.ru", ["alice@test.ru"], text("after"))[0] == 250
    assert len(sandbox.maildir_messages("alice@test.ru")) == 1
    assert server.stop() == 0


@pytest.mark.parametrize("removed", ["mailbox", "domain", "spool-tmp"])
def test_a_directory_removed_at_run_time_is_recreated(sandbox, removed):
    mx = sandbox.mx("127.0.0.11")
    server = sandbox.start({"relay.routes": route("remote.test", mx)})
    assert send(server, "bob@test.ru", ["alice@test.ru"], text("first"))[0] == 250
    assert send(server, "alice@test.ru", ["bob@remote.test"], text("first out"))[0] == 250
    assert mx.wait_for(1, timeout=20)
    doomed = {"mailbox": os.path.join(sandbox.maildir, "test.ru", "alice"),
              "domain": os.path.join(sandbox.maildir, "test.ru"),
              "spool-tmp": os.path.join(sandbox.spool, "tmp")}[removed]
    assert os.path.isdir(doomed)
    shutil.rmtree(doomed)

    if removed == "spool-tmp":
        code, lines = send(server, "alice@test.ru", ["bob@remote.test"], text("second out"))
        assert code == 250, lines
        assert mx.wait_for(1, timeout=20), server.stderr_text(last=30)
        assert b"Subject: second out" in mx.messages[-1][2]
    else:
        code, lines = send(server, "bob@test.ru", ["alice@test.ru"], text("second"))
        assert code == 250, lines
        stored = sandbox.maildir_messages("alice@test.ru")
        assert len(stored) == 1 and b"Subject: second" in stored[0]
    assert server.stop() == 0


def test_a_full_disk_answers_452_and_the_server_carries_on(sandbox):
    small = sandbox.mount_tmpfs(sandbox.path("small"), size="256k")
    server = sandbox.start({"storage.maildir": small})
    line = "x" * 76 + "\r\n"
    with Client(server.address) as client:
        assert client.code("EHLO client.example") == 250
        assert client.code("MAIL FROM:<bob@test.ru>") == 250
        assert client.code("RCPT TO:<alice@test.ru>") == 250
        assert client.code("DATA") == 354
        client.send("Subject: too big\r\n\r\n" + line * 8000 + ".\r\n")     # ~600 KB
        code, lines = client.reply()
        assert code == 452 and "4.3.1" in lines[-1], lines
        assert client.code("MAIL FROM:<bob@test.ru>") == 250
        assert client.code("RCPT TO:<alice@test.ru>") == 250
        assert client.code("DATA") == 354
        client.send(text("small"))
        code, lines = client.reply()
        assert code == 250, lines
        assert client.code("QUIT") == 221
    assert server.alive()
    stored = sandbox.maildir_messages("alice@test.ru", maildir=small)
    assert len(stored) == 1 and b"Subject: small" in stored[0]
    assert server.traceback_count == 0, server.stderr_text(last=40)   # none in the console
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 19. AUTH edge cases (RFC 4954)


def greeted(server):
    client = Client(server.address)
    assert client.code("EHLO client.example") == 250
    return client


def test_an_overlong_sasl_response_gets_500_5_5_6_and_the_session_is_greeted_again(sandbox):
    server = sandbox.start()
    with greeted(server) as client:
        assert client.code("AUTH PLAIN") == 334
        client.send("A" * 13000 + "\r\n")                       # over RFC 4954's 12,288
        code, lines = client.reply()
        assert code == 500 and "5.5.6" in lines[-1], lines
        assert client.code("NOOP") == 250
        assert client.code("MAIL FROM:<bob@test.ru>") == 250     # GREETED, not AUTH
        assert client.code("RSET") == 250
        assert client.code("QUIT") == 221
    assert server.stop() == 0


def test_the_auth_parameter_of_mail_is_accepted(sandbox):
    server = sandbox.start()
    with greeted(server) as client:
        code, lines = client.command("MAIL FROM:<a@test.ru> AUTH=<>")
        assert code == 250, lines
        assert client.code("QUIT") == 221
    assert server.stop() == 0


@pytest.mark.parametrize("command, code, enhanced", [
    ("AUTH PLAIN =", 535, "5.7.8"),                             # "=": an empty response
    ("AUTH PLAIN " + plain_credentials("alice@test.ru", "pw") + "==", 501, "5.5.2"),
    ("AUTH CRAM-MD5", 504, None),
], ids=["empty-initial-response", "surplus-padding", "unknown-mechanism"])
def test_auth_edge_cases(sandbox, command, code, enhanced):
    server = sandbox.start()
    with greeted(server) as client:
        got, lines = client.command(command)
        assert got == code, lines
        if enhanced:
            assert enhanced in lines[-1], lines
        if code == 504:
            assert "CRAM-MD5" in lines[-1], lines                # quoted as sent
        assert client.code("QUIT") == 221
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 20. The error budget


def test_eleven_refused_recipients_do_not_end_the_session(sandbox):
    server = sandbox.start()
    with greeted(server) as client:
        assert client.code("MAIL FROM:<bob@test.ru>") == 250
        codes = [client.code(f"RCPT TO:<nobody{number}@test.ru>") for number in range(11)]
        assert codes == [550] * 11, codes
        assert client.code("RCPT TO:<alice@test.ru>") == 250
        assert client.code("DATA") == 354
        client.send(text("twelfth"))
        assert client.reply()[0] == 250
        assert client.code("QUIT") == 221
    assert len(sandbox.maildir_messages("alice@test.ru")) == 1
    assert server.stop() == 0


def test_twenty_five_refused_recipients_end_the_session_after_twenty(sandbox):
    server = sandbox.start()                        # [server] max_rejected_recipients: 20
    with greeted(server) as client:
        assert client.code("MAIL FROM:<bob@test.ru>") == 250
        codes = []
        for number in range(25):
            try:
                code = client.code(f"RCPT TO:<nobody{number}@test.ru>")
            except OSError:
                code = None
            codes.append(code)
            if code != 550:
                break
        if codes[-1] == 550:                         # 25 refused: the next command is cut off
            codes.append(client.code("NOOP"))
        assert codes[-1] == 421, codes
        assert codes[:20] == [550] * 20, codes
        assert client.closed()
    assert server.stop() == 0


def test_ten_bad_commands_end_the_session_with_421(sandbox):
    server = sandbox.start()                        # [server] max_errors: 10
    with Client(server.address) as client:
        codes = [client.code(f"XYZZY{number}") for number in range(10)]
        if codes[-1] != 421:
            codes.append(client.code("NOOP"))
        assert codes[-1] == 421, codes
        assert set(codes[:-1]) == {500} and len(codes) >= 10, codes
        assert client.closed()
    assert server.stop() == 0


def test_quit_after_the_error_budget_is_spent_still_gets_221(sandbox):
    server = sandbox.start()
    with Client(server.address) as client:
        codes = [client.code(f"XYZZY{number}") for number in range(10)]
        assert codes[:9] == [500] * 9, codes
        code, lines = client.command("QUIT")
        assert code == 221, lines
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 21. Line ends: LF in the Maildir, CRLF on the wire and in the spool


def test_maildir_files_have_lf_line_ends_while_the_spool_and_the_wire_keep_crlf(sandbox):
    mx = sandbox.mx("127.0.0.12", rcpt=("450 4.2.0 busy", "250 2.1.5 ok"))
    server = sandbox.start({"relay.routes": route("remote.test", mx), "relay.retry": "3600"})
    code, lines = send(server, "alice@test.ru", ["alice@test.ru", "bob@remote.test"],
                       text("line ends", "first line\r\nsecond line"))
    assert code == 250, lines

    stored = sandbox.maildir_messages("alice@test.ru")
    assert len(stored) == 1
    assert b"\r" not in stored[0], stored[0][:300]
    assert b"Subject: line ends\n\nfirst line\nsecond line\n" in stored[0]

    spooled = [name for name in sandbox.queued() if name.endswith(".smtp")]
    assert len(spooled) == 1, sandbox.queued()
    with open(os.path.join(sandbox.spool, spooled[0]), "rb") as spool_file:
        content = spool_file.read()
    assert content.count(b"\n") == content.count(b"\r\n"), content[:300]
    assert b"first line\r\nsecond line\r\n" in content

    listing = sandbox.wait_for_listing(lambda listing: "450 4.2.0" in listing)
    assert "450 4.2.0" in listing, listing
    rc, out, err = sandbox.run_cli("--flush")
    assert rc == 0, out + err
    assert mx.wait_for(1, timeout=15), server.stderr_text(last=30)
    data = mx.messages[0][2]
    assert data.count(b"\n") == data.count(b"\r\n") and b"first line\r\nsecond line\r\n" in data
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# 22. Port 25


def test_started_as_root_on_port_25_it_delivers(sandbox):
    require_root("binding port 25 needs root")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", 25))
            free = True
        except OSError:
            free = False
    need(free, "127.0.0.1:25 is taken")
    server = sandbox.start(port=25)
    assert server.address == ("127.0.0.1", 25)
    assert send(server, "bob@test.ru", ["alice@test.ru"], text("port 25"))[0] == 250
    stored = sandbox.maildir_messages("alice@test.ru")
    assert len(stored) == 1 and b"Subject: port 25" in stored[0]
    uid, _ = run_user()
    assert server.uids() == [uid] * 4
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------
# Issue 13: the extensions, on the real process (after the drop to nobody)


def test_smtputf8_bdat_and_implicit_tls_on_the_real_process():
    box = Sandbox(users=("alice", "zoë", "jürgen@bücher.test"))
    try:
        cert, key = box.make_certificate()
        submissions = free_port(["127.0.0.1"])
        server = box.start({"domains.local": "test.ru, bücher.test", "tls.cert": cert,
                            "tls.key": key, "tls.submissions_port": submissions})
        with Client(server.address) as client:
            code, lines = client.command("EHLO client.example")
            assert {"250-SMTPUTF8", "250-DSN", "250-CHUNKING"} <= set(lines), lines
            assert client.code("MAIL FROM:<jöhn@example.org> SMTPUTF8 RET=HDRS") == 250
            assert client.code("RCPT TO:<zoë@test.ru> NOTIFY=FAILURE") == 250
            assert client.code("RCPT TO:<jürgen@BÜCHER.test>") == 250
            body = "Subject: Grüße\r\n\r\nHallo\r\n".encode()
            client.send(b"BDAT %d LAST\r\n" % len(body) + body)
            assert client.reply()[0] == 250
            assert client.code("QUIT") == 221
        for address in ("zoë@test.ru", "jürgen@xn--bcher-kva.test"):
            [stored] = box.maildir_messages(address)
            assert stored.endswith("Subject: Grüße\n\nHallo\n".encode())
            assert b" with UTF8SMTPS id " not in stored and b" with UTF8SMTP id " in stored
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with context.wrap_socket(socket.create_connection(("127.0.0.1", submissions),
                                                          timeout=10)) as tls:
            tls.settimeout(10)
            assert tls.recv(1024).startswith(b"220 ")       # TLS first, then the greeting
        assert server.stop() == 0
    finally:
        box.cleanup()


# ---------------------------------------------------------------------------------------
# Issue 14: aliases and forwarding, on the real process


def test_aliases_and_forwarding_on_the_real_process(sandbox):
    mx = sandbox.mx("127.0.0.12")
    aliases = Sandbox.write_file(sandbox.path("aliases"),
                                 "team: alice, bob\ncarol: carol@remote.test\n")
    server = sandbox.start({"users.aliases": aliases,
                            "relay.routes": route("remote.test", mx)})
    assert send(server, "dave@example.org", ["team@test.ru", "carol@test.ru"],
                text("to the team"))[0] == 250
    for user in ("alice", "bob"):
        [stored] = sandbox.maildir_messages(f"{user}@test.ru")
        assert f"Delivered-To: {user}@test.ru\n".encode() in stored
    assert mx.wait_for(1, timeout=20), server.stderr_text(last=40)
    mail = next(command for command in mx.commands if command.startswith("MAIL"))
    assert mail.startswith("MAIL FROM:<SRS0=") and "=example.org=dave@test.ru>" in mail
    key = os.path.join(sandbox.spool, ".forwarding-key")   # made after the drop, private
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    assert server.stop() == 0
