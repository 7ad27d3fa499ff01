#!/usr/bin/env python3
"""Benchmark smtpd against aiosmtpd (Maildir), Postfix and Postfix's smtp-sink, on loopback.

    python bench/run.py [--quick] [--runs N] [--out DIR] [--only KEY,...] [--rev REV]
    python bench/run.py --report        # RESULTS.md and the plots again, from results.json

Every peer listens on its own 127.0.0.1 port and is started fresh (with its own temporary
Maildir) for every measurement; Postfix's `smtp-source` drives the same workloads against
each. After each run the Maildir files are counted (after Postfix's queue has delivered): a
run whose messages are not all on disk is reported as a failure, not as a rate. Besides the
throughput workloads, idle connections and a connect burst (here), there are the relay drain
(relaydrain.py), the scaling points and their plot (scaling.py), and the deployment section
(deploy.py: memory with big messages, the dialogue log's CPU, idle TLS sessions). The
report, bench/RESULTS.md, starts with the machine (machine.py). See bench/README.md for how
to read it.

Installs nothing: it says what is missing and stops.
"""
import argparse
import atexit
import datetime
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)        # for tests/wire.py, the reply parser the tests use too

import deploy                           # noqa: E402  (needs the path above)
import machine                          # noqa: E402
import postfix_peer                     # noqa: E402
import relaydrain                       # noqa: E402
import scaling                          # noqa: E402
from tests.wire import read_reply       # noqa: E402
SMTPD_ROOT = ROOT                   # where smtpd.py is run from; --rev exports another one
REVISION = None                     # (rev, commit) when --rev is given
HOST = "127.0.0.1"
DOMAIN = "test.ru"
SENDER = "bench@test.ru"
RECIPIENT = "user@" + DOMAIN        # smtp-source -r N sends Nuser@, ..., 2user@, user@
# aiosmtpd: mailbox.Maildir without fsync (the issue's peer; the targets are ratios to it).
# aiosmtpd-fsync: mailbox.Maildir as it ships, which fsyncs each file (not the directory).
# postfix: a private Postfix (postfix_peer.py), virtual(8) to Maildir, fsync'd as it ships.
# smtpd runs in two configurations: one process, and [server] processes = auto (issue 17's
# split: one accepting process per core, a queue process, a supervisor).
SMTPD_PEERS = {"smtpd": {}, "smtpd-procs": {"server": {"processes": "auto"}}}
PEERS = ("smtpd", "smtpd-procs", "aiosmtpd", "aiosmtpd-fsync", "postfix", "smtp-sink")
OTHER_PEERS = tuple(peer for peer in PEERS if peer not in SMTPD_PEERS)
STORING_PEERS = ("smtpd", "smtpd-procs", "aiosmtpd", "aiosmtpd-fsync", "postfix")
IDLE_PEERS = ("smtpd", "aiosmtpd")
BURST_PEERS = ("smtpd", "aiosmtpd", "postfix", "smtp-sink")
SKIPPED = {}                    # peer -> why it cannot run here (Postfix without root)

# Each workload: the smtp-source options and the target ratio smtpd/aiosmtpd (issue 5).
# Message counts are sized so that smtpd needs a few seconds per run on a 2-core machine.
WORKLOADS = [
    dict(key="seq", title="1 session, sequential, 1 KB",
         sessions=1, messages=1500, size=1024, recipients=1, keep=False, target=1.5),
    dict(key="s50", title="50 sessions, 10 KB",
         sessions=50, messages=3000, size=10240, recipients=1, keep=False, target=1.5),
    dict(key="long", title="20 long-lived sessions, 1 KB (-d)",
         sessions=20, messages=4000, size=1024, recipients=1, keep=True, target=1.5),
    dict(key="r100", title="100 recipients per message, 1 KB",
         sessions=10, messages=200, size=1024, recipients=100, keep=False, target=1.2),
    dict(key="s200", title="200 sessions, 1 KB",
         sessions=200, messages=3000, size=1024, recipients=1, keep=False, target=4.0),
]
IDLE_LEVELS = (100, 500, 1000, 2000, 10000)
MAX_CLIENTS = 12000             # smtpd's max_clients and max_clients_per_ip in the bench
IDLE_RSS_TARGET_KIB = 32
NEW_CLIENT_TARGET_MS = 100
BURST = 1024
ISSUE17_AIOSMTPD = 1.3          # issue 17: every throughput workload >= 1.3x aiosmtpd
ISSUE17_POSTFIX = 1.2           # ... and >= 1.2x Postfix
DEPLOY_KEYS = ("bigmsg", "logcost", "idletls", "webcost")    # --only deploy: all four
BIGMSG_PEERS = ("smtpd", "aiosmtpd")

WORKLOAD_TIMEOUT = 180          # seconds: smtp-source is killed after this, the run fails
START_TIMEOUT = 20              # seconds for a peer to greet after it is started
GREETING_TIMEOUT = 10           # seconds for one 220 in the idle and burst tests
SETTLE_TIMEOUT = 180            # seconds for a peer's queue to deliver what it accepted
SETTLE_POLL = 0.05              # seconds between looks at the Maildirs and the queue


# ---------------------------------------------------------------------------------------
# What the benchmark needs


def find_tool(name):
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which(name, path=path)


def check_requirements(openssl=False):
    """Return {tool: path}; print what is missing and exit 2 if anything is."""
    missing = []
    tools = {name: find_tool(name) for name in ("smtp-source", "smtp-sink")}
    if openssl and not find_tool("openssl"):
        missing.append("`openssl` (for the idle TLS test's self-signed certificate; "
                       "Debian/Ubuntu package `openssl`)")
    if not all(tools.values()):
        absent = " and ".join(f"`{name}`" for name, path in tools.items() if not path)
        missing.append(f"{absent} (Debian/Ubuntu package `postfix`; the service need not run):\n"
                       "    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y postfix")
    for module, why in (("aiosmtpd", "the aiosmtpd peer"), ("matplotlib", "the plot")):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"Python module `{module}` ({why}):\n"
                           f"    pip install -r bench/requirements.txt")
    try:
        __import__("dns")
    except ImportError:
        missing.append("Python module `dns` (dnspython, smtpd's own dependency):\n"
                       "    pip install -r requirements.txt")
    if missing:
        print("bench: missing, nothing was installed:", file=sys.stderr)
        for item in dict.fromkeys(missing):
            print("  - " + item, file=sys.stderr)
        sys.exit(2)
    return tools


