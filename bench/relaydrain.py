"""The relay drain of bench/run.py (issue 17; `--only relay`): how long a server takes to
pass 10,000 messages for a remote domain on to its next hop, smtpd against Postfix.

    rows = relaydrain.measure(start, start_sink, tools, messages, size)
    relaydrain.report(rows, say, checks)

`start(name, settings)` returns a started bench Peer (run.py's) and `start_sink()` a started
`smtp-sink -c` on 127.0.0.2 as (process, port, log path); each measurement gets a fresh one
of both and stops them. smtpd reaches the sink through a `[relay] routes` entry
(`remote.test=127.0.0.2:<port>`), Postfix through `relayhost = [127.0.0.2]:<port>`; neither
looks anything up in DNS. smtp-source submits the messages over 20 sessions; the drain is
timed from smtp-source's start (its first 250 comes a millisecond later) until the server's
queue is empty and the sink has counted every message.
"""
import os
import re
import subprocess
import time

REMOTE_DOMAIN = "remote.test"
RECIPIENT = "user@" + REMOTE_DOMAIN
SENDER = "bench@test.ru"
SINK_HOST = "127.0.0.2"         # the next hop: another loopback address than the servers'
PEERS = ("smtpd", "smtpd-procs", "postfix")      # smtpd-procs: [server] processes = auto
MESSAGES = 10000
MESSAGES_QUICK = 2000
SESSIONS = 20                   # smtp-source -s: concurrent submitting sessions
SUBMIT_TIMEOUT = 600            # seconds for smtp-source to submit everything
DRAIN_TIMEOUT = 900             # seconds from the start to an empty queue
POLL = 0.05                     # seconds between looks at the queue and the sink's counter
TARGET = 1.2                    # issue 17: smtpd drains >= 1.2x as fast as Postfix
SINK_COUNTER = re.compile(rb"mesg=(\d+)")
SPOOL_SUFFIX = ".smtp"          # spool.py: one <port>-<queue id>.smtp per queued transaction


def sink_count(log_path):
    """The last `mesg=N` that smtp-sink -c wrote (it rewrites one line with \\r)."""
    try:
        with open(log_path, "rb") as log:
            log.seek(max(0, os.path.getsize(log_path) - 256))
            found = SINK_COUNTER.findall(log.read())
    except OSError:
        return 0
    return int(found[-1]) if found else 0


def queued(peer):
    """Transactions still in the server's queue."""
    if peer.name == "postfix":
        import postfix_peer
        return postfix_peer.queued(peer.directory)
    spool = os.path.join(peer.directory, "spool")
    try:
        return sum(1 for entry in os.scandir(spool) if entry.name.endswith(SPOOL_SUFFIX))
    except OSError:
        return 0


def settings_for(name, sink_port):
    if name.startswith("smtpd"):
        return {"relay": {"routes": f"{REMOTE_DOMAIN}={SINK_HOST}:{sink_port}"}}
    return {"relayhost": (SINK_HOST, sink_port)}


def measure(start, start_sink, stop, tools, messages, size):
    rows = {}
    for name in PEERS:
        rows[name] = drain_once(start, start_sink, stop, tools, name, messages, size)
    return rows


def drain_once(start, start_sink, stop, tools, name, messages, size):
    row = dict(peer=name, messages=messages, size=size, sessions=SESSIONS, error=None)
    sink = peer = None
    try:
        sink, sink_port, sink_log = start_sink()
        peer = start(name, settings_for(name, sink_port))
        cpu_before = peer.cpu_seconds()
        command = [tools["smtp-source"], "-s", str(SESSIONS), "-m", str(messages),
                   "-l", str(size), "-M", "client.test", "-f", SENDER, "-t", RECIPIENT,
                   f"127.0.0.1:{peer.port}"]
        os.sync()
        started = time.monotonic()
        submitted = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL,
                                   timeout=SUBMIT_TIMEOUT)
        row["submit_s"] = time.monotonic() - started
        if submitted.returncode != 0:
            raise RuntimeError(f"smtp-source exited {submitted.returncode}: "
                               + submitted.stdout.decode(errors="replace").strip()[-200:])
        deadline = started + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            if sink_count(sink_log) >= messages and queued(peer) == 0:
                break
            time.sleep(POLL)
        row["drain_s"] = time.monotonic() - started
        row["delivered"] = sink_count(sink_log)
        row["left_in_queue"] = queued(peer)
        row["cpu_s"] = peer.cpu_seconds() - cpu_before
        row["rate"] = messages / row["drain_s"]
        if row["delivered"] < messages or row["left_in_queue"]:
            row["error"] = (f"after {DRAIN_TIMEOUT}s: {row['delivered']} of {messages} at the "
                            f"sink, {row['left_in_queue']} still queued")
    except subprocess.TimeoutExpired:
        row["error"] = f"smtp-source did not finish within {SUBMIT_TIMEOUT}s"
    except RuntimeError as error:
        row["error"] = str(error).splitlines()[0]
    finally:
        if peer is not None:
            peer.stop()
        if sink is not None:
            stop(sink)
    return row


def report(rows, say, checks):
    if not rows:
        return
    first = next(iter(rows.values()))
    say(f"## Relay drain: {first['messages']:,} messages of {first['size']:,} octets for "
        f"{REMOTE_DOMAIN}, to smtp-sink on {SINK_HOST}")
    say("")
    say("| server | submitted in | queue empty and all at the sink after | messages/s | "
        "server CPU | CPU per message |")
    say("|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        if row.get("drain_s") is None or row["error"]:
            say(f"| {name} | FAIL: {row['error']} | | | | |")
            continue
        say(f"| {name} | {row['submit_s']:.1f} s | **{row['drain_s']:.1f} s** | "
            f"{row['rate']:,.0f} | {row['cpu_s']:.1f} s | "
            f"{row['cpu_s'] / row['messages'] * 1000:.2f} ms |")
    candidates = [rows[name] for name in PEERS[:-1]
                  if rows.get(name, {}).get("rate") and not rows[name]["error"]]
    ours = max(candidates, key=lambda row: row["rate"]) if candidates else {}
    theirs = rows.get("postfix", {})
    ratio = None
    if ours.get("rate") and theirs.get("rate") and not theirs["error"]:
        ratio = ours["rate"] / theirs["rate"]
    say("")
    shown = "–" if ratio is None else f"{ratio:.2f}× ({ours['peer']})"
    say(f"smtpd / Postfix, the better of smtpd's two configurations (smtpd-procs: "
        f"`[server] processes = auto`): **{shown}** (target ≥ {TARGET}×). smtp-source submits over "
        f"{first['sessions']} sessions; the clock starts with smtp-source and stops when the "
        "server's queue is empty (smtpd: no `*.smtp` in the "
        "spool; Postfix: no file in any queue directory) and `smtp-sink -c` has counted every "
        "message. smtpd: `[relay] routes`, 8 relay workers (the default); Postfix: "
        "`relayhost`, its defaults (20 connections per destination, connection cache on "
        "demand). CPU: utime + stime of the server's process tree and its reaped children.")
    say("")
    checks.append((f"relay drain >= {TARGET}× Postfix ({shown}; issue 17)",
                   ratio is not None and ratio >= TARGET))
