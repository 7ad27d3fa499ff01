"""What the web view sends: the JSON of sessions, their dialogue, the queue and the
mailboxes, built from the event hub, the spool and the Maildir. Text from the wire goes into
JSON strings as it is; the page only ever puts it into the DOM as text.
"""
import time

import explain
import mailview
import queuerunner
from delivery import describe
from events import Direction, Kind

MAX_LINES_SENT = 400            # lines of one session in /api/sessions/<id>


def session_json(record):
    move = record.last_transition
    return {
        "id": record.id,
        "peer": record.peer,
        "helo": record.helo,
        "state": record.state,
        "opened": record.opened,
        "closed": record.closed,
        "move": move_json(move) if move else None,
    }


def move_json(transition):
    return {"verb": explain.EDGE_NAMES.get(transition.verb, transition.verb),
            "from": transition.old, "to": transition.new}


def line_json(line):
    """One dialogue line: `dir` is "<-", "->", "=>" (a move alone) or ".." (a note)."""
    item = {"n": line.number, "dir": line.direction.value}
    if line.direction is Direction.SENT:
        reply = line.content
        item["text"] = reply.lines()
        note = explain.annotate(line.transition, reply)
        item["rfc"], item["explain"] = note.rfc, note.text
    else:
        item["text"] = [line.content] if line.content else []
    if line.transition is not None:
        item["move"] = move_json(line.transition)
    return item


def session_with_lines(record):
    found = session_json(record)
    found["lines"] = [line_json(line) for line in record.lines()[-MAX_LINES_SENT:]]
    return found


def sessions_json(hub):
    live, history = hub.sessions()
    return {"now": time.time(), "live": [session_json(record) for record in live],
            "history": [session_json(record) for record in reversed(history)]}


def event_json(event):
    """(SSE event name, data) of a session event from the hub."""
    if event.kind is Kind.LINE:
        return "line", {"session": session_json(event.subject), "line": line_json(event.line)}
    return event.kind.value, {"session": session_json(event.subject)}


# ---------------------------------------------------------------------------------------
# The queue


def queue_json(spool):
    """What --queue shows, as data (and its text, as --queue prints it)."""
    now = time.time()
    entries = queuerunner.queue_entries(spool)
    return {
        "now": now,
        "messages": [_queued_json(entry, now) for entry in entries],
        "corrupt": spool.corrupt(),
        "listing": queuerunner.queue_listing(spool, now, entries),
    }


def _queued_json(entry, now):
    message, record = entry.message, entry.record
    found = {"name": entry.name, "queue_id": entry.queue_id, "problem": entry.problem,
             "recipients": [], "notices": ""}
    if message is not None:
        found.update(created=message.created, size=message.text_size,
                     sender=message.envelope.reverse_path.text)
    if record is not None:
        found["recipients"] = [
            {"address": key, "status": recipient.status.value, "attempts": recipient.attempts,
             "next_attempt": recipient.next_attempt, "last_error": recipient.last_error,
             "remote": recipient.remote, "description": describe(recipient, now)}
            for key, recipient in record.recipients.items()]
        found["notices"] = queuerunner.notice_retry_line(record, now)
    return found


# ---------------------------------------------------------------------------------------
# The mailboxes


def mailboxes_json(config):
    return {"mailboxes": [box._asdict() for box in mailview.mailboxes(config)]}


def summaries_json(config, domain, user):
    found = mailview.summaries(config, domain, user)
    if found is None:
        return None
    return {"domain": domain, "user": user,
            "messages": [_summary_json(summary) for summary in found]}


def message_json(config, domain, user, message_id):
    found = mailview.message(config, domain, user, message_id)
    if found is None:
        return None
    return {"domain": domain, "user": user, "summary": _summary_json(found.summary),
            "headers": [list(pair) for pair in found.headers], "source": found.source,
            "truncated": found.truncated}


def _summary_json(summary):
    found = summary._asdict()
    found["received_text"] = mailview.received_date(summary)
    return found