def raise_file_limit(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < needed:
        print(f"bench: warning: open files limited to {target} (hard limit); "
              f"the idle and burst tests need about {needed}", file=sys.stderr)
    return target


def raise_own_file_limit():
    """In a server's child before exec: its soft open-files limit up to the hard one (the
    10,000 idle connections need 10,000 descriptors on the server's side too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def sink_command(tools, host, port, count=False):
    """smtp-sink on host:port; with `count`, it prints mesg=N after every message."""
    sink = [tools["smtp-sink"]]
    if os.geteuid() == 0:
        sink += ["-u", "nobody"]            # smtp-sink refuses to run as root without it
    if count:
        sink.append("-c")
    return sink + ["-m", "5000", f"{host}:{port}", "4096"]


# ---------------------------------------------------------------------------------------
# Processes: every one is started in its own process group and killed at the end


_children = []


def spawn(command, log_path, cwd=None, preexec_fn=None):
    log_file = open(log_path, "wb")
    try:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True,
                                   preexec_fn=preexec_fn)
    finally:
        log_file.close()
    _children.append(process)
    return process


def stop_process(process, grace=5.0):
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    if process in _children:
        _children.remove(process)


def kill_all_children():
    for process in list(_children):
        stop_process(process, grace=2.0)


def on_signal(signum, frame):
    raise SystemExit(128 + signum)


def free_port():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def tail(path, lines=15):
    try:
        with open(path, errors="replace") as log_file:
            return "".join(log_file.readlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------
# Peers


class Peer:
    """One server under test, started fresh in its own temporary directory."""

    def __init__(self, name, tools, parent, settings=None):
        self.name = name
        self.tools = tools
        self.settings = settings or {}      # smtpd only: {section: {key: value}} over the base
        self.directory = tempfile.mkdtemp(prefix=f"{name}-", dir=parent)
        self.maildir = os.path.join(self.directory, "mail") if name in STORING_PEERS else None
        self.port = free_port()
        self.log = os.path.join(self.directory, "console.log")
        self.process = None

    def command(self):
        if self.name in SMTPD_PEERS:
            return [sys.executable, os.path.join(SMTPD_ROOT, "smtpd.py"), HOST,
                    "--port", str(self.port), "--config", self._write_smtpd_config()]
        if self.name.startswith("aiosmtpd"):
            return [sys.executable, os.path.join(BENCH, "aiosmtpd_maildir.py"),
                    "--port", str(self.port), "--maildir", self.maildir] \
                + (["--fsync"] if self.name == "aiosmtpd-fsync" else [])
        if self.name == "postfix":
            etc = postfix_peer.configure(self.directory, self.port, self.maildir,
                                         relayhost=self.settings.get("relayhost"))
            postfix_peer.prepare(etc)
            return postfix_peer.master_command(etc)
        return sink_command(self.tools, HOST, self.port)

    def _write_smtpd_config(self):
        users = os.path.join(self.directory, "users")
        with open(users, "w") as users_file:
            # smtp-source -r N: Nuser, ..., 2user, user (every one a real local mailbox)
            users_file.write("user\n" + "".join(f"{n}user\n" for n in range(1, 101)))
        # Every path absolute: smtpd may read relative ones from the config file's directory
        # or from the one it was started in.
        sections = {
            "server": {"hostname": "mail.test.ru", "max_clients": str(MAX_CLIENTS),
                       "max_clients_per_ip": str(MAX_CLIENTS), "timeout": "120",
                       "max_recipients": "100", "user": "root"},
            "domains": {"local": DOMAIN},
            "users": {"file": users},
            "storage": {"maildir": self.maildir,
                        "spool": os.path.join(self.directory, "spool")},
            "log": {"dir": os.path.join(self.directory, "logs"), "level": "WARNING"},
            # Loopback has no DNS: no SPF/DKIM/DMARC lookups, no MTA-STS for relayed mail.
            "checks": {"spf": "off", "dkim": "off", "dmarc": "off"},
            "relay": {"mta_sts": "no"},
        }
        for settings in (SMTPD_PEERS[self.name], self.settings):
            for section, keys in settings.items():
                sections.setdefault(section, {}).update(keys)
        path = os.path.join(self.directory, "smtpd.conf")
        with open(path, "w") as config_file:
            for section, keys in sections.items():
                config_file.write(f"[{section}]\n"
                                  + "".join(f"{key} = {value}\n" for key, value in keys.items()))
        return path

    def start(self):
        """Start the server and wait for its 220; on failure the process is stopped."""
        if self.name in SKIPPED:
            raise RuntimeError(f"skipped: {SKIPPED[self.name]}")
        self.process = spawn(self.command(), self.log, cwd=self.directory,
                             preexec_fn=raise_own_file_limit)
        try:
            self._wait_for_greeting()
        except BaseException:
            stop_process(self.process)
            raise
        return self

    def _wait_for_greeting(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   + tail(self.log))
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as client:
                    if read_reply(client, 2).startswith(b"220"):
                        client.sendall(b"QUIT\r\n")
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not greet on {HOST}:{self.port} within "
                           f"{START_TIMEOUT}s:\n" + tail(self.log))

    def rss_kib(self):
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stored_files(self):
        """Messages in every <maildir>/<domain>/<user>/new/."""
        count = 0
        for domain in os.scandir(self.maildir) if os.path.isdir(self.maildir) else ():
            for user in os.scandir(domain.path):
                new = os.path.join(user.path, "new")
                if os.path.isdir(new):
                    count += sum(1 for _ in os.scandir(new))
        return count

    def settle(self, expected, timeout=SETTLE_TIMEOUT):
        """Wait (bounded) until `expected` files are in the Maildirs and, for Postfix,
        its queue is empty: Postfix's 250 means "in my queue", delivery follows. Returns
        the seconds waited."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.stored_files() >= expected and (
                    self.name != "postfix" or postfix_peer.queued(self.directory) == 0):
                break
            time.sleep(SETTLE_POLL)
        return time.monotonic() - started

    def cpu_seconds(self):
        """utime + stime of the server's process tree, with its reaped children's."""
        return deploy.tree_cpu_seconds(self.process.pid)

    def stop(self):
        """Stop the server. Its files stay until the whole benchmark ends: deleting tens of
        thousands of files between runs makes ext4 slower to allocate the next run's inodes
        (it skips recently deleted ones), which would tax whichever peer runs next."""
        if self.process:
            stop_process(self.process)


