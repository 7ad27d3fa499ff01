"""Every reply the server sends, in one place, each beside the RFC section it comes from.

A reply is a three-digit code (RFC 5321 4.2), an enhanced status code (RFC 3463, RFC 2034)
and free text. Tests import these same constants, so a changed code changes the tests too.
"""
import enum
from typing import NamedTuple


class Next(enum.Enum):
    """What the connection does after sending a reply."""
    COMMAND = "read the next command"
    TEXT = "read the message text"              # after 354 (RFC 5321 4.1.1.4)
    SASL = "read a SASL response"               # after 334 (RFC 4954 4)
    TLS = "start the TLS handshake"             # after 220 to STARTTLS (RFC 3207 4)
    CHUNK = "read a BDAT chunk, then reply"     # RFC 3030 2: the octets come first
    CLOSE = "close the connection"              # after 221, and after every 421 (RFC 5321 3.8)


class Reply(NamedTuple):
    code: int
    enhanced: str       # "" where RFC 2034 3 leaves it out: the greeting, HELO/EHLO, 354, 334
    text: str           # several lines are joined with "\n" (a multiline reply, RFC 5321 4.2.1)
    rfc: str = ""       # the section that defines this reply, shown by --trace
    then: Next = Next.COMMAND
    delay: float = 0.0  # seconds to wait before sending it (a failed AUTH)

    def format(self, **values):
        return self._replace(text=self.text.format(**values))

    def delayed(self, seconds):
        return self._replace(delay=seconds)

    def lines(self):
        """The reply as text lines without CRLF: `250-first`, ..., `250 last` (RFC 5321 4.2.1)."""
        texts = self.text.split("\n")
        prefix = f"{self.enhanced} " if self.enhanced else ""
        last = len(texts) - 1
        return [f"{self.code}{' ' if i == last else '-'}{prefix}{text}"
                for i, text in enumerate(texts)]

    def wire(self):
        # UTF-8: a reply quotes an address only once it was accepted, and a non-ASCII one is
        # accepted only in an SMTPUTF8 transaction (RFC 6531 3.7.4)
        return "".join(line + "\r\n" for line in self.lines()).encode("utf-8")


def quoted(word, limit=40):
    """A client's word as a reply may quote it: visible ASCII only, cut short."""
    return "".join(c for c in word if "!" <= c <= "~")[:limit] or "?"


class ReadChunk(NamedTuple):
    """Not a reply: BDAT announces `octets` of message text that come before its reply
    (RFC 3030 2). The socket layer reads them into the session, then asks for the reply."""
    octets: int
    then: Next = Next.CHUNK


# Short names for the `then` column below
TEXT, SASL, TLS, CLOSE = Next.TEXT, Next.SASL, Next.TLS, Next.CLOSE

# Connection opening and closing. Every 421 closes the connection (RFC 5321 3.8).
GREETING = Reply(220, "", "{hostname} ESMTP smtpd ready", "RFC 5321 4.3.1")
CLOSING = Reply(221, "2.0.0", "{hostname} closing connection", "RFC 5321 4.1.1.10", CLOSE)
TIMEOUT = Reply(421, "4.4.2", "{hostname} idle too long, closing connection",
                "RFC 5321 4.5.3.2.7", CLOSE)
DATA_TIMEOUT = Reply(421, "4.4.2", "{hostname} message text too slow, closing connection",
                     "RFC 5321 4.5.3.2.6", CLOSE)
SESSION_TIMEOUT = Reply(421, "4.4.2", "{hostname} session too long, closing connection",
                        "RFC 5321 4.5.3.2", CLOSE)
TOO_MANY_CLIENTS = Reply(421, "4.7.0", "{hostname} too many connections, try again later",
                         "RFC 5321 4.3.2", CLOSE)
TOO_MANY_FROM_YOU = Reply(421, "4.7.0", "{hostname} too many connections from your address",
                          "RFC 5321 4.3.2", CLOSE)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "{hostname} too many errors, closing connection",
                        "RFC 5321 4.3.2", CLOSE)
TOO_MANY_REJECTED = Reply(421, "4.7.0", "{hostname} too many refused recipients, closing "
                          "connection", "RFC 5321 4.3.2", CLOSE)
SHUTTING_DOWN = Reply(421, "4.3.2", "{hostname} shutting down, try again later",
                      "RFC 5321 3.8", CLOSE)
UNAVAILABLE = Reply(421, "4.3.0", "{hostname} service not available, try again later",
                    "RFC 5321 3.8", CLOSE)      # [server] processes: no answer from the supervisor
NOT_HTTP = Reply(421, "4.7.0", "{hostname} this is an SMTP server, not a web server",
                 "RFC 5321 4.3.2", CLOSE)
LOCAL_ERROR = Reply(451, "4.3.0", "Local error, transaction discarded; try again later",
                    "RFC 5321 4.2.3")
STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage", "RFC 3463 3.4")

# HELO / EHLO (RFC 5321 4.1.1.1)
HELO_OK = Reply(250, "", "{hostname} greets {name}", "RFC 5321 4.1.1.1")
EHLO_OK = Reply(250, "", "{hostname} greets {name}\n{extensions}", "RFC 5321 4.1.1.1")
HELO_NEEDS_DOMAIN = Reply(501, "5.5.4", "Syntax: {verb} <domain>", "RFC 5321 4.1.1.1")

# Mail transaction (RFC 5321 4.1.1.2 - 4.1.1.4)
SENDER_OK = Reply(250, "2.1.0", "Sender <{address}> ok", "RFC 5321 4.1.1.2")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient <{address}> ok", "RFC 5321 4.1.1.3")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address: {problem}", "RFC 5321 4.1.2")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address: {problem}", "RFC 5321 4.1.2")
BAD_PARAMETER = Reply(555, "5.5.4", "Parameter not recognised or not implemented: {parameter}",
                      "RFC 5321 4.1.1.11")
