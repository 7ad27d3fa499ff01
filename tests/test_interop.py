"""Issue 6: smtpd between real mail software, both ways, all on loopback.

Clients (swaks, curl, msmtp) submit to smtpd; a private Postfix relays into it and receives
from it; a private Dovecot serves its Maildir over IMAP; its bounces are read by Python's
`email` package. Every message is compared byte for byte with what was sent.

The peers are Debian packages (`.ci/run` installs them). Outside CI a missing one skips the
test; in CI (SMTPD_CI=1) it fails. Postfix and Dovecot need root (they switch users); each
instance lives in its own temporary directory, listens on 127.0.0.1 only, and is stopped by
the test that started it.

Run them alone with: python -m pytest -q -m interop tests/test_interop.py
"""
import email
import email.policy
import imaplib
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import config as configuration
import passwords
from tests.conftest import config_sections, maildir_messages, make_config
from tests.waiting import wait_until
from tests.fake_mx import FakeMX
from tests.queue_world import write_spool

pytestmark = pytest.mark.interop

SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
PASSWORD = "correct horse"
HOSTNAME = "mail.test.ru"            # the server's default [server] hostname


# --- tools and processes ---------------------------------------------------------------

def need(tool):
    """The path of `tool`; skip when it is missing, but fail in CI (SMTPD_CI=1)."""
    path = shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))
    if path:
        return path
    reason = f"{tool} is not installed (Debian: see the apt-get line in .ci/run)"
    if os.environ.get("SMTPD_CI"):
        pytest.fail(f"{reason}; interop tests never skip in CI")
    pytest.skip(reason)


def need_root(what):
    """Postfix and Dovecot start as root and switch users, as they do in production."""
    if os.geteuid() == 0:
        return
    reason = f"{what} needs root to run a private instance"
    if os.environ.get("SMTPD_CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def run(args, input=None, timeout=30, output_file=None):
    """Run a tool; fail with its output when it does not exit 0. Returns stdout (text).
    A command that leaves a daemon behind writes to `output_file` instead of pipes (the
    daemon would hold the pipes open and we would wait for it)."""
    args = [str(arg) for arg in args]
    try:
        if output_file:
            with open(output_file, "ab") as log:
                result = subprocess.run(args, input=input, stdout=log, stderr=log,
                                        stdin=None if input else subprocess.DEVNULL,
                                        timeout=timeout)
            output, errors = Path(output_file).read_text(errors="replace"), ""
        else:
            result = subprocess.run(args, input=input, capture_output=True, timeout=timeout)
            output = result.stdout.decode("utf-8", "replace")
            errors = result.stderr.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args} did not finish in {timeout}s")
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{output}\n{errors}"
    return output


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port, timeout=15):
    def listening():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False
    return wait_until(listening, timeout, poll=0.05)