# ---------------------------------------------------------------------------------------
# Measurements


def tcp_counters():
    """The kernel's TcpExt counters (what `nstat` shows): ListenOverflows counts connects
    dropped on a full accept queue; SyncookiesSent, SYNs answered statelessly because the
    SYN queue was full (when such a client's ACK meets a full accept queue it is dropped and
    never retried: the client sits connected, waiting for a 220 that does not come)."""
    with open("/proc/net/netstat") as netstat:
        lines = netstat.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return {key: int(table.get(key, 0)) for key in ("ListenOverflows", "SyncookiesSent")}
    return {"ListenOverflows": 0, "SyncookiesSent": 0}


def counters_since(before):
    now = tcp_counters()
    return {key: now[key] - before[key] for key in now}


def drive(tools, workload, peer, scale):
    """Run smtp-source once against `peer`; return a result dict."""
    messages = max(workload["sessions"], int(workload["messages"] * scale))
    command = [tools["smtp-source"], "-s", str(workload["sessions"]), "-m", str(messages),
               "-l", str(workload["size"]), "-M", "client.test", "-f", SENDER,
               "-t", RECIPIENT]
    if workload["recipients"] > 1:
        command += ["-r", str(workload["recipients"])]
    if workload["keep"]:
        command.append("-d")
    command.append(f"{HOST}:{peer.port}")
    expected = messages * workload["recipients"]
    os.sync()                                   # earlier runs' writeback is not ours to pay
    counters = tcp_counters()
    cpu_before = peer.cpu_seconds()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    _children.append(process)
    try:
        output, _ = process.communicate(timeout=WORKLOAD_TIMEOUT)
        timed_out = False
    except subprocess.TimeoutExpired:
        stop_process(process, grace=0.5)
        output, timed_out = b"", True
    elapsed = time.perf_counter() - started
    if process in _children:
        _children.remove(process)
    kernel = counters_since(counters)
    result = dict(messages=messages, seconds=elapsed, overflows=kernel["ListenOverflows"],
                  syncookies=kernel["SyncookiesSent"], rate=None, error=None)
    if timed_out:
        result["error"] = f"smtp-source killed after {WORKLOAD_TIMEOUT}s"
    elif process.returncode != 0:
        result["error"] = (f"smtp-source exited {process.returncode}: "
                           + output.decode(errors="replace").strip()[-300:])
    elif peer.maildir is not None:
        result["settle_s"] = peer.settle(expected)
        stored = peer.stored_files()
        result["stored"] = stored
        if stored != expected:
            result["error"] = f"{stored} files in the Maildirs, expected {expected}"
    result["cpu_s"] = peer.cpu_seconds() - cpu_before     # with Postfix's delivery
    result["cpu_ms_per_message"] = result["cpu_s"] / messages * 1000
    if result["error"] is None:
        result["rate"] = messages / elapsed
    return result


def idle_test(peer, levels):
    """Hold greeted idle connections; RSS per connection; time to a new client's 220."""
    rows = []
    held = []
    with socket.create_connection((HOST, peer.port), timeout=5) as warm:     # warm-up session
        read_reply(warm, 5)
        warm.sendall(b"EHLO warm.test\r\n")
        read_reply(warm, 5)
        warm.sendall(b"QUIT\r\n")
        read_reply(warm, 5)
    time.sleep(0.5)
    baseline = peer.rss_kib()
    try:
        for level in levels:
            row = dict(connections=level, error=None)
            try:
                while len(held) < level:
                    client = socket.create_connection((HOST, peer.port), timeout=GREETING_TIMEOUT)
                    held.append(client)
                    if not read_reply(client, GREETING_TIMEOUT).startswith(b"220"):
                        raise RuntimeError(f"connection {len(held)} was not greeted with 220")
            except (OSError, RuntimeError) as error:
                row["error"] = f"at {len(held)} connections: {error}"
                rows.append(row)
                break
            time.sleep(0.5)
            rss = peer.rss_kib()
            row.update(rss_kib=rss, baseline_kib=baseline,
                       per_connection_kib=(rss - baseline) / level,
                       new_client_ms=new_client_latencies(peer))
            rows.append(row)
    finally:
        for client in held:
            client.close()
    return rows


def new_client_latencies(peer, probes=5):
    """Milliseconds from connect() to a complete 220 for fresh clients (None: not served)."""
    times = []
    for _ in range(probes):
        started = time.perf_counter()
        try:
            with socket.create_connection((HOST, peer.port), timeout=5) as client:
                greeting = read_reply(client, 5)
                elapsed = (time.perf_counter() - started) * 1000
                client.sendall(b"QUIT\r\n")
                read_reply(client, 5)
            times.append(elapsed if greeting.startswith(b"220") else None)
        except OSError:
            times.append(None)
        time.sleep(0.05)
    return times