BAD_PARAMETER_VALUE = Reply(501, "5.5.4", "Bad parameter: {problem}", "RFC 3461 4")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "A non-ASCII address needs MAIL FROM:<...> SMTPUTF8",
                       "RFC 6531 3.2")
NO_SUCH_USER = Reply(550, "5.1.1", "<{address}>: no such mailbox here",
                     "RFC 5321 3.3, 4.2.2")
RELAY_DENIED = Reply(554, "5.7.1", "<{address}>: relay access denied", "RFC 5321 3.6.2")
NOT_YOUR_ADDRESS = Reply(553, "5.7.1", "<{address}>: not an address of {login}",
                         "RFC 6409 6.1")
DELIVERED_TO_LOOP = Reply(554, "5.4.6", "Mail loop: already delivered to <{address}> here",
                          "RFC 5321 6.3")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients", "RFC 5321 4.5.3.1.8")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>", "RFC 5321 4.1.1.4", TEXT)
QUEUED = Reply(250, "2.0.0", "Ok: queued as {queue_id}", "RFC 5321 4.1.1.4")
CHUNK_OK = Reply(250, "2.0.0", "{octets} octets received", "RFC 3030 2")
BAD_CHUNK_SIZE = Reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]", "RFC 3030 2")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message exceeds the size limit of {limit} octets",
                        "RFC 1870 6")
LOOP_DETECTED = Reply(554, "5.4.6", "Too many Received headers: mail loop?", "RFC 5321 6.3")
BARE_LINE_ENDING = Reply(554, "5.6.0",
                         "Bare CR or LF in message text; lines must end with CRLF",
                         "RFC 5321 2.3.8")

# Other commands
OK = Reply(250, "2.0.0", "Ok", "RFC 5321 4.1.1.9")
RESET_OK = Reply(250, "2.0.0", "Ok, transaction reset", "RFC 5321 4.1.1.5")
CANNOT_VRFY = Reply(252, "2.5.2", "Cannot VRFY user, but will accept mail and attempt delivery",
                    "RFC 5321 3.5.3")
NO_EXPN = Reply(502, "5.5.1", "EXPN not available", "RFC 5321 3.5.2")
HELP = Reply(214, "2.0.0", "{text}", "RFC 5321 4.1.1.8")

# Errors in the command itself (RFC 5321 4.2.2, 4.5.3.1)
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognised: {verb}", "RFC 5321 4.2.4")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long", "RFC 5321 4.5.3.1.4")
TEXT_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long in message text (limit 1000 octets)",
                           "RFC 5321 4.5.3.1.6")
NOT_UTF8 = Reply(500, "5.5.2", "Commands must be ASCII, or UTF-8 with SMTPUTF8",
                 "RFC 6531 3.3")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands: {verb} not allowed in {state}",
                     "RFC 5321 4.1.4")
SYNTAX = Reply(501, "5.5.4", "Syntax: {syntax}", "RFC 5321 4.1.1")

# STARTTLS (RFC 3207)
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS", "RFC 3207 4", TLS)
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available", "RFC 3207 4")
ALREADY_TLS = Reply(503, "5.5.1", "Already using TLS", "RFC 3207 4.2")

# AUTH (RFC 4954)
AUTH_OK = Reply(235, "2.7.0", "Authentication successful", "RFC 4954 6")
AUTH_CHALLENGE = Reply(334, "", "{challenge}", "RFC 4954 4", SASL)
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid", "RFC 4954 6")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled", "RFC 4954 4")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode the response (base64)", "RFC 4954 4")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long",
                           "RFC 4954 4")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Mechanism not supported: {mechanism}",
                               "RFC 4954 4")
AUTH_NOT_AVAILABLE = Reply(503, "5.5.1", "AUTH not available here; use STARTTLS first",
                           "RFC 4954 4")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated", "RFC 4954 4")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required", "RFC 4954 6")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "{hostname} too many failed logins, closing "
                               "connection", "RFC 4954 4", CLOSE)

# Checks of incoming mail ([checks] enforce; checks.py). RFC 7372 gives SPF and DKIM their
# enhanced codes; the text says which check failed, for whom.
SPF_FAILED = Reply(550, "5.7.23", "SPF check of {domain} failed for {ip}{explanation} "
                   "(RFC 7208 8.4)", "RFC 7372 3.2, RFC 7208 8.4")
SPF_TEMPORARY = Reply(451, "4.7.24", "SPF check of {domain} could not be completed: "
                      "{reason}; try again later", "RFC 7372 3.2, RFC 7208 8.6")
DKIM_FAILED = Reply(550, "5.7.20", "No valid DKIM signature ({count} checked; {domain}: "
                    "{reason})", "RFC 7372 3.1")
DKIM_TEMPORARY = Reply(451, "4.7.5", "DKIM key of {domain} could not be looked up: {reason}; "
                       "try again later", "RFC 3463 3.8, RFC 6376 6.1.2")
DMARC_REJECTED = Reply(550, "5.7.1", "DMARC policy of {domain} (p=reject) refuses this "
                       "message: {reason}", "RFC 7489 10.3")
DMARC_SEVERAL_FROM = Reply(550, "5.7.1", "{count} From: fields: a message has exactly one "
                           "(RFC 5322 3.6); refused by DMARC policy", "RFC 7489 6.6.1")
DMARC_TEMPORARY = Reply(451, "4.7.1", "DMARC check of {domain} could not be completed: "
                        "{reason}; try again later", "RFC 7489 6.6.3, RFC 3463 3.8")
