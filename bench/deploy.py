"""The deployment measurements of bench/run.py (issue 11; `--only deploy`): what the server
costs when it is run as users run it, rather than how fast it moves mail.

- bigmsg: peak RSS while 50 sessions stream a 10 MiB message each at the same time, and the
  RSS that stays afterwards (smtpd against aiosmtpd, the same load);
- logcost: server CPU seconds for N pipelined NOOPs on one session with the dialogue log on
  (`[log] level = INFO`, to the log file and the console) and off (`WARNING`);
- idletls: the server's CPU while 500 sessions that did STARTTLS sit idle, against 500 plain
  idle sessions;
- webcost: server CPU for N pipelined NOOPs with the web view off and on with no page open
  (issue 16: watching costs nothing when nobody watches).

Everything is read from /proc of the server's process tree (the server and any process it
forks): VmRSS from status, utime + stime from stat, context switches from each thread's
status, and write() bytes (wchar) from io. The functions here get a `start(name, settings)`
that returns a started bench Peer (run.py's), and stop every peer they start.
"""
import os
import select
import socket
import ssl
import subprocess
import threading
import time

from tests.wire import read_reply       # run.py puts the repository on sys.path

HOST = "127.0.0.1"
SENDER = "bench@test.ru"
RECIPIENT = "user@test.ru"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

BIG_SESSIONS = 50
BIG_SIZE = 10 << 20             # octets of message text per session (10 MiB), plus headers
BIG_MAX_MESSAGE_SIZE = 20000000  # smtpd's [server] max_message_size for this test
RSS_TARGET_MIB = 200            # issue 17: peak RSS for 50 x 10 MB
SAMPLE_EVERY = 0.02             # seconds between RSS samples
HOLD_AFTER = 2.0                # seconds after the last 250 before the "after" RSS
BIG_TIMEOUT = 300               # seconds for the whole transfer

NOOPS = 1_000_000
NOOPS_QUICK = 200_000
NOOP_BATCH = 1000               # NOOPs per send()
NOOP_TIMEOUT = 300              # seconds for all the replies

WEB_ROUNDS = 3                  # runs of the web-view measurement, off and on each

TLS_SESSIONS = 500
IDLE_WINDOW = 10.0              # seconds of wall time the idle CPU is measured over
IDLE_SETTLE = 2.0               # seconds after the last session is set up, before measuring
IO_TIMEOUT = 60                 # seconds for any one reply in these tests


# ---------------------------------------------------------------------------------------
# /proc of the server's process tree


def process_tree(pid, limit=1000):
    """pid and its descendants (from /proc/<pid>/task/<tid>/children)."""
    pids, todo = [], [pid]
    while todo and len(pids) < limit:
        current = todo.pop()
        pids.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as children:
                    todo += [int(child) for child in children.read().split()]
            except OSError:
                pass
    return pids


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()


def cpu_seconds(pids, split=False):
    """utime + stime of every process (all its threads), in seconds; with `split`,
    (user, system)."""
    user = system = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)      # fields[0] is field 3 (state)
        except OSError:
            continue
        user, system = user + int(fields[11]), system + int(fields[12])  # utime 14, stime 15
    if split:
        return user / CLOCK_TICKS, system / CLOCK_TICKS
    return (user + system) / CLOCK_TICKS


def tree_cpu_seconds(pid):
    """utime + stime + cutime + cstime of pid and its live descendants: a child that has
    exited and been reaped (a Postfix smtpd(8) after 100 uses) is in its parent's c-times."""
    ticks = 0
    for member in process_tree(pid):
        try:
            fields = _stat_fields(member)
        except OSError:
            continue
        ticks += sum(int(field) for field in fields[11:15])     # fields 14-17 of stat(5)
    return ticks / CLOCK_TICKS


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as statm:       # cheaper than status; same value
                total += int(statm.read().split()[1]) * PAGE_KIB
        except OSError:
            pass
    return total


