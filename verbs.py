"""Every command the server knows: its syntax, the RFC section that defines it, and one line
of help. HELP reads this, the 501 syntax replies quote it, and --fsm names its edges by it;
where each verb is allowed is the transition table's business (state.py).
"""
from typing import NamedTuple


class Verb(NamedTuple):
    syntax: str
    rfc: str
    summary: str


VERBS = {
    "HELO": Verb("HELO <domain>", "RFC 5321 4.1.1.1", "identify yourself (plain SMTP)"),
    "EHLO": Verb("EHLO <domain>", "RFC 5321 4.1.1.1",
                 "identify yourself and list the server's extensions (ESMTP)"),
    "MAIL": Verb("MAIL FROM:<reverse-path> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8] "
                 "[RET=FULL|HDRS] [ENVID=id]", "RFC 5321 4.1.1.2",
                 "start a mail transaction with the sender's address (<> for bounces)"),
    "RCPT": Verb("RCPT TO:<forward-path> [NOTIFY=NEVER|SUCCESS,FAILURE,DELAY] "
                 "[ORCPT=rfc822;address]", "RFC 5321 4.1.1.3", "add one recipient"),
    "DATA": Verb("DATA", "RFC 5321 4.1.1.4",
                 "send the message; end it with a line holding only a period"),
    "BDAT": Verb("BDAT <size> [LAST]", "RFC 3030 2",
                 "send the next <size> octets of the message, exactly; LAST ends it"),
    "RSET": Verb("RSET", "RFC 5321 4.1.1.5", "abort the current mail transaction"),
    "VRFY": Verb("VRFY <user>", "RFC 5321 4.1.1.6",
                 "ask whether a user exists (this server never confirms: 252)"),
    "EXPN": Verb("EXPN <list>", "RFC 5321 4.1.1.7", "expand a mailing list (not offered)"),
    "HELP": Verb("HELP [command]", "RFC 5321 4.1.1.8", "this help"),
    "NOOP": Verb("NOOP", "RFC 5321 4.1.1.9", "do nothing; the server answers 250"),
    "QUIT": Verb("QUIT", "RFC 5321 4.1.1.10", "end the session"),
    "STARTTLS": Verb("STARTTLS", "RFC 3207 4",
                     "switch the connection to TLS; then start over with EHLO"),
    "AUTH": Verb("AUTH PLAIN|LOGIN [initial-response]", "RFC 4954 4",
                 "log in with a user name and password (after STARTTLS)"),
}