def burst_test(peer, count=BURST, deadline_s=30.0):
    """`count` simultaneous non-blocking connects; how many are greeted, how fast, and how
    many the kernel dropped from a full listen queue."""
    counters = tcp_counters()
    selector = selectors.DefaultSelector()
    sockets, greeted, refused = [], 0, 0
    started = time.perf_counter()
    last_greeting = None
    try:
        for _ in range(count):
            client = socket.socket()
            client.setblocking(False)
            sockets.append(client)
            if client.connect_ex((HOST, peer.port)) not in (0, 115):   # 115: EINPROGRESS
                refused += 1
                continue
            selector.register(client, selectors.EVENT_READ)
        pending = count - refused
        while pending and time.perf_counter() - started < deadline_s:
            for key, _ in selector.select(timeout=0.5):
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b""
                selector.unregister(key.fileobj)
                pending -= 1
                if data.startswith(b"220"):
                    greeted += 1
                    last_greeting = time.perf_counter()
                else:
                    refused += 1
    finally:
        selector.close()
        for client in sockets:
            client.close()
    kernel = counters_since(counters)
    return dict(connects=count, greeted=greeted, refused=refused,
                last_greeting_s=(last_greeting - started) if last_greeting else None,
                overflows=kernel["ListenOverflows"], syncookies=kernel["SyncookiesSent"])


# ---------------------------------------------------------------------------------------
# Reporting


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt_rate(value):
    return "FAIL" if value is None else f"{value:,.0f}"


def fmt_ratio(value):
    return "–" if value is None else f"{value:.2f}×"


def source_version():
    """The commit of the smtpd under test, and whether its files differ from it."""
    if REVISION:
        return f"commit {REVISION[1]} (`--rev {REVISION[0]}`, exported with git archive)"
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "*.py"],
                                 capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "an unknown version (no git)"
    changed = [line[3:] for line in changed if line.strip() and not line[3:].startswith("bench/")]
    if not commit:
        return "an unknown version (not a git checkout)"
    return f"commit {commit}" + (f" with local changes in {', '.join(changed)}" if changed else "")


def best_smtpd(runs, rates):
    """The smtpd configuration with the higher median rate in a workload (no failed run)."""
    candidates = [name for name in SMTPD_PEERS if rates.get(name)
                  and not any(r["error"] for r in runs.get(name, []))]
    return max(candidates, key=rates.get) if candidates else "smtpd"


