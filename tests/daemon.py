"""The daemon tier's harness: the real `python smtpd.py` process, started as the README says.

    box = Sandbox()                          # /tmp/smtpd-daemon-XXXX, mode 0755, users file
    with box.start({"server.data_timeout": 2}) as server:
        with Client(server.address) as client:
            ...
        assert server.stop() == 0            # SIGTERM; the exit code
    box.cleanup()                            # (the `sandbox` fixture of test_daemon.py does it)

Nothing here imports the product code: the server is a black box, started with
`[sys.executable, "smtpd.py", IP, "--port", PORT, "--config", FILE, ...]` from the repository
root (or another working directory a test gives). Started as root it drops to its default
`[server] user` (nobody), for which the pyenv interpreter's stdlib under /root is unreadable:
that is the case this tier proves, so nothing works around it.

The base directory is made with mkdtemp under /tmp (pytest's tmp_path is 0700, out of nobody's
reach) and chmod 0755; the config and users files in it are 0644. The server makes `mail/`,
`spool/` and `logs/` itself; a test that seeds them first gives them to the run user
(`give_to_run_user`). Every wait is bounded and waits on an event or polls with a deadline.
"""
import base64
import collections
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from tests.dns_responder import DNSResponder
from tests.fake_mx import FakeMX, free_port
from tests.waiting import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMTPD = os.path.join(ROOT, "smtpd.py")
RUN_USER = "nobody"                     # the default [server] user
START_TIMEOUT = 20                      # seconds for "listening on" to appear
STOP_TIMEOUT = 15                       # seconds for an exit after SIGTERM
CLI_TIMEOUT = 30                        # seconds for --queue, --flush, --add-user


# ---------------------------------------------------------------------------------------
# The one rule for tests that need something: skip outside CI, fail in CI


def is_root():
    return os.geteuid() == 0


def need(condition, reason):
    """Skip the test unless `condition`; but when SMTPD_CI is set the test fails instead
    (CI runs as root with every tool installed, so a skip there would hide a broken tier)."""
    if condition:
        return
    if os.environ.get("SMTPD_CI"):
        pytest.fail(f"{reason} (SMTPD_CI is set: this test must not be skipped in CI)",
                    pytrace=False)
    pytest.skip(reason)


def require_root(reason="needs root (CI runs the suite as root)"):
    need(is_root(), reason)


def run_user():
    """(uid, gid) of the run user the server drops to when started as root."""
    account = pwd.getpwnam(RUN_USER)
    return account.pw_uid, account.pw_gid


def free_udp_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------
# A base directory per test


