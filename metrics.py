"""/metrics: the server's counters in the Prometheus text format (version 0.0.4), and the same
numbers as a dict for /api/metrics.

    smtpd_sessions_open 2
    smtpd_replies_total{class="2xx"} 41

Counters count from the server's start (Prometheus sees a restart as a reset); gauges are
read when asked. `promtool check metrics` accepts the output (tests/test_web.py runs it).
"""
from typing import NamedTuple

from state import TRANSITIONS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metric(NamedTuple):
    name: str
    kind: str               # counter or gauge
    help: str
    samples: list           # [(labels dict, value)]


def collect(hub, queue_length):
    """[Metric] of the hub's sessions and counters, and the queue's length."""
    sessions, replies, counts = hub.snapshot_totals()
    live, _ = hub.sessions()
    states = dict.fromkeys(TRANSITIONS, 0)
    for record in live:
        states[record.state] = states.get(record.state, 0) + 1
    return [
        Metric("smtpd_sessions_open", "gauge", "SMTP sessions open now",
               [({}, len(live))]),
        Metric("smtpd_sessions_in_state", "gauge",
               "SMTP sessions open now, by the state of the table in state.py",
               [({"state": state}, count) for state, count in states.items()]),
        Metric("smtpd_sessions_total", "counter", "SMTP sessions since the server started",
               [({}, sessions)]),
        Metric("smtpd_replies_total", "counter",
               "Replies sent, by the first digit of the code (RFC 5321 4.2.1)",
               [({"class": key}, count) for key, count in replies.items()]),
        Metric("smtpd_messages_accepted_total", "counter",
               "Messages accepted: 250 after the end of the text (RFC 5321 6.1)",
               [({}, counts["accepted"])]),
        Metric("smtpd_local_deliveries_total", "counter",
               "Copies stored in a local Maildir, one per local recipient (notices too)",
               [({}, counts["local"])]),
        Metric("smtpd_relayed_recipients_total", "counter",
               "Remote recipients the relay handed to their next hop",
               [({}, counts["relayed"])]),
        Metric("smtpd_bounced_recipients_total", "counter",
               "Remote recipients that failed for good (bounced, RFC 3464)",
               [({}, counts["bounced"])]),
        Metric("smtpd_queue_messages", "gauge", "Messages in the relay queue (the spool)",
               [({}, queue_length)]),
        Metric("smtpd_received_message_bytes_total", "counter",
               "Octets of message text accepted", [({}, counts["octets"])]),
    ]


def exposition(metrics):
    """The text format: HELP and TYPE, then one sample a line."""
    lines = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {_help(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in metric.samples:
            lines.append(f"{metric.name}{_labels(labels)} {value}")
    return "\n".join(lines) + "\n"


def as_json(metrics):
    """{name: value} for a sample without labels, {name: {label value: value}} otherwise."""
    found = {}
    for metric in metrics:
        if len(metric.samples) == 1 and not metric.samples[0][0]:
            found[metric.name] = metric.samples[0][1]
        else:
            found[metric.name] = {"/".join(labels.values()): value
                                  for labels, value in metric.samples}
    return found


def _labels(labels):
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_label_value(value)}"' for key, value in labels.items()) + "}"


def _label_value(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")
