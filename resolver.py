"""Next hops for a domain: static routes, address literals, MX records, the implicit MX.

    Resolver(config, log).next_hops("remote.test") -> [Hop("127.0.0.2", 25), ...]

The order is RFC 5321 5.1: MX records by preference, equal preferences in random order, and
the domain itself when it has no MX records (the implicit MX). A failure raises
`DeliveryError(reply, permanent)`. Only two answers are permanent: the domain does not exist
(NXDOMAIN), or it really has no MX and no address; and a null MX (RFC 7505). Everything else
a DNS server can do (time out, SERVFAIL, refuse, say something we cannot parse) is temporary,
so the mail waits and is tried again instead of bouncing.

`preload()` imports what dnspython would otherwise import on first use, for a server that
drops its privileges and may then be unable to read its own Python installation.
"""
import encodings.idna  # noqa: F401  (socket.getaddrinfo encodes host names with it)
import ipaddress
import random
import socket
from dataclasses import dataclass, field
from typing import NamedTuple

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset

# The record types a lookup here can meet: asked for, or met on the way (CNAME chains,
# the SOA of a negative answer, NS records in the authority section)
RECORD_TYPES = ("MX", "A", "AAAA", "CNAME", "SOA", "NS", "TXT", "PTR")
ADDRESS_TYPES = ("A", "AAAA")
# dnspython's refusals of a name's syntax (before any question is sent)
NAME_ERRORS = (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong,
               dns.name.IDNAException, dns.exception.SyntaxError, UnicodeError)


class DeliveryError(Exception):
    """No delivery now: `reply` says why; permanent=False means try again later."""

    def __init__(self, reply, permanent=False):
        super().__init__(reply)
        self.reply = reply
        self.permanent = permanent


class LookupFailed(Exception):
    """A DNS lookup that got no answer (a timeout, SERVFAIL, no nameserver): try later."""


class Answer(NamedTuple):
    """What a lookup found: the records (empty when there are none of that type), and
    whether the name exists at all (False: NXDOMAIN)."""
    records: tuple
    exists: bool = True


# Where a next hop came from (Hop.kind): MTA-STS (RFC 8461) applies to MX hosts only
ROUTE, LITERAL, MX, IMPLICIT_MX = "route", "address literal", "MX", "implicit MX"


@dataclass(frozen=True)
class Hop:
    """One address to connect to. `host` is the name it was found under (the MX name, the
    domain for an implicit MX, the route's host; the certificate is checked against it), and
    `kind` says how: neither takes part in comparisons, only the address does."""
    ip: str
    port: int
    host: str = field(default="", compare=False)
    kind: str = field(default=MX, compare=False)
    preference: int = field(default=0, compare=False)  # of its MX record; else 0

    def __str__(self):
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    def __iter__(self):
        """(ip, port), as the NamedTuple it once was unpacked (and as a socket address)."""
        return iter((self.ip, self.port))


