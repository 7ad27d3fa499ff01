"""Where an address goes: a local mailbox, another domain's mail exchanger, or nowhere.

The one routing decision of the server: the protocol asks it at RCPT, the bounce builder
asks it for the sender of a failed message. Local domains and the users file are read here
and nowhere else.
"""
import enum
from typing import Callable, NamedTuple, Optional

from address import Address


class Destination(enum.Enum):
    LOCAL = "a local mailbox"
    REMOTE = "another domain (relayed)"
    UNKNOWN = "no such local mailbox"


class Route(NamedTuple):
    destination: Destination
    mailbox: Optional[Address] = None       # for LOCAL: the mailbox, its name lower-cased


class Router:
    def __init__(self, local_domains, has_mailbox: Callable[[str, str], bool]):
        self.local_domains = tuple(local_domains)
        self.has_mailbox = has_mailbox      # (local part, domain) -> exists?

    def is_local(self, domain):
        return domain.lower() in self.local_domains

    def postmaster(self, domain=None):
        """RFC 5321 4.5.1: postmaster@ every local domain exists; the first one by default."""
        return Address("postmaster", domain or self.local_domains[0])

    def route(self, address):
        if not self.is_local(address.domain):
            return Route(Destination.REMOTE)
        # A local part is matched as a whole: user%remote, "user@remote" and the like are
        # just unknown local names, never relayed.
        local_part = address.local_part.lower()
        if local_part == "postmaster" or self.has_mailbox(local_part, address.domain):
            return Route(Destination.LOCAL, Address(local_part, address.domain))
        return Route(Destination.UNKNOWN)