def build_report(results, args, own_checks=None):
    """The report's text and its checks; `own_checks` (the checks of this run alone) marks
    the other checks as carried over from an earlier run."""
    lines = []
    say = lines.append
    say("# smtpd benchmark")
    say("")
    say(f"`{results['command']}`, {results.get('when', '?')}. Load average (1 min) at the "
        f"start {results['load'][0]:.2f}, at the end {results['load'][1] or 0:.2f}: other "
        "work on the machine shows up as noise between runs.")
    say("")
    if results.get("machine"):
        say(machine.text(results["machine"]))
        say("")
    say(lost_messages_line(results))
    say("")
    for peer, why in results.get("skipped", {}).items():
        say(f"**{peer} was skipped**: {why}.")
        say("")
    carried = results.get("carried", {})
    if carried:
        say("Sections not measured by this run are carried over from the previous "
            "results.json, each marked with the run it comes from; compare numbers across "
            "sections from different runs with care.")
        say("")
    say("smtpd fsyncs every message (file and directory) before its 250. aiosmtpd stores with "
        "`mailbox.Maildir` with its fsync turned off (the issue's peer; the targets are ratios "
        "to it); aiosmtpd-fsync is `mailbox.Maildir` as it ships, which fsyncs each message "
        "file (not the directory) inside the event loop. postfix is a private Postfix "
        "(bench/postfix_peer.py): its 250 comes once cleanup(8) has fsynced the queue file, "
        "virtual(8) then delivers to Maildir (fsyncing each file); the rate is counted to "
        "its last 250, and the run only counts once its queue is empty and every message is "
        "in the Maildir. smtp-sink stores nothing (the C ceiling). Messages/s are medians of "
        "the runs; a run that lost a message is a FAIL, not a rate.")
    say("")
    workloads = [w for w in WORKLOADS if w["key"] in results["workloads"]]
    checks = []
    if workloads:
        runs_done = max((len(runs) for w in results["workloads"].values()
                         for runs in w.values()), default=args.runs)
        say("## Throughput (messages/s, median of %d runs)" % runs_done)
        say("")
        if "workloads" in carried:
            say(f"_From an earlier run: {carried['workloads']}._")
            say("")
        say("The ratios take the better of smtpd's two configurations in each workload "
            "(smtpd: one process; smtpd-procs: `[server] processes = auto`).")
        say("")
        say("| workload | " + " | ".join(PEERS) + " | "
            + " | ".join(f"smtpd / {peer}" for peer in OTHER_PEERS)
            + " | target (/ aiosmtpd) | met |")
        say("|---|" + "---:|" * (len(PEERS) + len(OTHER_PEERS)) + "---:|:---:|")
        for workload in workloads:
            runs = results["workloads"][workload["key"]]
            rates = {peer: median([r["rate"] for r in runs.get(peer, [])]) for peer in PEERS}
            ours = best_smtpd(runs, rates)
            failed = any(r["error"] for r in runs.get(ours, []) + runs.get("aiosmtpd", []))
            ratios = {peer: rates[ours] / rates[peer] if rates[ours] and rates[peer]
                      else None for peer in OTHER_PEERS}
            met = ratios["aiosmtpd"] is not None and ratios["aiosmtpd"] >= workload["target"] \
                and not failed
            target = f"≥ {workload['target']}×"
            if workload["key"] == "s200":
                overflow = sum(r["overflows"] for r in runs.get(ours, []))
                met = met and overflow == 0
                target += ", 0 overflows"
            checks.append((f"{workload['title']}: >= {workload['target']}× aiosmtpd "
                           f"({fmt_ratio(ratios['aiosmtpd'])}, {ours})"
                           + (f", zero listen overflows ({overflow})"
                              if workload["key"] == "s200" else ""), met))
            failed_postfix = any(r["error"] for r in runs.get("postfix", []))
            checks.append((f"{workload['title']}: >= {ISSUE17_AIOSMTPD}× aiosmtpd "
                           f"({fmt_ratio(ratios['aiosmtpd'])}) and >= {ISSUE17_POSTFIX}× "
                           f"Postfix ({fmt_ratio(ratios['postfix'])}), {ours} (issue 17)",
                           ratios["aiosmtpd"] is not None and ratios["postfix"] is not None
                           and ratios["aiosmtpd"] >= ISSUE17_AIOSMTPD
                           and ratios["postfix"] >= ISSUE17_POSTFIX
                           and not failed and not failed_postfix))
            say(f"| {workload['title']} | "
                + " | ".join(fmt_rate(rates[peer]) for peer in PEERS) + " | "
                + " | ".join(fmt_ratio(ratios[peer]) for peer in OTHER_PEERS)
                + f" | {target} | {'yes' if met else '**no**'} |")
        say("")
        say("Each run (messages/s; listen-queue overflows in brackets when not zero; for "
            "postfix, in parentheses, the time from its last 250 until its queue was empty "
            "and every message in the Maildir):")
        say("")
        say("| workload | messages × recipients | " + " | ".join(PEERS) + " |")
        say("|---|---:|" + "---|" * len(PEERS))
        for workload in workloads:
            runs = results["workloads"][workload["key"]]
            cells = []
            for peer in PEERS:
                parts = []
                for r in runs.get(peer, []):
                    text = fmt_rate(r["rate"])
                    if peer == "postfix" and r.get("settle_s") is not None:
                        text += f" (+{r['settle_s']:.1f} s)"      # delivery after the 250s
                    if r["overflows"]:
                        text += f" [{r['overflows']}]"
                    parts.append(text)
                cells.append(", ".join(parts))
            messages = runs["smtpd"][0]["messages"] if runs.get("smtpd") else "?"
            say(f"| {workload['title']} | {messages} × {workload['recipients']} | "
                + " | ".join(cells) + " |")
        errors = [(w["title"], peer, r["error"]) for w in workloads
                  for peer in PEERS for r in results["workloads"][w["key"]].get(peer, [])
                  if r["error"]]
        if errors:
            say("")
            say("Failures:")
            say("")
            for title, peer, error in errors:
                say(f"- {title}, {peer}: {error}")
        say("")
    if results.get("idle"):
        say("## Idle connections (each greeted with 220, then held)")
        say("")
        if "idle" in carried:
            say(f"_From an earlier run: {carried['idle']}._")
            say("")
        say("| peer | connections | server RSS | RSS per connection | "
            "new client's 220 (median / max of 5) |")
        say("|---|---:|---:|---:|---:|")
        for peer, rows in results["idle"].items():
            for row in rows:
                if row["error"]:
                    say(f"| {peer} | {row['connections']} | FAIL: {row['error']} | | |")
                    if peer == "smtpd":
                        checks.append((f"{row['connections']} idle connections held", False))
                    continue
                latencies = row["new_client_ms"]
                served = [t for t in latencies if t is not None]
                latency = (f"{statistics.median(served):.1f} / {max(served):.1f} ms"
                           if len(served) == len(latencies) else
                           f"{len(latencies) - len(served)} of {len(latencies)} not served")
                say(f"| {peer} | {row['connections']} | {row['rss_kib'] / 1024:.1f} MiB | "
                    f"{row['per_connection_kib']:.1f} KiB | {latency} |")
                if peer == "smtpd" and row["connections"] == max(IDLE_LEVELS):
                    checks.append((f"{row['connections']} idle connections: <= "
                                   f"{IDLE_RSS_TARGET_KIB} KiB each "
                                   f"({row['per_connection_kib']:.1f})",
                                   row["per_connection_kib"] <= IDLE_RSS_TARGET_KIB))
                    checks.append((f"a new client's 220 within {NEW_CLIENT_TARGET_MS} ms "
                                   f"while {row['connections']} are held "
                                   f"(max {max(served) if served else float('nan'):.1f} ms)",
                                   len(served) == len(latencies)
                                   and max(served) <= NEW_CLIENT_TARGET_MS))
        say("")
        say("RSS per connection = (RSS with the connections held − RSS after one warm-up "
            "session) / connections.")
        say("")
    if results.get("burst"):
        say(f"## A burst of {BURST} simultaneous connects")
        say("")
        if "burst" in carried:
            say(f"_From an earlier run: {carried['burst']}._")
            say("")
        say("| peer | greeted | refused or closed | still waiting after 30 s | last 220 after "
            "| listen overflows | SYN cookies sent |")
        say("|---|---:|---:|---:|---:|---:|---:|")
        for peer, row in results["burst"].items():
            after = "–" if row["last_greeting_s"] is None else f"{row['last_greeting_s']:.2f} s"
            waiting = row["connects"] - row["greeted"] - row["refused"]
            say(f"| {peer} | {row['greeted']} | {row['refused']} | {waiting} | {after} | "
                f"{row['overflows']} | {row['syncookies']} |")
            if peer == "smtpd":
                checks.append((f"burst of {BURST} connects: all greeted, zero listen overflows",
                               row["greeted"] == BURST and row["overflows"] == 0))
        say("")
        say("Listen overflows and SYN cookies are the kernel's TcpExt counters (system-wide) "
            "over the test. A connect dropped on a full queue costs the client a 1 s "
            "retransmission; one answered with a SYN cookie whose ACK is then dropped leaves a "
            "client that believes it is connected and waits for a 220 that never comes (SMTP "
            "servers speak first, so nothing retries it): those are the 'still waiting'.")
        say("")
    for section, module in (("relay", relaydrain), ("scaling", scaling)):
        if results.get(section) and section in carried:
            say(f"_The next section is from an earlier run: {carried[section]}._")
            say("")
        module.report(results.get(section), say, checks)
    deploy.report(results.get("deploy"), say, checks,
                  {key.split(".", 1)[1]: f"_From an earlier run: {origin}._"
                   for key, origin in carried.items() if key.startswith("deploy.")})
    if checks:
        say("## Targets (issue 5 unless noted)")
        say("")
        for text, met in checks:
            earlier = own_checks is not None and (text, met) not in own_checks
            say(f"- [{'x' if met else ' '}] {text}" + (" (an earlier run)" if earlier else ""))
        say("")
    return "\n".join(lines), checks


