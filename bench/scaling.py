"""The scaling section of bench/run.py (issue 17; `--only scaling`): messages/s and server
CPU seconds per message at 1, 10, 50, 200 and 1,000 concurrent sessions, for smtpd in both
its configurations (one process, and `[server] processes = auto`), aiosmtpd and Postfix; and
the dialogue log's cost at one of those points.

    points = scaling.measure(drive_point, quick)
    scaling.report(points, say, checks)
    scaling.plot(points, "bench/scaling.svg")

`drive_point(name, sessions, messages, settings)` runs one `smtp-source -s N` against a
fresh peer and returns run.py's result dict (rate, cpu_s, cpu_ms_per_message, error); CPU
is the server's process tree (utime + stime, its reaped children's too, so Postfix's
short-lived processes count), read before smtp-source starts and after every message is on
disk: Postfix's delivery by virtual(8) is in it.

The plot is drawn with matplotlib (already a bench requirement for results.png), saved as
SVG: two panels, messages/s and CPU ms per message, against sessions on a log axis.
"""
SESSIONS = (1, 10, 50, 200, 1000)
PEERS = ("smtpd", "smtpd-procs", "aiosmtpd", "postfix")
SMTPD_CONFIGURATIONS = ("smtpd", "smtpd-procs")     # the ratios take the better of the two
SIZE = 1024                     # octets of payload (smtp-source -l), as in the 1 KB workloads
MESSAGES_PER_SESSION = 3        # each session of the largest point sends a few messages
MIN_MESSAGES = 1500
MIN_MESSAGES_QUICK = 300
LOG_POINT = 50                  # sessions at which the dialogue log's cost is measured
LOG_LEVELS = ("INFO", "WARNING")
COLOURS = {"smtpd": "#1f77b4", "smtpd-procs": "#9467bd", "aiosmtpd": "#ff7f0e",
           "postfix": "#2ca02c"}
LABELS = {"smtpd": "smtpd, one process (fsync file + dir)",
          "smtpd-procs": "smtpd, processes = auto (fsync file + dir)",
          "aiosmtpd": "aiosmtpd Maildir (no fsync)",
          "postfix": "Postfix (as it ships)"}


def messages_for(sessions, quick):
    return max(MIN_MESSAGES_QUICK if quick else MIN_MESSAGES, MESSAGES_PER_SESSION * sessions)


def measure(drive_point, quick, say=print):
    """{"points": {peer: [row per SESSIONS]}, "log": [row per level]}."""
    points = {name: [] for name in PEERS}
    for sessions in SESSIONS:
        for name in PEERS:
            row = point_row(drive_point(name, sessions, messages_for(sessions, quick), None),
                            sessions)
            points[name].append(row)
            say(f"scaling {name:<9} {sessions:5} sessions: " + describe(row), flush=True)
    log = []
    for level in LOG_LEVELS:
        row = point_row(drive_point("smtpd", LOG_POINT, messages_for(LOG_POINT, quick),
                                    {"log": {"level": level}}), LOG_POINT)
        row["level"] = level
        log.append(row)
        say(f"scaling smtpd log {level:<7} {LOG_POINT} sessions: " + describe(row), flush=True)
    return {"points": points, "log": log}


def point_row(result, sessions):
    keys = ("messages", "seconds", "rate", "cpu_s", "cpu_ms_per_message", "overflows",
            "error")
    return dict({key: result.get(key) for key in keys}, sessions=sessions)


def describe(row):
    if row["error"]:
        return f"FAILED: {row['error']}"
    return (f"{row['rate']:8,.0f} msg/s, {row['cpu_ms_per_message']:.2f} ms CPU per message"
            + (f" [{row['overflows']} listen overflows]" if row["overflows"] else ""))


def better_smtpd(rows):
    """The faster of smtpd's configurations at one point, with its name as "peer", or None
    when neither ran."""
    good = [dict(rows[name], peer=name) for name in SMTPD_CONFIGURATIONS
            if name in rows and not rows[name]["error"] and rows[name]["rate"]]
    return max(good, key=lambda row: row["rate"], default=None)


def rate_cell(row):
    return "FAIL" if row["error"] or row["rate"] is None else f"{row['rate']:,.0f}"


