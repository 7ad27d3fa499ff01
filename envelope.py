"""The envelope of one mail transaction (RFC 5321 2.3.1, 3.3): who sent it, to whom, and how.

The protocol builds one at MAIL and RCPT (state.py) and replaces it whole on RSET, HELO/EHLO
and at the end of the data; the disk records it as commands in a spool file (spool.py); the
relay reads it back and replays it (relay.py); a bounce is a new one (bounce.py). Addresses
are `address.Address` values, never strings to split again.
"""
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from address import Address


@dataclass(frozen=True)
class Client:
    """The SMTP client a transaction came from."""
    ip: str
    port: int


class Expansion(NamedTuple):
    """Where an alias leads (routing.py): the local mailboxes and the remote addresses."""
    alias: Address                      # the name that matched (team@test.ru)
    mailboxes: tuple                    # local mailboxes (Address), each once
    forwards: tuple                     # remote addresses (Address): forwarded there
    rewrite: bool = True                # forwards leave with a rewritten sender


@dataclass
class Recipient:
    """One forward path (RFC 5321 4.1.1.3) and where it goes."""
    address: Address                    # as the client gave it (the domain lower-cased)
    parameters: dict = field(default_factory=dict)     # RCPT parameters (RFC 5321 4.1.2)
    mailbox: Optional[Address] = None   # the local mailbox it is addressed to directly
    expansion: Optional[Expansion] = None   # or, through an alias, where it leads

    @property
    def is_local(self):
        """Handled here (a mailbox or an alias); otherwise relayed as given."""
        return self.mailbox is not None or self.expansion is not None

    @property
    def key(self):
        """What makes two recipients the same: the mailbox, the alias, or the address."""
        if self.mailbox:
            return self.mailbox.text
        return (self.expansion.alias if self.expansion else self.address).text


@dataclass
class Envelope:
    reverse_path: Address               # NULL_ADDRESS for <> (RFC 5321 4.5.5)
    helo: str                           # the name the client gave in HELO/EHLO
    client: Optional[Client]            # None: written by this server itself (a bounce)
    parameters: dict = field(default_factory=dict)     # MAIL parameters (RFC 5321 4.1.1.2)
    recipients: list = field(default_factory=list)     # [Recipient], in RCPT order
    queue_id: str = ""                  # given when the message text begins

    def add(self, recipient):
        """Add a recipient; the same mailbox twice gets one copy. False if it was there."""
        if any(other.key == recipient.key for other in self.recipients):
            return False
        self.recipients.append(recipient)
        return True

    @property
    def local_recipients(self):
        return [recipient for recipient in self.recipients if recipient.is_local]

    @property
    def remote_recipients(self):
        return [recipient for recipient in self.recipients if not recipient.is_local]

    @property
    def needs_smtputf8(self):
        """RFC 6531 3.2: an address that only a next hop offering SMTPUTF8 can take (a
        non-ASCII local part; domains travel as A-labels)."""
        return not self.reverse_path.is_ascii or \
            any(not recipient.address.is_ascii for recipient in self.recipients)

    @property
    def spool_name(self):
        """`<client port>-<queue id>`, or `local-<queue id>` for mail this server wrote."""
        origin = self.client.port if self.client else "local"
        return f"{origin}-{self.queue_id}"
