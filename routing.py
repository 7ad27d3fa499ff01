"""Where an address goes: local mailboxes, other domains, or nowhere.

The one routing decision of the server. The protocol asks it at RCPT (`route`), and at MAIL
after AUTH (`may_send_as`); the bounce builder asks it for the sender of a failed message;
the mail system asks it which files a message is written to (`plan`). Local domains, the
users file and the aliases file are read here and nowhere else.

Lookup order for a local address (issue 14, as Postfix's virtual_alias_maps and chasquid):
the exact alias, then the name without its suffix (alice+lists is alice), then the users,
then the domain's catch-all; postmaster always exists (RFC 5321 4.5.1). An address this
server rewrote when forwarding (forwarding.py) goes back to the sender it stands for.
"""
import enum
from typing import Callable, NamedTuple, Optional

from address import Address
from aliases import lookup_key
from envelope import Envelope, Expansion, Recipient


class Destination(enum.Enum):
    LOCAL = "handled here (mailboxes, or an alias)"
    REMOTE = "another domain (relayed)"
    UNKNOWN = "no such local mailbox"


class Route(NamedTuple):
    destination: Destination
    mailbox: Optional[Address] = None       # LOCAL, addressed directly: the mailbox
    expansion: Optional[Expansion] = None   # LOCAL through an alias: what it leads to

    def recipient(self, address, parameters=None):
        """The envelope.Recipient of `address` routed this way."""
        return Recipient(address, dict(parameters or {}), self.mailbox, self.expansion)

    @property
    def mailboxes(self):
        if self.mailbox:
            return (self.mailbox,)
        return self.expansion.mailboxes if self.expansion else ()


class LocalCopy(NamedTuple):
    """One Maildir file, hard-linked into each of its mailboxes' new/."""
    mailboxes: tuple
    delivered_to: Optional[Address]         # the Delivered-To: it carries (None: none)


class ForwardCopy(NamedTuple):
    """A spool file of its own for an alias's remote targets, with the sender rewritten."""
    envelope: Envelope
    delivered_to: Address


class Plan(NamedTuple):
    """The files one accepted message is written to."""
    envelope: Envelope                      # the transaction as accepted
    local: tuple                            # LocalCopy
    relayed: Optional[Envelope]             # its remote recipients as given, or None
    forwards: tuple                         # ForwardCopy