def lost_messages_line(results):
    """The report's statement on what was counted on disk: every run of every storing peer
    (throughput, scaling, big messages) compared its accepted messages with the files."""
    lost = []
    for key, peers in results.get("workloads", {}).items():
        for peer, runs in peers.items():
            lost += [f"{key} {peer}" for run in runs if "files in the Maildirs" in
                     (run.get("error") or "")]
    for peer, rows in results.get("scaling", {}).get("points", {}).items():
        lost += [f"scaling {peer} {row['sessions']}" for row in rows
                 if "files in the Maildirs" in (row.get("error") or "")]
    if lost:
        return ("**Not every accepted message was found on disk**: " + ", ".join(lost)
                + " (those runs are FAILs).")
    return ("Every accepted message was counted on disk: after each run the files in every "
            "`<maildir>/test.ru/<user>/new/` were counted against messages × recipients "
            "(for the relay drain, the sink's own counter against the messages).")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in WORKLOADS if w["key"] in results["workloads"]]
    if not workloads:
        return
    figure, axes = plt.subplots(figsize=(11, 5.5))
    width = 0.8 / len(PEERS)
    colours = {"smtpd": "#1f77b4", "smtpd-procs": "#17becf", "aiosmtpd": "#ff7f0e", "aiosmtpd-fsync": "#ffbb78",
               "postfix": "#2ca02c", "smtp-sink": "#9e9e9e"}
    for index, peer in enumerate(PEERS):
        values = [median([r["rate"] for r in results["workloads"][w["key"]].get(peer, [])])
                  or 0 for w in workloads]
        positions = [n + (index - (len(PEERS) - 1) / 2) * width for n in range(len(workloads))]
        bars = axes.bar(positions, values, width, label=peer, color=colours[peer])
        for bar, value in zip(bars, values):
            axes.annotate(f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, value or 1),
                          ha="center", va="bottom", fontsize=7)
    axes.set_yscale("log")
    axes.set_ylabel("messages/s (log scale, median)")
    axes.set_xticks(range(len(workloads)))
    axes.set_xticklabels([w["title"].replace(", ", ",\n", 1) for w in workloads], fontsize=8)
    axes.set_title("smtpd (fsync file + directory) vs aiosmtpd-Maildir (no fsync / stock "
                   "file fsync) vs Postfix (as it ships) vs smtp-sink (stores nothing)",
                   fontsize=10)
    axes.legend()
    axes.grid(axis="y", which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------


def run_deploy(tools, work, selected, quick, into):
    """The deployment section (deploy.py): each measurement starts and stops its own peers."""
    def start(name, settings):
        return Peer(name, tools, work, settings if name in SMTPD_PEERS else None).start()

    if "bigmsg" in selected:
        rows = into["bigmsg"] = {}
        for name in BIGMSG_PEERS:
            try:
                row = deploy.big_messages(start, name)
            except RuntimeError as error:       # the peer did not start
                row = dict(peer=name, sessions=deploy.BIG_SESSIONS,
                           message_octets=deploy.BIG_SIZE, error=deploy.summary(error))
            rows[name] = row
            print(f"bigmsg  {name:<9} " + (
                f"RSS before {row['rss_before_kib'] / 1024:.0f} MiB, peak "
                f"{row['peak_kib'] / 1024:.0f} MiB, {deploy.HOLD_AFTER:.0f} s after "
                f"{row['rss_after_kib'] / 1024:.0f} MiB; {row['stored']} stored in "
                f"{row['seconds']:.1f} s" if row.get("peak_kib") is not None else "")
                + (f"  FAILED: {row['error']}" if row["error"] else ""), flush=True)
    if "logcost" in selected:
        noops = deploy.NOOPS_QUICK if quick else deploy.NOOPS
        try:
            rows = deploy.log_cost(start, noops)
        except RuntimeError as error:
            rows = [dict(level=level, noops=noops, error=deploy.summary(error))
                    for level in ("INFO", "WARNING")]
        into["logcost"] = rows
        for row in rows:
            print(f"logcost {row['level']:<9} " + (
                f"{row['cpu_s']:.2f} s CPU for {noops:,} NOOPs "
                f"({row['us_per_command']:.2f} µs each), console "
                f"{row['console_octets'] / 1e6:.1f} MB, log file "
                f"{row['log_file_octets'] / 1e6:.1f} MB" if row.get("cpu_s") is not None
                else "") + (f"  FAILED: {row['error']}" if row["error"] else ""), flush=True)
    if "webcost" in selected:
        noops = deploy.NOOPS_QUICK if quick else deploy.NOOPS
        rows = deploy.web_cost(start, noops)
        into["webcost"] = rows
        for row in rows:
            print(f"webcost {row['mode']:<9} " + (
                f"{row['cpu_s']:.2f} s CPU for {noops:,} NOOPs ({row['us_per_command']:.2f} µs "
                f"each; runs: {', '.join(f'{cpu:.2f}' for cpu in row['cpu_samples_s'])})"
                if row.get("cpu_s") is not None else "")
                + (f"  FAILED: {row['error']}" if row["error"] else ""), flush=True)
    if "idletls" in selected:
        try:
            rows = deploy.idle_tls(start, work)
        except RuntimeError as error:
            rows = [dict(mode=mode, sessions=deploy.TLS_SESSIONS, window_s=deploy.IDLE_WINDOW,
                         error=deploy.summary(error)) for mode in ("plain", "tls")]
        into["idletls"] = rows
        for row in rows:
            print(f"idletls {row['mode']:<9} " + (
                f"{row['sessions']} idle sessions: {row['cpu_percent']:.1f}% CPU, "
                f"{row['wakeups_per_s']:,.0f} wake-ups/s" if row.get("cpu_percent") is not None
                else "") + (f"  FAILED: {row['error']}" if row["error"] else ""), flush=True)


def export_revision(rev, directory):
    """git archive REV into `directory` (the working tree is not touched)."""
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", f"{rev}^{{commit}}"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            raise RuntimeError(commit.stderr.strip() or "not a revision")
        os.makedirs(directory)
        archive = subprocess.Popen(["git", "-C", ROOT, "archive", commit.stdout.strip()],
                                   stdout=subprocess.PIPE)
        extract = subprocess.run(["tar", "-x", "-C", directory], stdin=archive.stdout,
                                 timeout=60)
        archive.stdout.close()
        if archive.wait(60) != 0 or extract.returncode != 0:
            raise RuntimeError("git archive | tar -x failed")
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(str(error)) from None
    global SMTPD_ROOT, REVISION
    SMTPD_ROOT, REVISION = directory, (rev, commit.stdout.strip())


def command_line(args):
    parts = ["python bench/run.py"]
    if args.quick:
        parts.append("--quick")
    parts.append(f"--runs {args.runs}")
    if args.only:
        parts.append(f"--only {args.only}")
    if args.rev:
        parts.append(f"--rev {args.rev}")
    return " ".join(parts)


SECTIONS = ("workloads", "idle", "burst", "deploy", "relay", "scaling")


def carry_over(results, json_path, md_path):
    """Keep the sections this (--only) run did not measure from the previous results.json,
    each labelled with the run it was measured in (results["carried"])."""
    try:
        with open(json_path) as json_file:
            previous = json.load(json_file)
    except (OSError, ValueError):
        return
    origin = previous.get("measured") or earlier_run_from_report(md_path)
    carried = results.setdefault("carried", {})
    for section in SECTIONS:
        if section == "deploy":                 # its parts are carried one by one
            for key in DEPLOY_KEYS:
                if not results["deploy"].get(key) and previous.get("deploy", {}).get(key):
                    results["deploy"][key] = previous["deploy"][key]
                    carried[f"deploy.{key}"] = \
                        previous.get("carried", {}).get(f"deploy.{key}", origin)
            continue
        if results.get(section) or not previous.get(section):
            continue
        results[section] = previous[section]
        carried[section] = previous.get("carried", {}).get(section, origin)


def earlier_run_from_report(md_path):
    """"`python bench/run.py ...` on DATE, smtpd at ..." from a results.md that predates
    results.json's "measured"."""
    import re
    try:
        with open(md_path) as report_file:
            text = report_file.read(4000)
    except OSError:
        return "an earlier run"
    match = re.search(r"^(`python bench/run\.py[^`]*`) on (\d{4}-\d\d-\d\d \d\d:\d\d):"
                      r".*?smtpd at ([^.]+)\.", text, re.M)
    return f"{match[1]} on {match[2]}, smtpd at {match[3]}" if match else "an earlier run"


ALIASES = {"deploy": set(DEPLOY_KEYS), "memory": {"bigmsg", "idle"}}


def parse_arguments():
    parser = argparse.ArgumentParser(description="Benchmark smtpd against aiosmtpd, Postfix "
                                     "and smtp-sink on 127.0.0.1 (see bench/README.md).")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: a fifth of the messages, fewer idle levels")
    parser.add_argument("--runs", type=int, default=3, help="runs per workload (default 3)")
    parser.add_argument("--out", default=None,
                        help="where RESULTS.md, scaling.svg, results.png, results.json go "
                             "(default: RESULTS.md and scaling.svg in bench/, the rest in "
                             "bench/results/)")
    parser.add_argument("--only", default="",
                        help="comma-separated subset: " + ",".join(w["key"] for w in WORKLOADS)
                        + ",idle,burst,relay,scaling," + ",".join(DEPLOY_KEYS)
                        + " (deploy: the last four; memory: bigmsg,idle)")
    parser.add_argument("--rev", metavar="REV",
                        help="measure smtpd as committed at git revision REV (exported to "
                             "the temporary directory) instead of the working tree")
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: rewrite RESULTS.md (and the plots) from "
                             "results.json")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    keys = {w["key"] for w in WORKLOADS} | {"idle", "burst", "relay", "scaling"} \
        | set(DEPLOY_KEYS)
    selected = set(filter(None, args.only.split(","))) or set(keys)
    for alias, members in ALIASES.items():
        if alias in selected:
            selected = (selected - {alias}) | members
    unknown = selected - keys
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    return args, selected