class Sandbox:
    """One test's world: a base directory with the config and users files, the server
    processes started on it, the loopback peers (FakeMX, DNS), mounts; `cleanup()` ends all."""

    def __init__(self, users=("alice", "bob")):
        self.base = tempfile.mkdtemp(prefix="smtpd-daemon-", dir="/tmp")
        os.chmod(self.base, 0o755)
        self.users_file = os.path.join(self.base, "users")
        self.maildir = os.path.join(self.base, "mail")
        self.spool = os.path.join(self.base, "spool")
        self.log_dir = os.path.join(self.base, "logs")
        self.config_file = os.path.join(self.base, "smtpd.conf")
        self.settings = {}                  # "section.key" -> value, kept across restarts
        self.processes = []
        self.peers = []                     # FakeMX and DNS responders, stopped at cleanup
        self.mounts = []
        self.outside = []                   # paths outside base a test may create; removed
        self.write_file(self.users_file, "".join(f"{user}\n" for user in users))
        # Never the system resolver, never port 25 of a real host: a test that wants DNS or
        # an MX port sets [relay] nameservers / port to its own loopback peers.
        self.settings["relay.nameservers"] = f"127.0.0.1:{free_udp_port()}"
        self.settings["relay.port"] = str(free_port(["127.0.0.1"]))
        self.write_config()                 # so --add-user etc. work before the first start

    # files

    @staticmethod
    def write_file(path, text, mode=0o644):
        data = text.encode() if isinstance(text, str) else text
        with open(path, "wb") as handle:
            handle.write(data)
        os.chmod(path, mode)
        return path

    def path(self, *parts):
        return os.path.join(self.base, *parts)

    def give_to_run_user(self, path):
        """Started as root, the server runs as nobody: what a test creates for it (a seeded
        spool, a Maildir tree) must be nobody's. Does nothing when not root."""
        if not is_root():
            return
        uid, gid = run_user()
        os.chown(path, uid, gid, follow_symlinks=False)
        for directory, subdirectories, names in os.walk(path):
            for name in subdirectories + names:
                os.chown(os.path.join(directory, name), uid, gid, follow_symlinks=False)

    # configuration

    def sections(self, settings=None, relative=False):
        """{section: {key: value}}: the paths (absolute, or relative to the config file's
        directory when `relative`), short timeouts, then the test's settings. Keys not
        given keep the server's defaults ([server] user stays nobody)."""
        if relative:
            paths = {"users.file": "users", "storage.maildir": "mail",
                     "storage.spool": "spool", "log.dir": "logs"}
        else:
            paths = {"users.file": self.users_file, "storage.maildir": self.maildir,
                     "storage.spool": self.spool, "log.dir": self.log_dir}
        values = dict(paths)
        values.update({
            "server.timeout": "5",
            "relay.retry": "1",
            "relay.connect_timeout": "2",
            "checks.dns_timeout": "1",
            "relay.command_timeout": "5",
            "relay.data_timeout": "5",
            "auth.failure_delay": "0",
        })
        values.update(self.settings)
        values.update({key: str(value) for key, value in (settings or {}).items()})
        sections = {}
        for dotted, value in values.items():
            section, key = dotted.split(".", 1)
            sections.setdefault(section, {})[key] = str(value)
        return sections

    def write_config(self, settings=None, relative=False, path=None):
        """Write the INI file (0644). `settings` are "section.key" = value pairs."""
        path = path or self.config_file
        lines = []
        for section, keys in self.sections(settings, relative).items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {value}" for key, value in keys.items()]
            lines.append("")
        self.write_file(path, "\n".join(lines))
        return path

    def configure(self, settings):
        """Settings kept for every later start (and restart) of this sandbox."""
        self.settings.update({key: str(value) for key, value in settings.items()})
        self.write_config()

    # the server

    def start(self, settings=None, args=(), ip="127.0.0.1", port=None, cwd=None,
              relative=False, config_file=None, wait=True):
        """Write the config (this sandbox's settings plus `settings`) and start the server;
        with `wait`, return once it logged `listening on` (else the test fails with its
        stderr). A started process is stopped at cleanup if the test did not."""
        if config_file is None:
            if settings:
                self.settings.update({key: str(value) for key, value in settings.items()})
            config_file = self.write_config(relative=relative)
        process = SmtpdProcess(config_file, args=args, ip=ip, port=port, cwd=cwd)
        self.processes.append(process)
        process.start(wait=wait)
        return process

    def start_expecting_exit(self, settings=None, args=(), **options):
        """Start a server that must refuse to run: (exit code, stderr text). Fails the test
        if it starts listening instead."""
        process = self.start(settings, args=args, wait=False, **options)
        outcome = process.wait_ready_or_exit(START_TIMEOUT)
        if outcome != "exited":
            process.stop()
            pytest.fail(f"the server was expected to refuse to start, but it {outcome}:\n"
                        + process.stderr_text(), pytrace=False)
        return process.returncode, process.stderr_text()

    def run_cli(self, *flags, input=None, cwd=None, config_file=None, timeout=CLI_TIMEOUT):
        """`python smtpd.py FLAGS --config FILE` as a short-lived process: (rc, stdout, stderr)."""
        cwd = cwd or ROOT
        script = "smtpd.py" if os.path.realpath(cwd) == ROOT else SMTPD
        command = [sys.executable, script, *flags, "--config", config_file or self.config_file]
        try:
            result = subprocess.run(command, cwd=cwd, input=input, capture_output=True,
                                    text=True, timeout=timeout,
                                    stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as expired:
            pytest.fail(f"{' '.join(flags)} did not finish within {timeout}s; output so far:\n"
                        f"{expired.stdout}\n{expired.stderr}", pytrace=False)
        return result.returncode, result.stdout, result.stderr

    def queue_listing(self, cwd=None):
        """The stdout (and stderr) of `python smtpd.py --queue`."""
        rc, out, err = self.run_cli("--queue", cwd=cwd)
        assert rc == 0, f"--queue exited {rc}: {out}{err}"
        return out + err

    def wait_for_listing(self, predicate, timeout=20, poll=0.3):
        """Run --queue until predicate(listing) holds (bounded); returns the last listing."""
        deadline = time.monotonic() + timeout
        listing = self.queue_listing()
        while not predicate(listing) and time.monotonic() < deadline:
            time.sleep(poll)
            listing = self.queue_listing()
        return listing

    # what a user sees on disk

    def log_text(self):
        """<log dir>/smtpd.log (empty if there is none yet)."""
        try:
            with open(os.path.join(self.log_dir, "smtpd.log"), encoding="utf-8",
                      errors="replace") as log_file:
                return log_file.read()
        except FileNotFoundError:
            return ""

    def maildir_messages(self, address, maildir=None):
        """The files in `new/` of a local mailbox, as bytes, by name."""
        local_part, domain = address.lower().split("@")
        folder = os.path.join(maildir or self.maildir, domain, local_part, "new")
        if not os.path.isdir(folder):
            return []
        messages = []
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as message_file:
                messages.append(message_file.read())
        return messages

    def wait_for_messages(self, address, count=1, timeout=15, maildir=None):
        """Wait (bounded) until a mailbox holds `count` messages; returns them."""
        wait_until(lambda: len(self.maildir_messages(address, maildir)) >= count, timeout)
        return self.maildir_messages(address, maildir)

    def queued(self):
        """The spool files (`.smtp` and `.state`) at the top of the spool: the queue."""
        if not os.path.isdir(self.spool):
            return []
        return sorted(name for name in os.listdir(self.spool)
                      if name.endswith(".smtp") or name.endswith(".state"))

    def wait_for_empty_queue(self, timeout=15):
        return wait_until(lambda: not self.queued(), timeout)

    # peers on loopback

    def mx(self, host="127.0.0.2", port=None, **script):
        """A FakeMX on host:port (a free port by default), stopped at cleanup."""
        fake = FakeMX(host, port if port is not None else free_port([host]), **script)
        self.peers.append(fake)
        return fake

    def dns(self, records):
        """A loopback DNS responder (see ScriptedDNS), stopped at cleanup."""
        responder = ScriptedDNS(records)
        self.peers.append(responder)
        return responder

    def make_certificate(self):
        """A self-signed pair as the README makes it, in the base dir, mode 0644."""
        need(shutil.which("openssl"), "openssl is not installed")
        cert, key = self.path("cert.pem"), self.path("key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "2", "-subj", "/CN=mail.test.ru", "-keyout", key, "-out", cert],
                       check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        os.chmod(cert, 0o644)
        os.chmod(key, 0o644)
        return cert, key

    def mount_tmpfs(self, path, size="256k"):
        """A small tmpfs at `path` (root only), owned by the run user; unmounted at cleanup."""
        require_root("mounting a tmpfs needs root")
        os.makedirs(path, exist_ok=True)
        uid, gid = run_user()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o",
                                 f"size={size},uid={uid},gid={gid},mode=0700", "tmpfs", path],
                                capture_output=True, text=True, timeout=30,
                                stdin=subprocess.DEVNULL)
        need(result.returncode == 0, f"cannot mount a tmpfs here: {result.stderr.strip()}")
        self.mounts.append(path)
        return path

    def remove_at_cleanup(self, path):
        """A path outside the base dir that did not exist before the test: removed at
        cleanup if the test (or a server that got its paths wrong) created it."""
        if not os.path.lexists(path):
            self.outside.append(path)

    def cleanup(self):
        for process in self.processes:
            process.close()
        for peer in self.peers:
            try:
                peer.stop()
            except Exception:
                pass
        for path in reversed(self.mounts):
            subprocess.run(["umount", path], capture_output=True, timeout=30,
                           stdin=subprocess.DEVNULL)
            if os.path.ismount(path):
                subprocess.run(["umount", "-l", path], capture_output=True, timeout=30,
                               stdin=subprocess.DEVNULL)
        for path in self.outside:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)
        shutil.rmtree(self.base, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# The process


class SmtpdProcess:
    """`python smtpd.py IP --port PORT --config FILE ...` with stderr (and stdout) read by
    threads, so a pipe never blocks the server. A context manager: leaving it stops the
    process (SIGTERM, then SIGKILL if it lingers)."""

    KEEP_LINES = 2000                   # first and last lines kept of a chatty console

    def __init__(self, config_file, args=(), ip="127.0.0.1", port=None, cwd=None):
        self.config_file = config_file
        self.ip = ip
        if port is None:
            port = _free_port6(ip) if ":" in ip else free_port([ip])
        self.port = port
        self.cwd = cwd or ROOT
        script = "smtpd.py" if os.path.realpath(self.cwd) == ROOT else SMTPD
        self.command = [sys.executable, script, ip, "--port", str(self.port),
                        "--config", config_file, *args]
        self.process = None
        self.head = []                              # the first KEEP_LINES lines of stderr
        self.tail = collections.deque(maxlen=self.KEEP_LINES)
        self.line_count = 0
        self.traceback_count = 0                    # lines starting "Traceback"
        self.stdout_lines = []
        self.ready = threading.Event()              # "listening on" seen
        self.changed = threading.Event()            # ready, or stderr closed (exited)
        self.listening_line = None
        self._lock = threading.Lock()
        self._threads = []

    # starting and stopping

    def start(self, wait=True):
        self.process = subprocess.Popen(self.command, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, errors="replace")
        for target in (self._read_stderr, self._read_stdout):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        if wait:
            outcome = self.wait_ready_or_exit(START_TIMEOUT)
            if outcome != "ready":
                self.close()
                pytest.fail(f"the server did not start ({outcome}): {' '.join(self.command)}"
                            f"\n--- stderr ---\n{self.stderr_text()}", pytrace=False)
        return self

    def wait_ready_or_exit(self, timeout):
        """'ready' (it logged `listening on`), 'exited', or 'timed out'."""
        self.changed.wait(timeout)
        if self.ready.is_set():
            return "ready"
        if self.changed.is_set():
            try:
                self.process.wait(5)            # stderr closed: the exit follows at once
            except subprocess.TimeoutExpired:
                return "closed its stderr but did not exit"
            return "exited"
        return f"timed out after {timeout}s without 'listening on'"

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM and a bounded wait; the exit code. Fails the test if it does not exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                self._join()
                pytest.fail(f"the server did not exit within {timeout}s of SIGTERM\n"
                            f"--- stderr (end) ---\n{self.stderr_text(last=40)}",
                            pytrace=False)
        self._join()
        return self.process.returncode

    def kill(self):
        """kill -9, as a crash; waits for it to be gone."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._join()
        return self.process.returncode

    def close(self):
        """Teardown: whatever happened, no process is left behind."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._join()

    def _join(self):
        for thread in self._threads:
            thread.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # reading the console

    def _read_stderr(self):
        try:
            for line in self.process.stderr:
                line = line.rstrip("\n")
                with self._lock:
                    self.line_count += 1
                    if len(self.head) < self.KEEP_LINES:
                        self.head.append(line)
                    else:
                        self.tail.append(line)
                    if line.lstrip().startswith("Traceback"):
                        self.traceback_count += 1
                if not self.ready.is_set() and "listening on" in line:
                    self.listening_line = line
                    self.ready.set()
                    self.changed.set()
        except (OSError, ValueError):
            pass
        finally:
            self.changed.set()

    def _read_stdout(self):
        try:
            for line in self.process.stdout:
                if len(self.stdout_lines) < self.KEEP_LINES:
                    self.stdout_lines.append(line.rstrip("\n"))
        except (OSError, ValueError):
            pass

    def stderr_lines(self):
        with self._lock:
            lines = list(self.head)
            skipped = self.line_count - len(self.head) - len(self.tail)
            if skipped > 0:
                lines.append(f"... ({skipped} lines not kept) ...")
            return lines + list(self.tail)

    def stderr_text(self, last=None):
        lines = self.stderr_lines()
        return "\n".join(lines[-last:] if last else lines)

    # what the process is

    @property
    def pid(self):
        return self.process.pid

    @property
    def returncode(self):
        return self.process.poll()

    @property
    def address(self):
        return (self.ip, self.port)

    def alive(self):
        return self.process.poll() is None

    def signal(self, signum):
        self.process.send_signal(signum)

    def wait_exit(self, timeout=STOP_TIMEOUT):
        """The exit code once it has exited on its own (bounded), or None."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def status(self):
        """/proc/<pid>/status as {field: value}."""
        with open(f"/proc/{self.pid}/status") as status_file:
            return dict(line.rstrip("\n").split(":\t", 1) for line in status_file
                        if ":\t" in line)

    def uids(self):
        """[real, effective, saved, filesystem] uids of the running process."""
        return [int(uid) for uid in self.status()["Uid"].split()]

    def rss_kib(self):
        """VmRSS in KiB."""
        return int(self.status()["VmRSS"].split()[0])


def _free_port6(ip):
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind((ip, 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------
# DNS with per-type answers


class ScriptedDNS(DNSResponder):
    """tests.dns_responder.DNSResponder, plus entries scripted per record type:

        {"empty.test": {"MX": [], "A": "TIMEOUT", "AAAA": "TIMEOUT"}}

    a list answers NOERROR with those records (an empty list: no answer), "TIMEOUT" never
    answers, "SERVFAIL" fails; a type not in the dict is NOERROR with no answer. Other
    entries work as in DNSResponder."""

    def _answer(self, data):
        try:
            query = dns.message.from_wire(data)
            question = query.question[0]
        except Exception:
            return None
        name = question.name.to_text().lower().rstrip(".")
        entry = self.records.get(name)
        if not isinstance(entry, dict):
            return super()._answer(data)
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        value = entry.get(rdtype, [])
        if value == "TIMEOUT":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if value == "SERVFAIL":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif value:
            response.answer.append(dns.rrset.from_text_list(
                question.name, 60, dns.rdataclass.IN, question.rdtype, value))
        return response.to_wire()

    def count(self, name, rdtype):
        return sum(1 for query in list(self.queries) if query == (name, rdtype))


# ---------------------------------------------------------------------------------------
# Small things the tests share


def spool_file_text(sender, recipients, body, helo="client.example"):
    """A spool file as the README describes it: the transaction as SMTP commands, CRLF,
    the text dot-stuffed, ending `.` and QUIT."""
    commands = [f"EHLO {helo}", f"MAIL FROM:<{sender}>"]
    commands += [f"RCPT TO:<{recipient}>" for recipient in recipients]
    commands.append("DATA")
    text = body.replace("\r\n", "\n").replace("\n", "\r\n")
    if not text.endswith("\r\n"):
        text += "\r\n"
    stuffed = "\r\n".join("." + line if line.startswith(".") else line
                          for line in text.split("\r\n"))
    return ("\r\n".join(commands) + "\r\n" + stuffed + ".\r\nQUIT\r\n").encode()


def state_json(value):
    return json.dumps(value, indent=1)


def plain_credentials(login, password):
    """The AUTH PLAIN initial response (RFC 4616): base64 of NUL login NUL password."""
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def nonblank_lines(stderr):
    """The lines of a refusal on stderr (the contract: exactly one, no traceback)."""
    return [line for line in stderr.splitlines() if line.strip()]