class Router:
    def __init__(self, local_domains, has_mailbox: Callable[[str, str], bool],
                 aliases=None, suffix_separators="", forwarder=None, log=None):
        self.local_domains = tuple(local_domains)
        self.has_mailbox = has_mailbox      # (local part, domain) -> exists?
        self.aliases = aliases              # aliases.Aliases, or None
        self.suffix_separators = suffix_separators
        self.forwarder = forwarder          # forwarding.Forwarder, or None
        self.log = log
        self._dead_aliases = set()          # aliases already logged as leading nowhere

    def is_local(self, domain):
        return domain.lower() in self.local_domains

    def postmaster(self, domain=None):
        """RFC 5321 4.5.1: postmaster@ every local domain exists; the first one by default."""
        return Address("postmaster", domain or self.local_domains[0])

    # ---- route: one address

    def route(self, address):
        if not self.is_local(address.domain):
            return Route(Destination.REMOTE)
        # A local part is matched as a whole: user%remote, "user@remote" and the like are
        # just unknown local names, never relayed.
        local_part, domain = address.local_part.lower(), address.domain
        original = self.forwarder.reverse(address) if self.forwarder else None
        if original and self.is_local(original.domain):     # a rewritten sender of ours:
            return self.route(original)                     # back to the real one
        if original:
            return Route(Destination.LOCAL, expansion=Expansion(address, (), (original,),
                                                                rewrite=False))
        names = [local_part] + [base for base in [self.without_suffix(local_part)]
                                if base != local_part]
        for name in names:
            expansion = self._expand_alias(name, domain, address)
            if expansion:
                return Route(Destination.LOCAL, expansion=expansion)
        for name in names:
            if name == "postmaster" or self.has_mailbox(name, domain):
                return Route(Destination.LOCAL, mailbox=Address(name, domain))
        catch_all = self._expand_key(f"*@{domain}", domain, address)
        if catch_all:
            return Route(Destination.LOCAL, expansion=catch_all)
        return Route(Destination.UNKNOWN)

    def without_suffix(self, local_part):
        """alice+lists -> alice, at the first suffix separator (empty ones: off)."""
        cut = [local_part.find(separator) for separator in self.suffix_separators
               if local_part.find(separator) > 0]
        return local_part[:min(cut)] if cut else local_part

    def _entries(self):
        return self.aliases.entries if self.aliases else {}

    def _expand_alias(self, name, domain, address):
        entry = lookup_key(self._entries(), name, domain)
        return self._expansion(entry, domain, address) if entry else None

    def _expand_key(self, key, domain, address):
        entry = self._entries().get(key)
        return self._expansion(entry, domain, address) if entry else None

    def _expansion(self, entry, domain, address):
        mailboxes, forwards = {}, {}
        self._collect(entry.targets, domain, mailboxes, forwards, set())
        if not mailboxes and not forwards:  # no target leads anywhere: skipped, unknown
            self._log_dead(entry)
            return None
        return Expansion(address, tuple(mailboxes), tuple(forwards))

    def _log_dead(self, entry):
        if self.log and entry.line not in self._dead_aliases:
            self._dead_aliases.add(entry.line)
            self.log.warning("aliases file line %d: no target is a mailbox or an address; "
                             "the alias is skipped", entry.line)

    def _collect(self, targets, domain, mailboxes, forwards, seen):
        """Follow targets to mailboxes and remote addresses (the file was checked for loops
        and depth when read; `seen` keeps a target counted once)."""
        for target in targets:
            if isinstance(target, str):
                target = Address(target, domain)
            key = target.text.lower()
            if key in seen:
                continue
            seen.add(key)
            if not self.is_local(target.domain):
                forwards[target] = None
                continue
            entry = lookup_key(self._entries(), target.local_part, target.domain)
            if entry:
                self._collect(entry.targets, target.domain, mailboxes, forwards, seen)
            elif target.local_part.lower() == "postmaster" or \
                    self.has_mailbox(target.local_part, target.domain):
                mailboxes[Address(target.local_part.lower(), target.domain)] = None

    # ---- may_send_as: MAIL after AUTH

    def may_send_as(self, login, address):
        """With sender_login_match (Postfix's reject_sender_login_mismatch): an authenticated
        client sends as <>, as its own address, or as an alias that leads to it."""
        if address.is_null:
            return True
        local_part, _, domain = login.lower().partition("@")
        return any(box.local_part == local_part and (not domain or box.domain == domain)
                   for box in self.route(address).mailboxes)

    # ---- plan: the files of one message

    def plan(self, envelope):
        """Which files an accepted message goes to. Every mailbox gets one copy (RFC 5321
        3.3: the same mailbox twice, directly or through aliases, is one delivery); mailboxes
        addressed directly share one file; a mailbox reached through an alias gets its own,
        with a Delivered-To: naming it (as Postfix writes it); each alias with remote
        targets gets a spool file of its own, the sender rewritten into its domain."""
        seen = set()
        direct = [recipient.mailbox for recipient in envelope.recipients
                  if recipient.mailbox and _first(seen, recipient.mailbox)]
        local = [LocalCopy(tuple(direct), None)] if direct else []
        forwards = []
        for recipient in envelope.recipients:
            expansion = recipient.expansion
            if not expansion:
                continue
            local += [LocalCopy((box,), box) for box in expansion.mailboxes if _first(seen, box)]
            targets = [address for address in expansion.forwards if _first(seen, address)]
            if targets:
                forwards.append(ForwardCopy(self._forward_envelope(envelope, expansion,
                                                                   targets), expansion.alias))
        remote = envelope.remote_recipients
        relayed = Envelope(envelope.reverse_path, envelope.helo, envelope.client,
                           envelope.parameters, remote, envelope.queue_id) if remote else None
        return Plan(envelope, tuple(local), relayed, tuple(forwards))

    def _forward_envelope(self, envelope, expansion, targets):
        sender = envelope.reverse_path
        if expansion.rewrite and self.forwarder:
            sender = self.forwarder.rewrite(sender, expansion.alias.domain)
        parameters = {keyword: value for keyword, value in envelope.parameters.items()
                      if keyword in ("BODY", "SMTPUTF8")}
        return Envelope(sender, envelope.helo, envelope.client, parameters,
                        [Recipient(address) for address in targets])


def _first(seen, address):
    """True the first time an address is met (and it is now remembered)."""
    key = address.text.lower()
    if key in seen:
        return False
    seen.add(key)
    return True


def delivered_to_loop(recipients, delivered_to):
    """RFC 5321 6.3: the first recipient this message was already delivered to here, by the
    Delivered-To: headers it carries (a set of lower-cased addresses); None when none."""
    for recipient in recipients:
        names = [recipient.mailbox] if recipient.mailbox else []
        if recipient.expansion:
            names += [recipient.expansion.alias, *recipient.expansion.mailboxes]
        for name in names:
            if name.text.lower() in delivered_to:
                return name
    return None