def context_switches(pids):
    """Voluntary + involuntary context switches of every thread: each wake-up of an idle
    thread (a poll timeout, say) is one."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/status") as status:
                    for line in status:
                        if "ctxt_switches:" in line:
                            total += int(line.split()[1])
            except (OSError, ValueError):
                pass
    return total


def threads(pids):
    count = 0
    for pid in pids:
        try:
            count += int(_stat_fields(pid)[17])             # num_threads (20)
        except (OSError, IndexError, ValueError):
            pass
    return count


def written_octets(pids):
    """wchar: octets passed to write() and friends (files, the console, pipes; not send())."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as io:
                for line in io:
                    if line.startswith("wchar:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class RssSampler:
    """A thread that reads the server tree's RSS every `every` seconds until stopped."""

    def __init__(self, pid, every=SAMPLE_EVERY):
        self.pid = pid
        self.every = every
        self.samples = []               # (seconds since start, KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._started = time.monotonic()

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        pids, refreshed = process_tree(self.pid), time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now - refreshed > 0.5:               # a forked worker shows up within 0.5 s
                pids, refreshed = process_tree(self.pid), now
            self.samples.append((now - self._started, rss_kib(pids)))
            self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self._thread.join(5)

    def peak(self):
        return max((kib for _, kib in self.samples), default=0)

    def intervals(self):
        """The median time between samples (the sampler's real resolution)."""
        gaps = sorted(b[0] - a[0] for a, b in zip(self.samples, self.samples[1:]))
        return gaps[len(gaps) // 2] if gaps else None


# ---------------------------------------------------------------------------------------
# A small SMTP client


def command(sock, line, code):
    """Send one command line (b'' to send nothing) and check its reply's code."""
    if line:
        sock.sendall(line + b"\r\n")
    reply = read_reply(sock, IO_TIMEOUT)
    if not reply.startswith(code):
        sent = line.decode(errors="replace") or "(connect)"
        raise RuntimeError(f"{sent}: expected {code.decode()}, got "
                           f"{reply.decode(errors='replace').strip()[:120]!r}")
    return reply


def open_session(port, tls_context=None):
    """Connect, read the 220, EHLO; with a TLS context also STARTTLS and EHLO again."""
    sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
    try:
        command(sock, b"", b"220")
        command(sock, b"EHLO client.test", b"250")
        if tls_context is not None:
            command(sock, b"STARTTLS", b"220")
            sock = tls_context.wrap_socket(sock, server_hostname="mail.test.ru")
            command(sock, b"EHLO client.test", b"250")
    except BaseException:
        sock.close()
        raise
    return sock


def summary(error):
    """One line for an error: its first line and, if longer, its last (for a peer that did
    not start: 'smtpd exited with 1: ModuleNotFoundError: ...')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] + (" " + lines[-1] if len(lines) > 1 else "") if lines else repr(error)


def close_quietly(sock):
    try:
        sock.close()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------
# 1. Peak RSS for 50 concurrent 10 MB messages


def message_text(size=BIG_SIZE):
    """`size` octets of 78-octet lines (none starts with a dot), ending with CRLF."""
    line = b"".join(bytes([48 + (n % 43)]) for n in range(76)) + b"\r\n"
    count, rest = divmod(size, len(line))
    if rest == 1:                       # a last line needs room for its CRLF
        count, rest = count - 1, rest + len(line)
    return line * count + (b"x" * (rest - 2) + b"\r\n" if rest else b"")


def big_messages(start, name, sessions=BIG_SESSIONS, size=BIG_SIZE):
    """`sessions` sessions each reach 354, then all stream `size` octets at once."""
    settings = {"server": {"max_message_size": str(BIG_MAX_MESSAGE_SIZE)}} \
        if name == "smtpd" else {}
    body = message_text(size)
    lf_size = len(body) - body.count(b"\r\n")   # the text once stored with LF line ends
    row = dict(peer=name, sessions=sessions, message_octets=size, error=None)
    peer = start(name, settings)
    sockets, replies, errors, sampler = [], {}, [], None
    try:
        pid = peer.process.pid
        time.sleep(0.5)
        row["rss_before_kib"] = rss_kib(process_tree(pid))
        for index in range(sessions):
            sock = open_session(peer.port)
            sockets.append(sock)
            command(sock, f"MAIL FROM:<{SENDER}>".encode(), b"250")
            command(sock, f"RCPT TO:<{RECIPIENT}>".encode(), b"250")
            command(sock, b"DATA", b"354")
        row["rss_at_354_kib"] = rss_kib(process_tree(pid))
        os.sync()                               # earlier writeback is not this test's
        sampler = RssSampler(pid).start()
        go = threading.Event()

        def stream(index, sock):
            try:
                go.wait(BIG_TIMEOUT)
                header = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
                          f"Subject: 10 MiB, session {index}\r\n"
                          f"Message-ID: <{index}.{pid}@bench.test>\r\n\r\n").encode()
                sock.settimeout(IO_TIMEOUT)
                sock.sendall(header)
                sock.sendall(body)
                sock.sendall(b".\r\n")
                reply = read_reply(sock, BIG_TIMEOUT)
                replies[index] = (time.monotonic(), reply)
            except (OSError, RuntimeError) as error:
                errors.append(f"session {index}: {error}")

        workers = [threading.Thread(target=stream, args=(index, sock), daemon=True)
                   for index, sock in enumerate(sockets)]
        for worker in workers:
            worker.start()
        started = time.monotonic()
        go.set()
        deadline = started + BIG_TIMEOUT
        for worker in workers:
            worker.join(max(0.1, deadline - time.monotonic()))
        if any(worker.is_alive() for worker in workers):
            errors.append(f"not every session finished within {BIG_TIMEOUT}s")
            for sock in sockets:                # unblocks the stragglers
                close_quietly(sock)
        accepted = [at for at, reply in replies.values() if reply.startswith(b"250")]
        refused = [reply.decode(errors="replace").strip()[:100]
                   for _, reply in replies.values() if not reply.startswith(b"250")]
        last = max(accepted, default=time.monotonic())
        time.sleep(max(0.0, last + HOLD_AFTER - time.monotonic()))
        pids = process_tree(pid)
        row["rss_after_kib"] = rss_kib(pids)    # 2 s after the last 250, sessions still open
        for sock in sockets:
            try:
                sock.settimeout(5)
                sock.sendall(b"QUIT\r\n")
                read_reply(sock, 5)
            except OSError:
                pass
            close_quietly(sock)
        time.sleep(HOLD_AFTER)
        row["rss_after_close_kib"] = rss_kib(process_tree(pid))
        sampler.stop()
        row.update(peak_kib=max(sampler.peak(), row["rss_after_kib"]),
                   samples=len(sampler.samples), sample_interval_s=sampler.intervals(),
                   seconds=last - started, accepted=len(accepted),
                   peak_at_s=max(sampler.samples, key=lambda sample: sample[1],
                                 default=(None, 0))[0])
        stored, octets = peer.stored_files(), stored_octets(peer.maildir)
        row.update(stored=stored, stored_octets=octets)
        if refused:
            errors.append(f"{len(refused)} refused, e.g. {refused[0]!r}")
        if stored != sessions:
            errors.append(f"{stored} files in the Maildir new/, expected {sessions}")
        elif octets < sessions * lf_size:       # Maildir files may have LF line ends
            errors.append(f"{octets} octets stored, expected at least {sessions * lf_size}")
        if errors:
            row["error"] = "; ".join(errors[:3])
    except (OSError, RuntimeError) as error:
        row["error"] = f"after {len(sockets)} sessions: {summary(error)}"
    finally:
        if sampler is not None:
            sampler.stop()
        for sock in sockets:
            close_quietly(sock)
        peer.stop()
    return row


def stored_octets(maildir):
    total = 0
    for directory, _, files in os.walk(maildir):
        if os.path.basename(directory) == "new":
            total += sum(os.path.getsize(os.path.join(directory, name)) for name in files)
    return total


# ---------------------------------------------------------------------------------------
# 2. The cost of the dialogue log


def log_cost(start, noops=NOOPS, batch=NOOP_BATCH):
    """CPU for `noops` pipelined NOOPs on one session, dialogue log on (INFO) and off."""
    rows = []
    for level in ("INFO", "WARNING"):
        row = dict(level=level, noops=noops, error=None)
        peer = sock = None
        try:
            peer = start("smtpd", {"log": {"level": level}})
            pid = peer.process.pid
            sock = open_session(peer.port)
            time.sleep(0.3)
            pids = process_tree(pid)
            console_before = os.path.getsize(peer.log)
            log_before = log_octets(peer.directory)
            written_before = written_octets(pids)
            (user_before, system_before), started = cpu_seconds(pids, True), time.monotonic()
            counted = pipeline_noops(sock, noops, batch)
            wall = time.monotonic() - started
            time.sleep(0.3)                     # anything still buffered gets written
            pids = process_tree(pid)
            user, system = cpu_seconds(pids, True)
            user, system = user - user_before, system - system_before
            cpu = user + system
            written = written_octets(pids) - written_before
            console = os.path.getsize(peer.log) - console_before
            on_disk, log_files = log_octets(peer.directory)
            row.update(cpu_s=cpu, user_s=user, system_s=system, wall_s=wall,
                       us_per_command=cpu / noops * 1e6,
                       console_octets=console, written_octets=written,
                       log_file_octets=max(0, written - console),
                       log_on_disk_octets=on_disk - log_before[0], log_files=log_files)
            if counted != noops:
                row["error"] = f"{counted} replies, expected {noops}"
            try:
                command(sock, b"QUIT", b"221")
            except (OSError, RuntimeError):
                pass
        except (OSError, RuntimeError) as error:
            row["error"] = summary(error)
        finally:
            if sock is not None:
                close_quietly(sock)
            if peer is not None:
                peer.stop()
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# 4. The web view with nobody watching (issue 16)


def web_cost(start, noops=NOOPS, batch=NOOP_BATCH, rounds=WEB_ROUNDS):
    """Server CPU for `noops` pipelined NOOPs with `[web] listen` empty (off) and set (on,
    no page open), the dialogue log off in both (WARNING, so that only the web view's hook
    differs), `rounds` times each, alternating. Returns rows of the medians."""
    samples, errors = {"off": [], "on": []}, {"off": [], "on": []}
    for _ in range(rounds):
        for mode in ("off", "on"):
            listen = f"{HOST}:{free_tcp_port()}" if mode == "on" else ""
            settings = {"log": {"level": "WARNING"}, "web": {"listen": listen}}
            try:
                samples[mode].append(noop_cpu(start, settings, noops, batch))
            except (OSError, RuntimeError) as error:
                errors[mode].append(summary(error))
    rows = []
    for mode in ("off", "on"):
        cpus = sorted(samples[mode])
        row = dict(mode=mode, noops=noops, rounds=rounds, cpu_samples_s=cpus,
                   error="; ".join(errors[mode]) or None)
        if cpus:
            median = cpus[len(cpus) // 2]
            row.update(cpu_s=median, us_per_command=median / noops * 1e6)
        rows.append(row)
    return rows


def noop_cpu(start, settings, noops, batch):
    """CPU seconds of the server's processes for `noops` pipelined NOOPs on one session."""
    peer = sock = None
    try:
        peer = start("smtpd", settings)
        sock = open_session(peer.port)
        time.sleep(0.3)
        pids = process_tree(peer.process.pid)
        before = cpu_seconds(pids)
        counted = pipeline_noops(sock, noops, batch)
        time.sleep(0.3)
        used = cpu_seconds(process_tree(peer.process.pid)) - before
        if counted != noops:
            raise RuntimeError(f"{counted} replies, expected {noops}")
        command(sock, b"QUIT", b"221")
        return used
    finally:
        if sock is not None:
            close_quietly(sock)
        if peer is not None:
            peer.stop()


def free_tcp_port():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def pipeline_noops(sock, noops, batch):
    """Send `noops` NOOPs in batches while a thread reads the replies; returns the number
    of reply lines read (every NOOP gets a one-line 250)."""
    counted = [0]
    failure = []

    def read():
        sock.settimeout(IO_TIMEOUT)
        try:
            while counted[0] < noops:
                data = sock.recv(1 << 16)
                if not data:
                    failure.append("the server closed the connection")
                    return
                counted[0] += data.count(b"\n")
        except OSError as error:
            failure.append(f"reading replies: {error}")

    reader = threading.Thread(target=read, name="noop-replies", daemon=True)
    reader.start()
    chunk = b"NOOP\r\n" * batch
    deadline = time.monotonic() + NOOP_TIMEOUT
    try:
        for sent in range(0, noops, batch):
            if failure or time.monotonic() > deadline:
                break
            sock.sendall(chunk if noops - sent >= batch else b"NOOP\r\n" * (noops - sent))
    except OSError as error:
        failure.append(f"sending: {error}")
    reader.join(max(0.1, deadline - time.monotonic()))
    if reader.is_alive():
        raise RuntimeError(f"{counted[0]} of {noops} replies after {NOOP_TIMEOUT}s")
    if failure:
        raise RuntimeError(f"after {counted[0]} replies: {failure[0]}")
    return counted[0]


def log_octets(directory):
    """(octets, files) of every smtpd.log* under <directory>/logs."""
    logs = os.path.join(directory, "logs")
    total, files = 0, 0
    if os.path.isdir(logs):
        for entry in os.scandir(logs):
            if entry.name.startswith("smtpd.log"):
                total += entry.stat().st_size
                files += 1
    return total, files


# ---------------------------------------------------------------------------------------
# 3. Idle TLS sessions


def make_certificate(directory):
    """A self-signed pair for mail.test.ru; returns (cert, key) as absolute paths."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    try:
        result = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=mail.test.ru", "-keyout", key, "-out", cert],
            capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"openssl req: {error}") from None
    if result.returncode != 0:
        raise RuntimeError("openssl req failed: "
                           + result.stderr.decode(errors="replace").strip()[-200:])
    return os.path.abspath(cert), os.path.abspath(key)


def idle_tls(start, directory, sessions=TLS_SESSIONS, window=IDLE_WINDOW):
    """The server's CPU% while `sessions` sessions sit idle: plain (after EHLO), then TLS
    (after STARTTLS and a second EHLO). Both servers have the certificate."""
    cert, key = make_certificate(directory)
    client_context = ssl.create_default_context()
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE      # the CPU is the point, not the trust
    rows = []
    for mode in ("plain", "tls"):
        row = dict(mode=mode, sessions=sessions, window_s=window, error=None)
        peer, held = None, []
        try:
            peer = start("smtpd", {"tls": {"cert": cert, "key": key}})
            pid = peer.process.pid
            time.sleep(0.5)
            rss_before = rss_kib(process_tree(pid))
            setup_started = time.monotonic()
            for _ in range(sessions):
                held.append(open_session(peer.port,
                                         client_context if mode == "tls" else None))
            row["setup_s"] = time.monotonic() - setup_started
            if mode == "tls":
                row["tls_version"] = held[0].version()
            time.sleep(IDLE_SETTLE)
            pids = process_tree(pid)
            cpu_before, switches_before = cpu_seconds(pids), context_switches(pids)
            started = time.monotonic()
            time.sleep(window)
            elapsed = time.monotonic() - started
            pids = process_tree(pid)
            cpu = cpu_seconds(pids) - cpu_before
            switches = context_switches(pids) - switches_before
            row.update(cpu_s=cpu, wall_s=elapsed, cpu_percent=cpu / elapsed * 100,
                       wakeups_per_s=switches / elapsed, threads=threads(pids),
                       rss_kib=rss_kib(pids), rss_before_kib=rss_before)
            alive = sum(1 for sock in held if still_open(sock))
            if alive != sessions:
                row["error"] = f"{sessions - alive} of {sessions} sessions closed while idle"
        except (OSError, RuntimeError, ssl.SSLError) as error:
            row["error"] = summary(error) if peer is None else \
                f"at {len(held)} sessions: {summary(error)}"
        finally:
            for sock in held:
                close_quietly(sock)
            if peer is not None:
                peer.stop()
        rows.append(row)
    return rows


def still_open(sock):
    """True if the server has neither closed the session nor sent anything (a 421, say)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    poller = select.poll()                  # select() cannot take descriptors past 1023
    poller.register(sock.fileno(), select.POLLIN)
    return not poller.poll(0)


# ---------------------------------------------------------------------------------------
# The report


def mib(kib):
    return "–" if kib is None else f"{kib / 1024:,.0f} MiB"


def report(deploy, say, checks, notes=None):
    """The `## Deployment` section of results.md; appends (text, met) to `checks`.
    `notes`: {part: line} said under a part's heading (where it was measured, if carried)."""
    if not deploy:
        return
    notes = notes or {}

    def note(part):
        if part in notes:
            say(notes[part])
            say("")

    say("## Deployment (issue 11)")
    say("")
    rows = deploy.get("bigmsg")
    if rows:
        first = next(iter(rows.values()))
        say(f"### Peak RSS: {first['sessions']} sessions each streaming a "
            f"{first['message_octets'] / (1 << 20):.0f} MiB message at once")
        say("")
        note("bigmsg")
        say("| peer | RSS before | at 354 (all sessions open) | peak | "
            f"{HOLD_AFTER:.0f} s after the last 250 | {HOLD_AFTER:.0f} s after QUIT | "
            "stored (files in new/) | transfer |")
        say("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, row in rows.items():
            if row.get("peak_kib") is None:
                say(f"| {name} | FAIL: {row['error']} | | | | | | |")
            else:
                say(f"| {name} | {mib(row['rss_before_kib'])} | {mib(row['rss_at_354_kib'])} "
                    f"| **{mib(row['peak_kib'])}**"
                    + (f" at {row['peak_at_s']:.1f} s" if row.get("peak_at_s") is not None
                       else "")
                    + f" | {mib(row['rss_after_kib'])} | "
                    f"{mib(row['rss_after_close_kib'])} | {row['stored']} of {row['sessions']} "
                    f"| {row['seconds']:.1f} s |")
            if name == "smtpd":
                met = row.get("peak_kib") is not None and not row["error"] \
                    and row["peak_kib"] <= RSS_TARGET_MIB * 1024
                checks.append((f"peak RSS for {row['sessions']} concurrent "
                               f"{row['message_octets'] >> 20} MiB messages <= "
                               f"{RSS_TARGET_MIB} MiB ({mib(row.get('peak_kib'))}; issue 17)",
                               met))
        failures = [(name, row["error"]) for name, row in rows.items()
                    if row["error"] and row.get("peak_kib") is not None]
        for name, error in failures:
            say(f"\n{name}: **{error}**")
        say("")
        interval = next((r["sample_interval_s"] for r in rows.values()
                         if r.get("sample_interval_s")), None)
        say("VmRSS of the server's process tree, sampled every "
            + (f"{interval * 1000:.0f} ms" if interval else f"{SAMPLE_EVERY * 1000:.0f} ms")
            + " from the moment all sessions start streaming (the peak's time is counted from "
            "then); smtpd with "
            f"`max_message_size = {BIG_MAX_MESSAGE_SIZE}`. Transfer: from the start of "
            "streaming to the last 250. Every message is checked on disk.")
        say("")
    rows = deploy.get("logcost")
    if rows:
        noops = rows[0]["noops"]
        say(f"### The dialogue log: {noops:,} pipelined NOOPs on one session")
        say("")
        note("logcost")
        say("| `[log] level` | server CPU | per command | wall | console written | "
            "log file written |")
        say("|---|---:|---:|---:|---:|---:|")
        by_level = {}
        for row in rows:
            if row.get("cpu_s") is None:
                say(f"| {row['level']} | FAIL: {row['error']} | | | | |")
                continue
            by_level[row["level"]] = row
            split = f" ({row['user_s']:.2f} user, {row['system_s']:.2f} system)" \
                if "user_s" in row else ""
            say(f"| {row['level']} | {row['cpu_s']:.2f} s{split} | "
                f"{row['us_per_command']:.2f} µs | "
                f"{row['wall_s']:.2f} s | {row['console_octets'] / 1e6:,.1f} MB | "
                f"{row['log_file_octets'] / 1e6:,.1f} MB |"
                + (f" **{row['error']}**" if row["error"] else ""))
        if {"INFO", "WARNING"} <= by_level.keys():
            info, warning = by_level["INFO"], by_level["WARNING"]
            cost = info["cpu_s"] - warning["cpu_s"]
            say(f"| the log's cost | {cost:.2f} s | "
                f"{(info['us_per_command'] - warning['us_per_command']):.2f} µs | | | |")
            say("")
            say(f"At INFO the log is {cost / info['cpu_s'] * 100:.0f}% of the server's CPU "
                f"for these commands (2 lines per NOOP: `<- NOOP` and `-> 250`).")
        say("")
        say("CPU is utime + stime of the server's processes (/proc/<pid>/stat) from after "
            "EHLO to the last reply. The console goes to a file; \"log file written\" is what "
            "the server wrote with write() (/proc/<pid>/io wchar) minus the console: "
            "smtpd.log keeps only its last 10 MB and 5 rotated copies, so the files left on "
            "disk undercount it.")
        say("")
    rows = deploy.get("webcost")
    if rows:
        web_report(rows, say, note)
    rows = deploy.get("idletls")
    if rows:
        sessions = rows[0]["sessions"]
        say(f"### {sessions} idle sessions, plain and after STARTTLS")
        say("")
        note("idletls")
        say("| sessions | server CPU | thread wake-ups | threads | RSS | set-up |")
        say("|---|---:|---:|---:|---:|---:|")
        for row in rows:
            label = f"{row['sessions']} plain" if row["mode"] == "plain" else \
                f"{row['sessions']} TLS ({row.get('tls_version', '?')})"
            if row.get("cpu_percent") is None:
                say(f"| {label} | FAIL: {row['error']} | | | | |")
                continue
            say(f"| {label} | {row['cpu_percent']:.1f}% ({row['cpu_s']:.2f} s in "
                f"{row['wall_s']:.0f} s) | {row['wakeups_per_s']:,.0f}/s | {row['threads']} | "
                f"{mib(row['rss_kib'])} | {row['setup_s']:.1f} s |"
                + (f" **{row['error']}**" if row["error"] else ""))
        say("")
        say(f"CPU seconds (utime + stime) of the server over {rows[0]['window_s']:.0f} s of "
            f"wall time, {IDLE_SETTLE:.0f} s after the last session was set up, as a share of "
            "one core. Wake-ups: context switches per second, summed over the server's "
            "threads (an idle session that polls wakes its thread at every poll timeout). "
            "Plain sessions idle after EHLO; TLS sessions after STARTTLS, the handshake and a "
            "second EHLO (self-signed RSA 2048 certificate).")
        say("")


def web_report(rows, say, note):
    """The web view's section: NOOP CPU with [web] listen off and on, nobody watching."""
    noops, rounds = rows[0]["noops"], rows[0]["rounds"]
    say(f"### The web view with nobody watching: {noops:,} pipelined NOOPs, "
        f"median of {rounds} runs (issue 16)")
    say("")
    note("webcost")
    say("| `[web] listen` | server CPU (median) | per command | every run |")
    say("|---|---:|---:|---|")
    by_mode = {}
    for row in rows:
        label = "empty (off)" if row["mode"] == "off" else "127.0.0.1:port (on, no page open)"
        if row.get("cpu_s") is None:
            say(f"| {label} | FAIL: {row['error']} | | |")
            continue
        by_mode[row["mode"]] = row
        say(f"| {label} | {row['cpu_s']:.2f} s | {row['us_per_command']:.2f} µs | "
            + ", ".join(f"{cpu:.2f}" for cpu in row["cpu_samples_s"]) + " s |")
    if {"off", "on"} <= by_mode.keys():
        off, on = by_mode["off"], by_mode["on"]
        say(f"| the view's cost | {on['cpu_s'] - off['cpu_s']:+.2f} s | "
            f"{on['us_per_command'] - off['us_per_command']:+.2f} µs | |")
        say("")
        say(f"With the view on and no page open, a command costs "
            f"{(on['cpu_s'] / off['cpu_s'] - 1) * 100:+.1f}% CPU: each line of the dialogue "
            "is one tuple appended to its session's recent lines, formatted only when a page "
            "asks. The dialogue log is off (WARNING) in both, so only the view differs.")
    say("")