def stop_pid(pid, timeout=10):
    """SIGTERM one process we started (by its id), then SIGKILL if it does not go."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return

    if wait_until(lambda: not alive(pid), timeout, poll=0.05):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def alive(pid):
    """True while `pid` runs. A daemon detaches from us, so when it exits it waits for init
    to reap it; as a zombie it is no longer alive."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def read_pid(path):
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture
def open_dir():
    """A temporary directory that other users can traverse (pytest's tmp_path is 0700, but
    Postfix and Dovecot drop root and must reach their files and smtpd's Maildir)."""
    path = Path(tempfile.mkdtemp(prefix="smtpd-interop-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- what was stored -------------------------------------------------------------------

def split_trace(stored, names=(b"return-path", b"received", b"delivered-to",
                                b"x-original-to")):
    """(the leading trace fields, each with its folded lines; the rest of the message)."""
    lines = stored.splitlines(keepends=True)
    fields, index = [], 0
    while index < len(lines) and lines[index].split(b":", 1)[0].lower() in names:
        field = lines[index]
        index += 1
        while index < len(lines) and lines[index][:1] in (b" ", b"\t"):
            field += lines[index]
            index += 1
        fields.append(field)
    return fields, b"".join(lines[index:])


def received_by_smtpd(field):
    return field.startswith(b"Received: from ") and f"by {HOSTNAME} (smtpd)".encode() in field


def as_sent(stored, sender, hops=0):
    """The message as the client sent it: the stored file after smtpd's Return-Path and
    Received lines, and after `hops` Received lines added by MTAs before smtpd. The file has
    LF line ends (CONTRACT: "Where mail lands"); it is compared in the CRLF of the wire."""
    assert b"\r" not in stored, stored[:300]
    fields, rest = split_trace(crlf(stored))
    assert len(fields) == 2 + hops, fields
    assert fields[0] == f"Return-Path: <{sender}>\r\n".encode()
    assert received_by_smtpd(fields[1]), fields[1]
    assert all(field.startswith(b"Received: ") for field in fields[2:])
    return rest


def crlf(text):
    """A message as it travels: str or bytes with LF lines -> bytes with CRLF lines."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def one_message(maildir, address, timeout=15):
    found = wait_until(lambda: maildir_messages(maildir, address), timeout)
    assert len(found) == 1, f"{address}: {len(found)} message(s) in the Maildir"
    return found[0]


def smtpd_log(root):
    return (Path(root) / "logs" / "smtpd.log").read_text()


# --- clients: swaks ---------------------------------------------------------------------

def swaks(server, *args):
    """Run swaks against `server`; returns its transcript."""
    host, port = server.address
    return run([need("swaks"), "--server", f"{host}:{port}", "--helo", "client.example",
                "--timeout", "15", *args], timeout=30)


def swaks_data(path, text):
    """swaks sends a --data file with LF turned into CRLF, then always CRLF.CRLF (so a final
    newline in the file would arrive as an extra empty line): the file gets `text` without
    its last newline, and what arrives is exactly crlf(text)."""
    assert text.endswith("\n")
    path.write_bytes(text[:-1].encode("utf-8"))
    return "@" + str(path)


MESSAGE = ("From: Bob <bob@test.ru>\n"
           "To: Alice <alice@test.ru>\n"
           "Subject: interop\n"
           "\n"
           "Hello Alice.\n"
           ".a line that starts with a dot (stuffed on the wire)\n"
           "..and one with two\n"
           "\n"
           "bye\n")


@pytest.fixture
def interop_server(tmp_path, start_server):
    """smtpd with alice@test.ru (password PASSWORD), bob and carol."""
    (tmp_path / "users").write_text(f"alice@test.ru:{passwords.hash_password(PASSWORD)}\n"
                                    "bob\ncarol\n")
    return start_server(make_config(tmp_path))


def test_swaks_plain(interop_server, tmp_path):
    transcript = swaks(interop_server, "--from", "bob@test.ru", "--to", "alice@test.ru",
                       "--data", swaks_data(tmp_path / "message", MESSAGE))
    assert "250 2.0.0" in transcript
    assert "\n -> ..a line that starts with a dot" in transcript         # stuffed by swaks
    stored = one_message(tmp_path / "mail", "alice@test.ru")
    assert as_sent(stored, "bob@test.ru") == crlf(MESSAGE)


def test_swaks_pipelining(interop_server, tmp_path):
    transcript = swaks(interop_server, "--pipeline", "--from", "bob@test.ru",
                       "--to", "alice@test.ru", "--data", swaks_data(tmp_path / "m", MESSAGE))
    # with PIPELINING swaks sends MAIL, RCPT and DATA before reading any reply
    lines = transcript.splitlines()
    mail = lines.index(" -> MAIL FROM:<bob@test.ru>")
    assert lines[mail + 1:mail + 3] == [" -> RCPT TO:<alice@test.ru>", " -> DATA"]
    assert lines[mail + 3].startswith("<-  250 2.1.0")
    stored = one_message(tmp_path / "mail", "alice@test.ru")
    assert as_sent(stored, "bob@test.ru") == crlf(MESSAGE)


def test_swaks_8bit_body(interop_server, tmp_path):
    text = ("From: bob@test.ru\nTo: alice@test.ru\nSubject: 8bit\nMIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
            "Привет, мир! Grüße, ½ € — 8-bit octets in the body.\n\u00ff\u00e9\n.end\n")
    swaks(interop_server, "--from", "bob@test.ru", "--to", "alice@test.ru",
          "--data", swaks_data(tmp_path / "m", text))
    stored = one_message(tmp_path / "mail", "alice@test.ru")
    assert as_sent(stored, "bob@test.ru") == crlf(text)
    body = email.message_from_bytes(stored, policy=email.policy.default).get_content()
    assert "Привет, мир! Grüße, ½ €" in body


def test_swaks_several_recipients(interop_server, tmp_path):
    recipients = ["alice@test.ru", "bob@test.ru", "carol@test.ru"]
    swaks(interop_server, "--from", "bob@test.ru", "--to", ",".join(recipients),
          "--data", swaks_data(tmp_path / "m", MESSAGE))
    stored = [one_message(tmp_path / "mail", address) for address in recipients]
    assert stored[0] == stored[1] == stored[2]
    assert as_sent(stored[0], "bob@test.ru") == crlf(MESSAGE)
    new = [tmp_path / "mail" / "test.ru" / name.split("@")[0] / "new" for name in recipients]
    inodes = {os.stat(folder / os.listdir(folder)[0]).st_ino for folder in new}
    assert len(inodes) == 1                               # written once, hard-linked


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_auth(interop_server, tmp_path, mechanism):
    transcript = swaks(interop_server, "--auth", mechanism, "--auth-user", "alice@test.ru",
                       "--auth-password", PASSWORD, "--from", "alice@test.ru",
                       "--to", "bob@test.ru", "--data", swaks_data(tmp_path / "m", MESSAGE))
    assert "<~  235 2.7.0" in transcript or "<-  235 2.7.0" in transcript
    stored = one_message(tmp_path / "mail", "bob@test.ru")
    assert as_sent(stored, "alice@test.ru") == crlf(MESSAGE)
    log = smtpd_log(tmp_path)
    assert f"AUTH {mechanism}" in log and PASSWORD not in log


@pytest.fixture
def tls_certificate(request):
    """conftest's self-signed pair, made with openssl (which must exist in CI)."""
    need("openssl")
    return request.getfixturevalue("certificate")


def test_swaks_starttls(tmp_path, start_server, tls_certificate):
    (tmp_path / "users").write_text(f"alice@test.ru:{passwords.hash_password(PASSWORD)}\n"
                                    "bob\n")
    cert, key = tls_certificate
    server = start_server(make_config(tmp_path, **{"tls.cert": cert, "tls.key": key}))
    transcript = swaks(server, "-tls", "--auth", "PLAIN", "--auth-user", "alice@test.ru",
                       "--auth-password", PASSWORD, "--from", "alice@test.ru",
                       "--to", "bob@test.ru", "--data", swaks_data(tmp_path / "m", MESSAGE))
    assert "=== TLS started with cipher TLSv1." in transcript
    assert ' ~> EHLO client.example' in transcript           # EHLO again under TLS
    assert "<~  235 2.7.0" in transcript
    stored = one_message(tmp_path / "mail", "bob@test.ru")
    assert as_sent(stored, "alice@test.ru") == crlf(MESSAGE)
    assert "TLS established" in smtpd_log(tmp_path)


def test_received_line_names_tls_and_auth(tmp_path, start_server, tls_certificate):
    (tmp_path / "users").write_text(f"alice@test.ru:{passwords.hash_password(PASSWORD)}\n"
                                    "bob\n")
    cert, key = tls_certificate
    server = start_server(make_config(tmp_path, **{"tls.cert": cert, "tls.key": key}))
    swaks(server, "-tls", "--auth", "LOGIN", "--auth-user", "alice@test.ru",
          "--auth-password", PASSWORD, "--from", "alice@test.ru", "--to", "bob@test.ru",
          "--data", swaks_data(tmp_path / "m", MESSAGE))
    received = split_trace(one_message(tmp_path / "mail", "bob@test.ru"))[0][1]
    assert b"(smtpd) with ESMTPSA id " in received, received


# --- clients: curl and msmtp ------------------------------------------------------------

def test_curl_uploads_a_file(interop_server, tmp_path):
    # curl sends the file as it is (so it must have CRLF lines) and does the dot-stuffing
    message = crlf(MESSAGE)
    (tmp_path / "upload.eml").write_bytes(message)
    host, port = interop_server.address
    run([need("curl"), "--silent", "--show-error", "--max-time", "20",
         f"smtp://{host}:{port}/client.example", "--mail-from", "bob@test.ru",
         "--mail-rcpt", "alice@test.ru", "--mail-rcpt", "carol@test.ru",
         "-T", tmp_path / "upload.eml"])
    for address in ("alice@test.ru", "carol@test.ru"):
        stored = one_message(tmp_path / "mail", address)
        assert as_sent(stored, "bob@test.ru") == message
    assert "<- EHLO client.example" in smtpd_log(tmp_path)


def msmtp_rc(path, server, logfile):
    host, port = server.address
    path.write_text(f"defaults\nsyslog off\nlogfile {logfile}\n\n"
                    f"account default\nhost {host}\nport {port}\ndomain client.example\n"
                    "from bob@test.ru\nauth off\ntls off\ntimeout 15\n")
    path.chmod(0o600)
    return path


def test_msmtp_as_sendmail(interop_server, tmp_path):
    msmtp = need("msmtp")
    rc = msmtp_rc(tmp_path / "msmtprc", interop_server, tmp_path / "msmtp.log")
    # 1. `sendmail -t`: recipients from To/Cc/Bcc; msmtp removes Bcc and adds the Date and
    #    Message-ID headers the message lacks (before the others)
    text = ("From: Bob <bob@test.ru>\nTo: Alice <alice@test.ru>\nBcc: carol@test.ru\n"
            "Subject: msmtp -t\n\nSent by msmtp, reading recipients from the header.\n.dot\n")
    run([msmtp, "-C", rc, "-t"], input=text.encode())
    without_bcc = crlf(text.replace("Bcc: carol@test.ru\n", ""))
    for address in ("alice@test.ru", "carol@test.ru"):
        fields, rest = split_trace(as_sent(one_message(tmp_path / "mail", address),
                                           "bob@test.ru"), names=(b"date", b"message-id"))
        assert [field.split(b":")[0] for field in fields] == [b"Date", b"Message-ID"]
        assert rest == without_bcc
    # 2. `sendmail -oi -f sender recipient`, as mail programs call it; a complete message
    #    goes through untouched
    text = ("Date: Mon, 23 Nov 2026 10:00:00 +0000\nMessage-ID: <msmtp-2@test.ru>\n"
            "From: Bob <bob@test.ru>\nTo: Alice <alice@test.ru>\nSubject: msmtp -f\n\n"
            "Sent by msmtp with the recipient on the command line.\n")
    run([msmtp, "-C", rc, "-oi", "-f", "bob@test.ru", "bob@test.ru"], input=text.encode())
    assert as_sent(one_message(tmp_path / "mail", "bob@test.ru"), "bob@test.ru") == crlf(text)
    assert "smtpstatus=250" in (tmp_path / "msmtp.log").read_text()


# --- Postfix ----------------------------------------------------------------------------

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PrivatePostfix:
    """A Postfix instance of our own: config, queue and data directories under `root`, an
    smtpd on 127.0.0.1:port, no chroot, a log file instead of syslog. It relays everything
    to `relayhost` and keeps mail for the virtual domain remote.test in `root`/vmail."""

    def __init__(self, root, relayhost=None, mailboxes=("bob@remote.test",), **more):
        self.postfix = need("postfix")
        self.sendmail = os.path.join(os.path.dirname(self.postfix), "sendmail")
        self.root = Path(root)
        self.etc, self.queue = self.root / "etc", self.root / "queue"
        self.data, self.vmail = self.root / "data", self.root / "vmail"
        self.port = free_port()
        self.pid = None
        account = pwd.getpwnam("postfix")
        for folder in (self.etc, self.queue, self.data, self.vmail):
            folder.mkdir(parents=True)
        for folder in (self.data, self.vmail):
            os.chown(folder, account.pw_uid, account.pw_gid)
        (self.etc / "vmailbox").write_text(
            "".join(f"{box} remote.test/{box.split('@')[0]}/\n" for box in mailboxes))
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue, "data_directory": self.data,
            "mail_owner": "postfix", "setgid_group": "postdrop",
            "myhostname": "postfix.test", "mydomain": "postfix.test", "myorigin": "postfix.test",
            "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
            "mydestination": "", "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{relayhost}" if relayhost else "",
            "alias_maps": "", "alias_database": "", "local_recipient_maps": "",
            "smtpd_peername_lookup": "no", "biff": "no",
            "maillog_file": self.root / "maillog", "maillog_file_prefixes": self.root,
            "virtual_mailbox_domains": "remote.test",
            "virtual_mailbox_maps": f"texthash:{self.etc / 'vmailbox'}",
            "virtual_mailbox_base": self.vmail, "virtual_minimum_uid": "1",
            "virtual_uid_maps": f"static:{account.pw_uid}",
            "virtual_gid_maps": f"static:{account.pw_gid}",
            "smtp_connect_timeout": "5", "smtp_helo_timeout": "10",
            "queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s",
            **more,
        }
        (self.etc / "main.cf").write_text("".join(f"{key} = {value}\n"
                                                  for key, value in settings.items()))
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port))
        # Postfix will not read a file changed in the last second or two (it may be half
        # written) and waits for it: date ours back so that the start takes 0.3 s, not 2 s.
        past = time.time() - 60
        for name in os.listdir(self.etc):
            os.utime(self.etc / name, (past, past))

    def start(self):
        self.pid = 0
        try:
            run([self.postfix, "-c", self.etc, "start"], output_file=self.root / "start.out")
        except BaseException:
            raise AssertionError(f"postfix did not start:\n{self.log()}") from None
        finally:
            self.pid = wait_until(lambda: read_pid(self.queue / "pid" / "master.pid"), 10) or 0
        assert self.pid and wait_for_port(self.port), f"postfix does not listen:\n{self.log()}"
        return self

    def stop(self):
        if self.pid is None:
            return                  # never started
        pid = self.pid or read_pid(self.queue / "pid" / "master.pid")
        self.pid = None
        subprocess.run([self.postfix, "-c", str(self.etc), "stop"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        if pid:
            stop_pid(pid)           # wait for the master to go (or kill it: it is ours)

    def log(self):
        try:
            return (self.root / "maillog").read_text()
        except OSError:
            return "(no maillog)"

    def mailbox(self, name):
        """Messages delivered by Postfix's virtual(8) to remote.test/name."""
        folder = self.vmail / "remote.test" / name / "new"
        if not folder.is_dir():
            return []
        return [(folder / entry).read_bytes() for entry in sorted(os.listdir(folder))]


@pytest.fixture
def postfix(open_dir):
    """postfix(relayhost=None, **main_cf) -> a started PrivatePostfix, stopped after the
    test (before open_dir is removed)."""
    need("postfix")
    need_root("Postfix")
    instances = []

    def start(relayhost=None, **main_cf):
        instance = PrivatePostfix(open_dir / f"postfix{len(instances)}", relayhost, **main_cf)
        instances.append(instance)
        return instance.start()

    yield start
    for instance in instances:
        instance.stop()


def test_postfix_relays_into_smtpd(postfix, open_dir, start_server):
    """Postfix upstream: relayhost = [127.0.0.1]:<smtpd>; mail injected with Postfix's
    sendmail and over SMTP arrives in smtpd's Maildir, Postfix's Received line below ours."""
    server = start_server(make_config(open_dir))
    upstream = postfix(relayhost=server.address[1])
    injected = ("Date: Mon, 23 Nov 2026 10:00:00 +0000\nMessage-ID: <pf-1@test.ru>\n"
                "From: Bob <bob@test.ru>\nTo: Alice <alice@test.ru>\n"
                "Subject: through postfix (sendmail)\n\nInjected with Postfix's sendmail.\n"
                ".a dot line\n")
    run([upstream.sendmail, "-C", upstream.etc, "-oi", "-f", "bob@test.ru", "alice@test.ru"],
        input=injected.encode())
    stored = one_message(open_dir / "mail", "alice@test.ru")
    assert as_sent(stored, "bob@test.ru", hops=1) == crlf(injected), upstream.log()
    postfix_received = split_trace(stored)[0][2]
    assert postfix_received.startswith(b"Received: by postfix.test (Postfix")
    assert split_trace(stored)[0][1].startswith(b"Received: from postfix.test ([127.0.0.1])")

    over_smtp = ("Date: Mon, 23 Nov 2026 10:01:00 +0000\nMessage-ID: <pf-2@test.ru>\n"
                 "From: Alice <alice@test.ru>\nTo: Bob <bob@test.ru>\n"
                 "Subject: through postfix (SMTP)\nMIME-Version: 1.0\n"
                 "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
                 "Über Postfix, 8-bit: Привет.\n")
    with smtplib.SMTP("127.0.0.1", upstream.port, local_hostname="client.example",
                      timeout=15) as client:
        client.sendmail("alice@test.ru", ["bob@test.ru"], crlf(over_smtp),
                        mail_options=["BODY=8BITMIME"])
    stored = one_message(open_dir / "mail", "bob@test.ru")
    assert as_sent(stored, "alice@test.ru", hops=1) == crlf(over_smtp), upstream.log()
    assert b"by postfix.test (Postfix) with ESMTP" in split_trace(stored)[0][2]
    assert "status=sent (250 2.0.0" in upstream.log()
    assert "<- EHLO postfix.test" in smtpd_log(open_dir)


def test_smtpd_relays_to_postfix(postfix, open_dir, start_server):
    """Postfix downstream: a route sends remote.test to Postfix, which stores it in its own
    Maildir; an address Postfix refuses comes back to the sender as a bounce."""
    downstream = postfix()
    server = start_server(make_config(open_dir, **{
        "relay.routes": f"remote.test=127.0.0.1:{downstream.port}"}))
    message = ("From: Alice <alice@test.ru>\nTo: Bob <bob@remote.test>\n"
               "Subject: to postfix\nMessage-ID: <down-1@test.ru>\n"
               "Date: Mon, 23 Nov 2026 10:02:00 +0000\n\nHello Postfix.\n.dot line\n\nbye\n")
    with smtplib.SMTP(*server.address, local_hostname="client.example", timeout=15) as client:
        client.sendmail("alice@test.ru", ["bob@remote.test", "nobody@remote.test"],
                        crlf(message))
    delivered = wait_until(lambda: downstream.mailbox("bob"), 15)
    assert len(delivered) == 1, downstream.log()
    fields, rest = split_trace(delivered[0])
    assert rest == message.encode()                # Postfix's Maildir keeps LF line ends
    assert fields[0] == b"Return-Path: <alice@test.ru>\n"
    assert fields[1:3] == [b"X-Original-To: bob@remote.test\n",
                           b"Delivered-To: bob@remote.test\n"]
    assert fields[3].startswith(b"Received: from " + HOSTNAME.encode())
    assert b"by postfix.test (Postfix) with ESMTP" in fields[3]
    assert received_by_smtpd(fields[4])            # smtpd's own line, passed on intact
    assert fields[4].startswith(b"Received: from client.example ([127.0.0.1])\n")
    assert len(fields) == 5
    # nobody@remote.test: Postfix says 550 5.1.1 at RCPT, smtpd bounces it to alice
    bounce = email.message_from_bytes(one_message(open_dir / "mail", "alice@test.ru"),
                                      policy=email.policy.default)
    status = delivery_status_fields(bounce)[1]
    assert status["Final-Recipient"] == "rfc822; nobody@remote.test"
    assert status["Status"] == "5.1.1"
    assert "User unknown in virtual mailbox table" in status["Diagnostic-Code"]
    assert wait_until(lambda: not server.system.spool.names(), 10)


def test_postfix_passes_smtputf8_and_dsn_requests_into_smtpd(postfix, open_dir, start_server):
    """`sendmail -N success,delay,failure` with a UTF-8 recipient (Postfix detects SMTPUTF8): Postfix relays with SMTPUTF8 and
    NOTIFY; smtpd stores the UTF-8 message for zoë and, as asked, tells the sender."""
    (open_dir / "users").write_text("alice\nbob\nzoë\n")
    server = start_server(make_config(open_dir))
    upstream = postfix(relayhost=server.address[1])
    message = ("Date: Mon, 23 Nov 2026 10:05:00 +0000\nMessage-ID: <pf-utf8@test.ru>\n"
               "From: Bob <bob@test.ru>\nTo: Zoë <zoë@test.ru>\nSubject: Grüße\n\nHej!\n")
    run([upstream.sendmail, "-C", upstream.etc, "-oi", "-N", "success,delay,failure",
         "-f", "bob@test.ru", "zoë@test.ru"], input=message.encode())
    stored = one_message(open_dir / "mail", "zoë@test.ru")
    assert as_sent(stored, "bob@test.ru", hops=1) == crlf(message), upstream.log()
    assert b" with UTF8SMTP id " in split_trace(stored)[0][1]        # RFC 6531 4.3
    log = smtpd_log(open_dir)
    assert re.search(r"<- MAIL FROM:<bob@test.ru>.* SMTPUTF8", log), log
    assert re.search(r"<- RCPT TO:<zoë@test.ru> .*NOTIFY=SUCCESS,FAILURE,DELAY", log), log
    notice = email.message_from_bytes(one_message(open_dir / "mail", "bob@test.ru"),
                                      policy=email.policy.default)
    fields = delivery_status_fields(notice, action="delivered")
    assert fields[1]["Status"] == "2.0.0"
    assert fields[1]["Final-Recipient"] == "utf-8; zo\\x{EB}@test.ru"     # RFC 6533 3


def test_postfix_relays_into_smtpd_over_starttls(postfix, open_dir, start_server,
                                                 tls_certificate):
    """Postfix's TLS client (smtp_tls_security_level = encrypt) against smtpd's STARTTLS."""
    cert, key = tls_certificate
    server = start_server(make_config(open_dir, **{"tls.cert": cert, "tls.key": key}))
    upstream = postfix(relayhost=server.address[1], smtp_tls_security_level="encrypt",
                       smtp_tls_loglevel="1")
    message = ("Date: Mon, 23 Nov 2026 10:03:00 +0000\nMessage-ID: <pf-tls@test.ru>\n"
               "From: Bob <bob@test.ru>\nTo: Alice <alice@test.ru>\n"
               "Subject: postfix to smtpd over TLS\n\nEncrypted on the way.\n")
    run([upstream.sendmail, "-C", upstream.etc, "-oi", "-f", "bob@test.ru", "alice@test.ru"],
        input=message.encode())
    stored = one_message(open_dir / "mail", "alice@test.ru")
    assert as_sent(stored, "bob@test.ru", hops=1) == crlf(message), upstream.log()
    assert "TLS connection established to 127.0.0.1" in upstream.log()
    assert "TLS established" in smtpd_log(open_dir)


def test_smtpd_relays_to_postfix_over_starttls(postfix, open_dir, start_server,
                                               tls_certificate):
    """smtpd's relay with [relay] tls = require against Postfix's STARTTLS."""
    cert, key = tls_certificate
    downstream = postfix(smtpd_tls_security_level="may", smtpd_tls_cert_file=cert,
                         smtpd_tls_key_file=key, smtpd_tls_received_header="yes",
                         smtpd_tls_loglevel="1")
    server = start_server(make_config(open_dir, **{
        "relay.routes": f"remote.test=127.0.0.1:{downstream.port}", "relay.tls": "require"}))
    message = ("Date: Mon, 23 Nov 2026 10:04:00 +0000\nMessage-ID: <down-tls@test.ru>\n"
               "From: Alice <alice@test.ru>\nTo: Bob <bob@remote.test>\n"
               "Subject: smtpd to postfix over TLS\n\nEncrypted on the way.\n")
    with smtplib.SMTP(*server.address, local_hostname="client.example", timeout=15) as client:
        client.sendmail("alice@test.ru", ["bob@remote.test"], crlf(message))
    delivered = wait_until(lambda: downstream.mailbox("bob"), 15)
    assert len(delivered) == 1, downstream.log()
    fields, rest = split_trace(delivered[0])
    assert rest == message.encode()
    assert b"with ESMTPS id" in fields[3]          # Postfix: the session was encrypted
    assert received_by_smtpd(fields[4])
    assert "Anonymous TLS connection established from" in downstream.log() or \
        "TLS connection established from" in downstream.log()
    assert "TLS established" in smtpd_log(open_dir)
    assert wait_until(lambda: not server.system.spool.names(), 10)


def test_smtpd_relays_to_postfix_with_dsn_parameters_passed_on(postfix, open_dir,
                                                              start_server):
    """Postfix offers DSN: smtpd's relay passes NOTIFY=SUCCESS, ORCPT, RET and ENVID on and
    sends no notice of its own (RFC 3461 5.2.1); Postfix delivers, and its own success
    notice comes back to the sender through smtpd (Postfix's relayhost). The message enters
    smtpd's queue as a spool file, written as the receiving side writes one, so that the
    relay alone is under test."""
    smtpd_port = free_port()
    downstream = postfix(relayhost=smtpd_port)
    sections = config_sections(open_dir, **{
        "relay.routes": f"remote.test=127.0.0.1:{downstream.port}", "log.trace": "yes"})
    server = start_server(configuration.from_sections(sections, ip="127.0.0.1",
                                                      port=smtpd_port))
    message = ("From: Alice <alice@test.ru>\nTo: Bob <bob@remote.test>\n"
               "Subject: tell me when it arrives\nMessage-ID: <down-dsn@test.ru>\n"
               "Date: Mon, 23 Nov 2026 10:05:00 +0000\n\nHello Postfix.\n")
    name = write_spool(server.system.spool,
                       [("bob@remote.test", {"NOTIFY": "SUCCESS",
                                             "ORCPT": "rfc822;bob@remote.test"})],
                       text=crlf(message), parameters={"RET": "HDRS", "ENVID": "smtpd-dsn-1"})
    server.system.queue.enqueue(name)
    delivered = wait_until(lambda: downstream.mailbox("bob"), 15)
    assert len(delivered) == 1, downstream.log()
    assert split_trace(delivered[0])[1] == message.encode()
    assert wait_until(lambda: not server.system.spool.names(), 15)
    log = smtpd_log(open_dir)
    assert "-> MAIL FROM:<alice@test.ru> RET=HDRS ENVID=smtpd-dsn-1 SIZE=" in log
    assert "-> RCPT TO:<bob@remote.test> NOTIFY=SUCCESS ORCPT=rfc822;bob@remote.test" in log
    # Postfix's notice, and only it: smtpd's own would have been stored before the spool
    # file was removed
    notice = one_message(open_dir / "mail", "alice@test.ru", timeout=30)
    assert notice.startswith(b"Return-Path: <>\n"), downstream.log()
    report = email.message_from_bytes(notice, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report", downstream.log()
    status = [part for part in report.iter_parts()
              if part.get_content_type() == "message/delivery-status"][0].get_payload()
    assert status[0]["Reporting-MTA"] == "dns; postfix.test"
    assert status[0]["Original-Envelope-Id"] == "smtpd-dsn-1"
    assert status[1]["Original-Recipient"] == "rfc822;bob@remote.test"
    assert status[1]["Final-Recipient"] == "rfc822; bob@remote.test"
    assert (status[1]["Action"], status[1]["Status"]) == ("delivered", "2.0.0")
    assert "sender delivery status notification" in downstream.log()


# --- Dovecot ----------------------------------------------------------------------------

DOVECOT_CONF = """\
protocols = imap
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
instance_name = smtpd-interop-{port}
log_path = {root}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:{maildir}/%d/%n
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = {root}/passwd
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


class PrivateDovecot:
    """A Dovecot of our own serving smtpd's Maildir over IMAP on 127.0.0.1:port."""

    def __init__(self, root, maildir, users):
        self.dovecot = need("dovecot")
        self.root, self.port, self.pid = Path(root), free_port(), None
        self.root.mkdir()
        self.conf = self.root / "dovecot.conf"
        self.conf.write_text(DOVECOT_CONF.format(root=self.root, port=self.port,
                                                 maildir=maildir))
        # name:{PLAIN}password:uid:gid::home, one line per user@domain
        (self.root / "passwd").write_text("".join(
            f"{address}:{{PLAIN}}{password}:{uid}:{gid}::{maildir}/{address.split('@')[1]}/"
            f"{address.split('@')[0]}\n" for address, (password, uid, gid) in users.items()))

    def start(self):
        self.pid = 0
        try:
            run([self.dovecot, "-c", self.conf], output_file=self.root / "start.out")
        finally:                    # the daemon writes its pid file after the command exits
            self.pid = wait_until(lambda: read_pid(self.root / "run" / "master.pid"), 10) or 0
        assert self.pid and wait_for_port(self.port), f"dovecot does not listen:\n{self.log()}"
        return self

    def stop(self):
        if self.pid is None:
            return                  # never started
        pid = self.pid or read_pid(self.root / "run" / "master.pid")
        self.pid = None
        if pid:
            stop_pid(pid)           # as `doveadm stop` does: SIGTERM to the master, then wait

    def log(self):
        try:
            return (self.root / "dovecot.log").read_text()
        except OSError:
            return "(no dovecot.log)"


def imap_literal(connection, number, item):
    kind, data = connection.fetch(number, f"({item})")
    assert kind == "OK", data
    return data[0][1]


def imap_flags(connection, number):
    kind, data = connection.fetch(number, "(FLAGS)")
    assert kind == "OK", data
    return {flag.decode() for flag in imaplib.ParseFlags(data[0])}


@pytest.fixture
def dovecot(open_dir):
    """dovecot(root, maildir, users) -> a started PrivateDovecot, stopped after the test
    (before open_dir is removed)."""
    need("dovecot")
    need_root("Dovecot")
    instances = []

    def start(root, maildir, users):
        instance = PrivateDovecot(root, maildir, users)
        instances.append(instance)
        return instance.start()

    yield start
    for instance in instances:
        instance.stop()


def test_dovecot_serves_the_maildir(dovecot, open_dir, start_server):
    server = start_server(make_config(open_dir))
    first = ("From: Bob <bob@test.ru>\r\nTo: Alice <alice@test.ru>\r\n"
             "Subject: read me over IMAP\r\nMessage-ID: <imap-1@test.ru>\r\n\r\n"
             "First message.\r\n..a line with two dots\r\n")
    second = ("From: Bob <bob@test.ru>\r\nTo: Alice <alice@test.ru>\r\n"
              "Subject: =?utf-8?b?0J/RgNC40LLQtdGC?=\r\n\r\nSecond message.\r\n")
    with smtplib.SMTP(*server.address, local_hostname="client.example", timeout=15) as client:
        client.sendmail("bob@test.ru", ["alice@test.ru"], first)
        client.sendmail("bob@test.ru", ["alice@test.ru"], second)
    maildir = open_dir / "mail"
    stored = wait_until(lambda: len(maildir_messages(maildir, "alice@test.ru")) == 2 and
                        maildir_messages(maildir, "alice@test.ru"))
    assert stored, "smtpd did not store both messages"
    by_subject = {b"read me" in message: message for message in stored}
    # the files have LF line ends; IMAP serves them with CRLF (RFC 3501 2.3.1)
    stored_first, stored_second = crlf(by_subject[True]), crlf(by_subject[False])
    # smtpd writes as its [server] user; in production Dovecot reads as the same user. Here
    # smtpd runs as root inside pytest, so give the Maildir to `nobody` for Dovecot.
    nobody = pwd.getpwnam("nobody")
    for folder in (maildir, maildir / "test.ru"):
        folder.chmod(0o711)
    mailbox = maildir / "test.ru" / "alice"
    for directory, subdirectories, names in os.walk(mailbox):
        for name in [directory, *(os.path.join(directory, n) for n in subdirectories + names)]:
            os.chown(name, nobody.pw_uid, nobody.pw_gid)
    imap = dovecot(open_dir / "dovecot", maildir,
                   {"alice@test.ru": ("imap-secret", nobody.pw_uid, nobody.pw_gid)})

    connection = imaplib.IMAP4("127.0.0.1", imap.port, timeout=15)
    try:
        connection.login("alice@test.ru", "imap-secret")
        kind, count = connection.select("INBOX")
        assert (kind, count) == ("OK", [b"2"]), imap.log()
        assert connection.response("RECENT") == ("RECENT", [b"2"])
        kind, (uids,) = connection.search(None, "UNSEEN")
        assert uids.split() == [b"1", b"2"]
        # Dovecot orders by file name (time of delivery); find which one is first
        number = {True: b"1", False: b"2"}[
            b"read me" in imap_literal(connection, "1", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]")]
        other = b"2" if number == b"1" else b"1"
        assert imap_flags(connection, number) == {"\\Recent"}
        header, _, body = stored_first.partition(b"\r\n\r\n")
        assert imap_literal(connection, number, "BODY.PEEK[HEADER]") == header + b"\r\n\r\n"
        assert imap_literal(connection, number, "BODY.PEEK[TEXT]") == body
        subject = imap_literal(connection, number, "BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)]")
        assert subject == b"From: Bob <bob@test.ru>\r\nSubject: read me over IMAP\r\n\r\n"
        assert imap_flags(connection, number) == {"\\Recent"}          # PEEK keeps it unseen
        assert imap_literal(connection, number, "BODY[]") == stored_first
        assert imap_flags(connection, number) == {"\\Recent", "\\Seen"}
        kind, data = connection.fetch(other, "(RFC822.SIZE)")
        assert f"RFC822.SIZE {len(stored_second)}".encode() in data[0]
        parsed = email.message_from_bytes(imap_literal(connection, other, "BODY.PEEK[]"),
                                          policy=email.policy.default)
        assert parsed["Subject"] == "Привет"
        assert parsed["Return-Path"] == "<bob@test.ru>"
        connection.logout()

        # a new session: nothing is \Recent any more, \Seen was kept
        connection = imaplib.IMAP4("127.0.0.1", imap.port, timeout=15)
        connection.login("alice@test.ru", "imap-secret")
        connection.select("INBOX", readonly=True)
        assert connection.response("RECENT") == ("RECENT", [b"0"])
        assert imap_flags(connection, number) == {"\\Seen"}
        assert imap_flags(connection, other) == set()
        connection.logout()
    finally:
        try:
            connection.shutdown()
        except OSError:
            pass
    # Dovecot moved both to cur/, the one read with the Maildir flag S (seen)
    current = sorted(os.listdir(mailbox / "cur"))
    assert len(current) == 2 and not os.listdir(mailbox / "new")
    assert sum(name.endswith(":2,S") for name in current) == 1, current
    assert "Login: user=<alice@test.ru>" in imap.log()


# --- bounces ----------------------------------------------------------------------------

def delivery_status_fields(report, action="failed"):
    """RFC 3464 checks on a parsed DSN; returns [per-message fields, per-recipient...]."""
    assert not report.defects, report.defects
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["MIME-Version"] == "1.0"
    parts = list(report.iter_parts())
    assert [part.get_content_type() for part in parts][:2] == ["text/plain",
                                                              "message/delivery-status"]
    assert all(not part.defects for part in parts), [part.defects for part in parts]
    fields = parts[1].get_payload()
    assert len(fields) >= 2
    assert fields[0]["Reporting-MTA"] == f"dns; {HOSTNAME}"
    for recipient in fields[1:]:
        assert recipient["Action"] == action
        # RFC 6533 3: a UTF-8 address is of type utf-8
        assert recipient["Final-Recipient"].startswith(("rfc822; ", "utf-8; "))
    return fields


def test_bounce_is_a_valid_multipart_report(tmp_path, start_server):
    mx = FakeMX("127.0.0.1", rcpt=["550 5.1.1 no such user here"])
    try:
        server = start_server(make_config(tmp_path, **{
            "relay.routes": f"remote.test=127.0.0.1:{mx.port}"}))
        original = ("From: Alice <alice@test.ru>\r\nTo: <nobody@remote.test>\r\n"
                    "Subject: will bounce\r\nMessage-ID: <bounce-1@test.ru>\r\n\r\nbody\r\n")
        with smtplib.SMTP(*server.address, local_hostname="client.example",
                          timeout=15) as client:
            client.sendmail("alice@test.ru", ["nobody@remote.test"], original)
        stored = one_message(tmp_path / "mail", "alice@test.ru")
    finally:
        mx.stop()
    assert stored.startswith(b"Return-Path: <>\n")            # a bounce has the null sender
    report = email.message_from_bytes(stored, policy=email.policy.default)
    assert report["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOSTNAME}"
    assert report["To"].addresses[0].addr_spec == "alice@test.ru"
    assert report["Auto-Submitted"] == "auto-replied"
    fields = delivery_status_fields(report)
    assert len(fields) == 2
    recipient = fields[1]
    assert recipient["Final-Recipient"] == "rfc822; nobody@remote.test"
    assert recipient["Status"] == "5.1.1"
    assert recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user here"
    returned = list(report.iter_parts())[2]
    assert returned.get_content_type() in ("text/rfc822-headers", "message/rfc822")
    assert "Message-ID: <bounce-1@test.ru>" in returned.get_content()
    assert "Subject: will bounce" in returned.get_content()
    # the same bytes through the legacy (compat32) parser, as older MUAs use it
    legacy = email.message_from_bytes(stored)
    assert legacy.get_content_type() == "multipart/report" and not legacy.defects
    assert [part.get_content_type() for part in legacy.walk()][:3] == [
        "multipart/report", "text/plain", "message/delivery-status"]