def cpu_cell(row):
    return "–" if row["error"] or row["cpu_ms_per_message"] is None else \
        f"{row['cpu_ms_per_message']:.2f}"


def report(data, say, checks):
    if not data:
        return
    points = data["points"]
    say("## Scaling: 1 KB messages at 1 to 1,000 concurrent sessions (`smtp-source -s N`)")
    say("")
    say("| sessions | " + " | ".join(f"{name} msg/s" for name in points)
        + " | " + " | ".join(f"{name} CPU ms/msg" for name in points)
        + " | smtpd / aiosmtpd | smtpd / Postfix |")
    say("|---:|" + "---:|" * (2 * len(points) + 2))
    for index, sessions in enumerate(SESSIONS):
        rows = {name: points[name][index] for name in points if index < len(points[name])}
        ours = better_smtpd(rows)
        ratios = []
        for other in ("aiosmtpd", "postfix"):
            theirs = rows.get(other)
            ok = ours and theirs and not theirs["error"]
            ratios.append(f"{ours['rate'] / theirs['rate']:.2f}× ({ours['peer']})" if ok
                          else "–")
        say(f"| {sessions:,} | " + " | ".join(rate_cell(rows[n]) for n in rows) + " | "
            + " | ".join(cpu_cell(rows[n]) for n in rows) + " | " + " | ".join(ratios) + " |")
    say("")
    say("The ratios take the better of smtpd's two configurations at each point (in "
        "brackets; smtpd-procs: `[server] processes = auto`).")
    say("")
    say("One run per point, each against a fresh server; messages per point: "
        f"max({MIN_MESSAGES:,}, {MESSAGES_PER_SESSION} × sessions) (`--quick`: "
        f"max({MIN_MESSAGES_QUICK}, …)). CPU ms per message: the server's utime + stime "
        "(/proc/<pid>/stat of its process tree, with reaped children) from before "
        "smtp-source starts to the moment every message is in the Maildir, divided by the "
        "messages; for Postfix this includes cleanup, qmgr and virtual(8) delivering. The "
        "plot is [scaling.svg](scaling.svg).")
    say("")
    errors = [(name, row) for name in points for row in points[name] if row["error"]]
    for name, row in errors:
        say(f"- {name} at {row['sessions']} sessions: {row['error']}")
    if errors:
        say("")
    log = {row["level"]: row for row in data.get("log", [])}
    if log:
        say(f"### The dialogue log's cost at {LOG_POINT} sessions (smtpd)")
        say("")
        say("| `[log] level` | msg/s | CPU ms per message |")
        say("|---|---:|---:|")
        for level, row in log.items():
            say(f"| {level} | {rate_cell(row)} | {cpu_cell(row)} |")
        info, warning = log.get("INFO"), log.get("WARNING")
        if info and warning and not info["error"] and not warning["error"]:
            extra = info["cpu_ms_per_message"] - warning["cpu_ms_per_message"]
            say(f"| the log's cost | {info['rate'] / warning['rate'] - 1:+.0%} | "
                f"{extra:+.2f} ({extra / warning['cpu_ms_per_message']:+.0%}) |")
        say("")


def plot(data, path):
    """Two panels (msg/s, CPU ms per message) against sessions, saved as SVG at `path`."""
    if not data:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rates, costs) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, rows in data["points"].items():
        good = [row for row in rows if not row["error"] and row["rate"]]
        if not good:
            continue
        sessions = [row["sessions"] for row in good]
        rates.plot(sessions, [row["rate"] for row in good], marker="o",
                   label=LABELS.get(name, name), color=COLOURS.get(name))
        costs.plot(sessions, [row["cpu_ms_per_message"] for row in good], marker="o",
                   label=LABELS.get(name, name), color=COLOURS.get(name))
    for axes, label in ((rates, "messages/s"), (costs, "server CPU ms per message")):
        axes.set_xscale("log")
        axes.set_xticks(SESSIONS)
        axes.set_xticklabels([f"{n:,}" for n in SESSIONS])
        axes.set_xlabel("concurrent sessions (smtp-source -s)")
        axes.set_ylabel(label)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    rates.set_title("Throughput, 1 KB messages, every one on disk", fontsize=10)
    costs.set_title("Cost model: server CPU (user + system) per message", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="svg")
    plt.close(figure)
