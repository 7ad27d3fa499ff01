"""What a session says, written down: the dialogue log of one session (`SessionLog`), and
the form its lines take. Every line also goes to the session's record for the web view
(events.SessionRecord) when the view is on: this is the one place session events come from.

    2026-11-21 10:00:00 [a1b2c3] 127.0.0.1:51234 -> 220 mail.test.ru ESMTP smtpd ready
"""


class SessionLog:
    """The dialogue log of one session: `[id] ip:port -> reply` and `<- command`. Every line
    also goes to the session's record for the web view (events.py), when it is on."""

    def __init__(self, log, session_id, peer, record=None):
        self.log = log
        self.tag = f"[{session_id}] {peer}"
        self.enabled = log.enabled()        # skip formatting when nothing is logged
        self.record = record                # events.SessionRecord, or None: no web view

    def sent(self, reply, transition=None):
        if self.enabled:
            for line in reply.lines():
                self.log.dialogue(f"{self.tag} -> {line}")
        if self.record is not None:
            self.record.sent(reply, transition)

    def received(self, line):
        if self.enabled:
            self.log.dialogue(f"{self.tag} <- {line}")
        if self.record is not None:
            self.record.received(line)

    def moved(self, transition):
        """A state change that has no reply line yet (BDAT: its octets come first)."""
        if self.record is not None:
            self.record.moved(transition)

    def accepted(self, envelope, octets):
        """The message was stored (250 after its text): for the web view's counters."""
        if self.record is not None and envelope is not None:
            self.record.accepted(len(envelope.local_recipients), octets)

    def trace(self, text):
        """--trace: state changes and RFC sections, beside the dialogue."""
        self.log.dialogue(f"{self.tag}    {text}")

    def info(self, text, *args):
        self.log.info(f"%s {text}", self.tag, *args)
        if self.record is not None:
            self.record.note(text % args if args else text)

    def error(self, text, *args, exc_info=False):
        self.log.error(f"%s {text}", self.tag, *args, exc_info=exc_info)
        if self.record is not None:
            self.record.note(text % args if args else text)


def loggable(line):
    """A command line as the log shows it: UTF-8 as text (an SMTPUTF8 address), invalid octets
    and control characters escaped (a stray CR must not forge a log line), AUTH with its
    mechanism but never its credentials (RFC 4954 14)."""
    text = line.decode("utf-8", "backslashreplace")
    if not text.isprintable():
        text = "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in text)
    verb, _, argument = text.partition(" ")
    if verb.upper() == "AUTH" and " " in argument.strip():
        return f"{verb} {argument.split()[0]} (credentials not logged)"
    return text


def format_peer(ip, port):
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