def output_paths(args):
    """{what: path}: RESULTS.md and scaling.svg in bench/ (or --out), the rest beside."""
    data = args.out or os.path.join(BENCH, "results")
    top = args.out or BENCH
    os.makedirs(data, exist_ok=True)
    return {"report": os.path.join(top, "RESULTS.md"), "svg": os.path.join(top, "scaling.svg"),
            "json": os.path.join(data, "results.json"), "png": os.path.join(data, "results.png")}


def write_outputs(results, args, paths, own_checks=None):
    report, checks = build_report(results, args, own_checks)
    if results.get("total_s") is not None:
        report += f"\nTotal benchmark time: {results['total_s']:.0f} s.\n"
    with open(paths["report"], "w") as report_file:
        report_file.write(report)
    with open(paths["json"], "w") as json_file:
        json.dump(results, json_file, indent=1)
    plot(results, paths["png"])
    scaling.plot(results.get("scaling"), paths["svg"])
    print()
    print(report)
    print(f"written: {paths['report']}, {paths['svg']}, {paths['json']}, {paths['png']}")
    return checks


def rewrite_report(args, paths):
    try:
        with open(paths["json"]) as json_file:
            results = json.load(json_file)
    except (OSError, ValueError) as error:
        print(f"bench: --report: cannot read {paths['json']}: {error}", file=sys.stderr)
        return 2
    checks = write_outputs(results, args, paths)
    return 0 if all(met for _, met in checks) else 1


def run_workloads(tools, work, selected, runs, scale, into):
    for run in range(runs):
        turn = run % len(PEERS)
        order = PEERS[turn:] + PEERS[:turn]       # no peer always goes first
        for workload in WORKLOADS:
            if workload["key"] not in selected:
                continue
            for name in order:
                result = drive_fresh(tools, work, name, workload, scale)
                into.setdefault(workload["key"], {}).setdefault(name, []).append(result)
                extra = f" [{result['overflows']} listen overflows]" \
                    if result["overflows"] else ""
                print(f"run {run + 1}/{runs}  {workload['title']:<36} {name:<14} "
                      + (f"{result['rate']:8,.0f} msg/s  ({result['messages']} in "
                         f"{result['seconds']:.2f}s){extra}" if result["rate"] else
                         f"FAILED: {result['error']}"), flush=True)