class Resolver:
    def __init__(self, config, log, timeout=None):
        """`timeout`: seconds for one lookup (default [relay] connect_timeout; the checks of
        incoming mail ask with [checks] dns_timeout, since a client waits for them)."""
        self.config = config
        self.log = log
        self.dns = _dns_resolver(config.nameservers)
        self.dns.lifetime = timeout or config.connect_timeout
        self.dns.timeout = self.dns.lifetime

    def lookup(self, name, record_type):
        """Records of one type: an Answer, or LookupFailed when DNS gave none. The one way
        to ask DNS for everything else (SPF, DMARC, MTA-STS), on the same nameservers."""
        try:
            answer = self.dns.resolve(name, record_type, search=False)
        except dns.resolver.NXDOMAIN:
            return Answer((), exists=False)
        except dns.resolver.NoAnswer:
            return Answer(())
        except NAME_ERRORS:
            # a name DNS cannot have (an empty label, one over 63 octets, a name over 255:
            # RFC 1035 2.3.4) exists nowhere: no later try would find it
            return Answer((), exists=False)
        except dns.exception.DNSException as error:
            raise LookupFailed(f"{record_type} lookup for {name}: {_short_reason(error)}") \
                from None
        return Answer(tuple(answer))

    def next_hops(self, domain, tag=""):
        """[Hop] in the order to try them. Raises DeliveryError."""
        if domain in self.config.routes:
            host, port = self.config.routes[domain]
            self.log.info("%s route for %s: %s:%d", tag, domain, host, port)
            return [Hop(ip, port, host, ROUTE) for ip in _route_addresses(host)]
        if domain.startswith("["):                  # RFC 5321 4.1.3: an address literal
            literal = domain[1:-1]
            literal = literal[5:] if literal.lower().startswith("ipv6:") else literal
            return [Hop(literal, self.config.relay_port, literal, LITERAL)]
        if not self.dns.nameservers:
            raise DeliveryError(f"451 4.4.3 no DNS server to ask about {domain} "
                                "(none in [relay] nameservers or /etc/resolv.conf)")
        hosts = self.mx_hosts(domain, tag)
        if hosts is None:                           # RFC 5321 5.1: the implicit MX
            return self._implicit_mx(domain, tag)
        return self._mx_addresses(domain, hosts)

    def mx_hosts(self, domain, tag=""):
        """[(preference, MX host name)] in order: by preference, equal ones shuffled (RFC
        5321 5.1). None when the domain exists but has no MX records."""
        try:
            answer = self.dns.resolve(domain, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            raise DeliveryError(f"550 5.1.2 domain {domain} does not exist",
                                permanent=True) from None
        except dns.resolver.NoAnswer:
            return None
        except dns.exception.DNSException as error:    # timeout, SERVFAIL, no servers...
            raise DeliveryError(f"451 4.4.3 DNS lookup for {domain} failed: {error}") from None
        records = sorted(answer, key=lambda record: record.preference)
        self.log.info("%s MX lookup for %s: %s", tag, domain, ", ".join(
            f"{record.preference} {_host_name(record.exchange)}" for record in records))
        # RFC 7505 3: a null MX (exchange ".") means the domain accepts no mail
        usable = [record for record in records if record.exchange != dns.name.root]
        if not usable:
            raise DeliveryError(f"556 5.1.10 {domain} accepts no mail (null MX)",
                                permanent=True)
        ordered = []
        for preference in sorted({record.preference for record in usable}):
            same = [(preference, _host_name(record.exchange)) for record in usable
                    if record.preference == preference]
            random.shuffle(same)
            ordered += same
        return ordered

    def addresses(self, name):
        """(A and AAAA addresses of `name`, whether a lookup failed temporarily)."""
        found, failed = [], False
        for record_type in ADDRESS_TYPES:
            try:
                answer = self.dns.resolve(name, record_type, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue                            # a real answer: none of that type
            except dns.exception.DNSException:
                failed = True
                continue
            found += [record.address for record in answer]
        return found, failed

    def _implicit_mx(self, domain, tag):
        self.log.info("%s MX lookup for %s: none; trying its address (implicit MX)", tag, domain)
        found, failed = self.addresses(domain)
        if found:
            return [Hop(ip, self.config.relay_port, domain, IMPLICIT_MX) for ip in found]
        if failed:
            raise DeliveryError(f"451 4.4.3 DNS lookup for the address of {domain} failed")
        raise DeliveryError(f"550 5.4.4 {domain} has no MX and no address", permanent=True)

    def _mx_addresses(self, domain, hosts):
        hops, any_failed = [], False
        for preference, host in hosts:
            found, failed = self.addresses(host)
            any_failed |= failed
            hops += [Hop(ip, self.config.relay_port, host, MX, preference) for ip in found]
        if hops:
            return hops
        if any_failed:
            raise DeliveryError(f"451 4.4.3 DNS lookup for the mail exchangers of {domain} "
                                "failed")
        raise DeliveryError(f"451 4.4.4 no address for the mail exchangers of {domain}")


def _dns_resolver(nameservers):
    """A dnspython resolver: the given servers, or the system's (/etc/resolv.conf). With no
    usable system configuration, one without servers: every lookup is then a temporary
    failure ("no nameservers"), not a crash at start-up."""
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                for host, port in nameservers]
        return resolver
    try:
        return dns.resolver.Resolver(configure=True)
    except dns.resolver.NoResolverConfiguration:
        return dns.resolver.Resolver(configure=False)


def _short_reason(error):
    """What went wrong, in a few words: the text may reach a client (a 451) and a header,
    where dnspython's own (the nameserver's address, the seconds to the millisecond) has no
    place."""
    if isinstance(error, dns.exception.Timeout):
        return "timed out"
    if isinstance(error, dns.resolver.NoNameservers):
        return "no nameserver answered (SERVFAIL or refused)"
    return type(error).__name__


def _host_name(name):
    return name.to_text().rstrip(".").lower()


def _route_addresses(host):
    """A route's host: an IP address as it is, a name through the system (/etc/hosts too)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise DeliveryError(f"451 4.4.3 cannot resolve route host {host}: {error}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def preload():
    """Import now what a lookup would import on first use: the rdata class of each record
    type (dnspython loads `dns.rdtypes.ANY.MX` and the like lazily, and silently falls back
    to GenericRdata when it cannot), and whatever building and parsing a message needs."""
    for record_type in RECORD_TYPES:
        dns.rdata.get_rdata_class(dns.rdataclass.IN, dns.rdatatype.from_text(record_type))
    samples = {"MX": "10 mx.example.", "A": "192.0.2.1", "AAAA": "2001:db8::1",
               "CNAME": "other.example.", "NS": "ns.example.", "TXT": '"v=spf1 -all"',
               "PTR": "host.example.",
               "SOA": "ns.example. admin.example. 1 3600 600 86400 60"}
    query = dns.message.make_query("example.", "MX", use_edns=True)
    response = dns.message.make_response(query)
    for record_type, text in samples.items():
        response.answer.append(dns.rrset.from_text("example.", 60, "IN", record_type, text))
    dns.message.from_wire(response.to_wire())
    dns.message.from_wire(query.to_wire())
