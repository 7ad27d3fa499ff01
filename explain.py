"""The protocol in words and pictures, all read from the table in state.py: the state
diagram (`python smtpd.py --fsm`) and the --trace lines beside the dialogue.
"""
from typing import NamedTuple

import replies
from replies import Next
from state import (AUTH_RESPONSE, CLOSED, END_OF_CHUNK, END_OF_DATA, END_OF_LAST_CHUNK, START,
                   STAY, TRANSITIONS)
from verbs import VERBS

# The reply each cell gives when it goes well (2xx) or asks for more (3xx), for --fsm
SUCCESS_REPLIES = {
    "HELO": replies.HELO_OK, "EHLO": replies.EHLO_OK, "MAIL": replies.SENDER_OK,
    "RCPT": replies.RECIPIENT_OK, "RSET": replies.RESET_OK, "NOOP": replies.OK,
    "VRFY": replies.CANNOT_VRFY, "HELP": replies.HELP, "QUIT": replies.CLOSING,
    "STARTTLS": replies.READY_FOR_TLS, "AUTH": replies.AUTH_OK, END_OF_DATA: replies.QUEUED,
    AUTH_RESPONSE: replies.AUTH_OK, "EXPN": replies.NO_EXPN,
    END_OF_CHUNK: replies.CHUNK_OK, END_OF_LAST_CHUNK: replies.QUEUED,
}
WAITING_REPLIES = {"DATA": replies.START_DATA, "AUTH": replies.AUTH_CHALLENGE,
                   AUTH_RESPONSE: replies.AUTH_CHALLENGE}
# The verbs whose octets come before their reply (RFC 3030 2): the edge says so
READ_FIRST = {"BDAT": "its octets"}
# Mermaid and Graphviz labels cannot hold "<"; the pseudo-verbs get plain names
EDGE_NAMES = {END_OF_DATA: "CRLF.CRLF", AUTH_RESPONSE: "SASL response",
              END_OF_CHUNK: "chunk", END_OF_LAST_CHUNK: "LAST chunk"}
# What the input that is not a command is, as verbs.VERBS says what each command does
INPUT_SUMMARIES = {
    END_OF_DATA: "the end of the message text, a line with only a period (RFC 5321 4.1.1.4)",
    END_OF_CHUNK: "the octets of a BDAT chunk, read whole (RFC 3030 2)",
    END_OF_LAST_CHUNK: "the last BDAT chunk: the message is whole (RFC 3030 2)",
    AUTH_RESPONSE: "the client's answer to the server's 334 challenge (RFC 4954 4)",
}
# RFC 5321 4.2.1: what the first digit of a reply code says
REPLY_CLASSES = {
    2: "positive completion: the command was carried out",
    3: "positive intermediate: the server waits for more",
    4: "transient negative: not now, the client may try again",
    5: "permanent negative: the client should not repeat it as it is",
}
# Replies that answer no move of the table, by code: what they mean for the session
NO_MOVE = {
    220: "the server is ready; the client names itself next, with EHLO or HELO",
    421: "the server ends the session and closes the connection (RFC 5321 3.8)",
    500: "not a command line this server can take; the session stays where it was",
    501: "the arguments are wrong; the session stays where it was",
    503: "the command is not allowed in this state; the session stays where it was",
}


def edges():
    """The table as a list of (from, to, label), verbs with the same move and reply merged:
    every allowed verb, and where each kind of reply takes the session."""
    merged = {}
    for state, rules in TRANSITIONS.items():
        for verb, rule in rules.items():
            for code, target in _moves(verb, rule):
                key = (state, target or state, code)
                merged.setdefault(key, []).append(EDGE_NAMES.get(verb, verb))
    return [(source, target, f"{', '.join(verbs)} / {code}")
            for (source, target, code), verbs in merged.items()]


def _moves(verb, rule):
    if verb in SUCCESS_REPLIES:
        yield str(SUCCESS_REPLIES[verb].code), rule.success
    if verb in WAITING_REPLIES:
        yield str(WAITING_REPLIES[verb].code), rule.waiting
    if verb in READ_FIRST:
        yield READ_FIRST[verb], rule.waiting
    if rule.failure is not STAY:
        yield "4xx/5xx", rule.failure


def draw(kind="mermaid"):
    """The state machine as Mermaid (README) or Graphviz dot (`python smtpd.py --fsm dot`)."""
    if kind == "dot":
        lines = ["digraph smtp {", "    rankdir=LR;", '    connect [shape=point];',
                 f'    connect -> {START} [label="connect / {replies.GREETING.code}"];']
        lines += [f'    {source} -> {target} [label="{label}"];'
                  for source, target, label in edges()]
        return "\n".join(lines + ["}"])
    lines = ["stateDiagram-v2", f"    [*] --> {START} : connect / {replies.GREETING.code}"]
    lines += [f"    {source} --> {target} : {label}"
              for source, target, label in edges()]
    lines.append(f"    {CLOSED} --> [*]")
    return "\n".join(lines)



def framing_notes(text):
    """What the DATA reader did, in words (RFC 5321 4.1.1.4, 4.5.2)."""
    if text.oversize:
        return ["end of data found; the text was over the size limit and was not kept"]
    return [f"end of data: <CRLF>.<CRLF> after {text.size} octets (RFC 5321 4.1.1.4)",
            f"dot-stuffing removed from {text.stuffed_lines} line(s) (RFC 5321 4.5.2)"]


def describe(session, reply):
    """One --trace line for a reply: the state change and the rule behind it."""
    if reply.then is Next.CHUNK:
        return (f"[{session.transition.old} -> {session.transition.new}] BDAT: reading "
                f"{reply.octets} octets before the reply (RFC 3030 2)")
    outcome = "accepted" if reply.code < 300 else \
        "waiting for more" if reply.code < 400 else "refused"
    transition = session.transition
    if transition:
        verb = EDGE_NAMES.get(transition.verb, transition.verb)
        moves = f"[{transition.old} -> {transition.new}] {verb} {outcome}"
    else:
        moves = f"[{session.state}] {outcome}"
    return f"{moves}: {reply.code} {reply.enhanced} ({reply.rfc})".replace("  ", " ")


class Annotation(NamedTuple):
    """What the web view shows beside a reply: the RFC section and one line of meaning."""
    rfc: str
    text: str


def annotate(transition, reply):
    """The Annotation of `reply`, sent in answer to the move `transition` (or None: the
    greeting, a 421, a command the table refused before any move)."""
    meaning = REPLY_CLASSES.get(reply.code // 100, "")
    if transition is None:
        return Annotation(reply.rfc, f"{reply.code}: {NO_MOVE.get(reply.code, meaning)}")
    verb = transition.verb
    summary = VERBS[verb].summary if verb in VERBS else INPUT_SUMMARIES.get(verb, "")
    outcome = "accepted" if reply.code < 300 else \
        "waiting for more" if reply.code < 400 else "refused"
    return Annotation(reply.rfc, f"{EDGE_NAMES.get(verb, verb)} {outcome} "
                                 f"({reply.code}, {meaning.split(':')[0]}): {summary}")