def drive_fresh(tools, work, name, workload, scale, settings=None):
    """One smtp-source run against a peer started for it (and stopped after)."""
    peer = Peer(name, tools, work, settings)
    try:
        peer.start()
        return drive(tools, workload, peer, scale)
    except RuntimeError as error:
        return dict(messages=0, seconds=0, overflows=0, syncookies=0, rate=None,
                    error=str(error).splitlines()[0])
    finally:
        peer.stop()


def run_idle_and_burst(tools, work, selected, levels, results):
    if "idle" in selected:
        for name in IDLE_PEERS:
            peer = Peer(name, tools, work)
            try:
                peer.start()
                rows = idle_test(peer, levels)
            finally:
                peer.stop()
            results["idle"][name] = rows
            for row in rows:
                print(f"idle  {name:<14} {row['connections']:5} connections: " + (
                    f"{row['per_connection_kib']:.1f} KiB each, new client 220 in "
                    f"{', '.join('-' if t is None else f'{t:.1f}' for t in row['new_client_ms'])}"
                    " ms" if not row["error"] else f"FAILED: {row['error']}"), flush=True)
    if "burst" in selected:
        for name in BURST_PEERS:
            peer = Peer(name, tools, work)
            try:
                peer.start()
                row = burst_test(peer)
            except RuntimeError as error:
                print(f"burst {name:<14} FAILED: {str(error).splitlines()[0]}", flush=True)
                continue
            finally:
                peer.stop()
            results["burst"][name] = row
            print(f"burst {name:<14} {row['greeted']}/{row['connects']} greeted, "
                  f"{row['overflows']} listen overflows", flush=True)


def start_sink(tools, work):
    """smtp-sink -c on 127.0.0.2:<free port>, greeting; returns (process, port, log)."""
    with socket.socket() as probe:
        probe.bind((relaydrain.SINK_HOST, 0))
        port = probe.getsockname()[1]
    log = tempfile.mkstemp(prefix="sink-", suffix=".log", dir=work)[1]
    process = spawn(sink_command(tools, relaydrain.SINK_HOST, port, count=True), log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((relaydrain.SINK_HOST, port), timeout=2) as client:
                if read_reply(client, 2).startswith(b"220"):
                    client.sendall(b"QUIT\r\n")
                    return process, port, log
        except OSError:
            time.sleep(0.05)
    stop_process(process)
    raise RuntimeError(f"smtp-sink did not greet on {relaydrain.SINK_HOST}:{port}")


def run_relay(tools, work, quick, results):
    messages = relaydrain.MESSAGES_QUICK if quick else relaydrain.MESSAGES
    size = next(w["size"] for w in WORKLOADS if w["key"] == "s200")
    rows = relaydrain.measure(lambda name, settings: Peer(name, tools, work, settings).start(),
                              lambda: start_sink(tools, work), stop_process, tools,
                              messages, size)
    results["relay"] = rows
    for name, row in rows.items():
        print(f"relay {name:<9} " + (f"{row['messages']} drained in {row['drain_s']:.1f} s "
                                     f"({row['rate']:,.0f} msg/s)" if not row["error"]
                                     else f"FAILED: {row['error']}"), flush=True)


def run_scaling(tools, work, quick, results):
    def drive_point(name, sessions, messages, settings):
        workload = dict(sessions=sessions, messages=messages, size=scaling.SIZE,
                        recipients=1, keep=False)
        return drive_fresh(tools, work, name, workload, 1.0, settings)

    results["scaling"] = scaling.measure(drive_point, quick)


def main():
    args, selected = parse_arguments()
    paths = output_paths(args)
    if args.report:
        return rewrite_report(args, paths)
    tools = check_requirements(openssl="idletls" in selected)
    reason = postfix_peer.unavailable()
    if reason:
        SKIPPED["postfix"] = reason
        print(f"bench: the Postfix peer is skipped: {reason}", file=sys.stderr)
    raise_file_limit(max(IDLE_LEVELS) + 2 * BURST + 2000)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(kill_all_children)
    work = tempfile.mkdtemp(prefix="smtpd-bench-")
    os.chmod(work, 0o755)           # Postfix's processes run as `postfix` and must reach theirs
    if args.rev:
        try:
            export_revision(args.rev, os.path.join(work, "smtpd-src"))
        except RuntimeError as error:
            shutil.rmtree(work, ignore_errors=True)
            print(f"bench: --rev {args.rev}: {error}", file=sys.stderr)
            return 2
    facts = machine.describe(work, ROOT)
    if REVISION:
        facts["commit"] = {"head": f"{REVISION[1]} (--rev {REVISION[0]})", "dirty": []}
    scale = 0.2 if args.quick else 1.0
    levels = (100, 2000, 10000) if args.quick else IDLE_LEVELS
    results = {"workloads": {}, "idle": {}, "burst": {}, "deploy": {},
               "load": [os.getloadavg()[0], None], "command": command_line(args),
               "machine": facts, "skipped": dict(SKIPPED)}
    started = time.monotonic()
    try:
        run_workloads(tools, work, selected, args.runs, scale, results["workloads"])
        run_idle_and_burst(tools, work, selected, levels, results)
        if "relay" in selected:
            run_relay(tools, work, args.quick, results)
        if "scaling" in selected:
            run_scaling(tools, work, args.quick, results)
        run_deploy(tools, work, selected, args.quick, results["deploy"])
    finally:
        kill_all_children()
        shutil.rmtree(work, ignore_errors=True)

    results["load"][1] = os.getloadavg()[0]
    results["when"] = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    results["measured"] = f"`{results['command']}` on {results['when']}, smtpd at " \
        f"{source_version()}"
    results["total_s"] = time.monotonic() - started
    _, own_checks = build_report(results, args)    # the exit status: this run's
    if args.only:
        carry_over(results, paths["json"], paths["report"])
    write_outputs(results, args, paths, own_checks)
    return 0 if all(met for _, met in own_checks) else 1


if __name__ == "__main__":
    sys.exit(main())
