"""What TLS a delivery to one domain needs: its MTA-STS policy (RFC 8461) and the TLS memory.

    tls = TlsPolicy.for_config(config, resolver, log)   # once, in the queue runner
    rules = tls.for_domain("remote.test", tag)          # once per transaction
    rules.refusal(hop)            # a reply when `hop` may not be used at all, else None
    rules.first_attempt()         # VERIFIED, TLS or PLAIN: what to try on a first connection
    rules.accepts(hop, level)     # may a connection at `level` carry the mail? (quiet)
    rules.shortfall(hop, level)   # the 4xx reply when it may not (logged), else None
    rules.delivered(hop, level)   # the mail went at `level`: the memory learns it

The relay tries verified TLS first whenever it knows something that could ask for it (a
policy, a memory); a certificate that does not check out aborts the handshake, so the
relay falls back to unchecked TLS on a new connection, and to clear text on another when
TLS does not work at all, as long as `accepts` says that is still good enough.

MTA-STS applies to MX hosts only (Hop.kind MX or IMPLICIT_MX), never to static routes or
address literals; the TLS memory applies to every next hop of the domain, and is kept
whatever `[relay] mta_sts` says (that switches MTA-STS alone).
"""
import ssl

import mtasts
import tlsmemory
from resolver import IMPLICIT_MX, MX
from smtpclient import opportunistic_context, verifying_context
from tlsmemory import PLAIN, TLS, VERIFIED, WHAT_LEVEL_MEANS, rank

TLS_REFUSAL = "451 4.7.5"               # RFC 3463 4.7.5: cryptographic failure
MTA_STS_KINDS = (MX, IMPLICIT_MX)       # RFC 8461 4.1: the policy names MX hosts
# What a connection at each level gave, in the log and the replies
CONNECTION_GAVE = {PLAIN: "clear text", TLS: "TLS with an unchecked certificate",
                   VERIFIED: "verified TLS"}


class TlsPolicy:
    """The relay's TLS contexts, MTA-STS client and TLS memory (either may be None)."""

    def __init__(self, config, log, mta_sts=None, memory=None):
        self.config = config
        self.log = log
        self.mta_sts = mta_sts
        self.memory = memory
        self.verifying = verifying_context(config.relay_ca_file)
        self.opportunistic = opportunistic_context()

    @classmethod
    def for_config(cls, config, resolver, log):
        """The TLS memory always (turning MTA-STS off must not switch off what protects
        every domain that ever took verified TLS); MTA-STS with [relay] mta_sts."""
        memory = tlsmemory.TlsMemory(config.spool, log)
        if not config.mta_sts:
            return cls(config, log, None, memory)
        sts = mtasts.MtaSts(resolver, verifying_context(config.relay_ca_file), config.spool,
                            log, config.trace, timeout=config.connect_timeout)
        return cls(config, log, sts, memory)

    def for_domain(self, domain, tag=""):
        """The DomainTls of one transaction: the policy is looked up now (RFC 8461 5.1:
        before each delivery), except for a route or an address literal."""
        policy = None
        routed = domain in self.config.routes or domain.startswith("[")
        if self.mta_sts is not None and not routed:
            policy = self.mta_sts.policy_for(domain, tag)
        remembered = self.memory.level(domain) if self.memory is not None else PLAIN
        return DomainTls(self, domain, policy, remembered, tag)

    def context(self, level):
        return self.verifying if level == VERIFIED else self.opportunistic


class DomainTls:
    def __init__(self, owner, domain, policy, remembered, tag):
        self.owner = owner
        self.log = owner.log
        self.domain = domain
        self.policy = policy
        self.remembered = remembered
        self.tag = tag

    def _mode(self, hop):
        """The policy's mode for `hop`: enforce, testing, or None when none applies."""
        if self.policy is None or self.policy.mode == mtasts.NONE:
            return None
        return self.policy.mode if hop.kind in MTA_STS_KINDS else None

    def first_attempt(self):
        if self.owner.config.relay_tls == "no":
            return PLAIN
        if self.owner.memory is None and self.policy is None:
            return TLS                  # nothing would ask for a checked certificate
        return VERIFIED

    def refusal(self, hop):
        """RFC 8461 4.1: under `mode: enforce` only an MX the policy names may be used."""
        mode = self._mode(hop)
        if mode is None or self.policy.allows(hop.host):
            return None
        what = (f"{hop.host} ({hop}) is not an MX host of the MTA-STS policy of {self.domain} "
                f"(id {self.policy.id}, mx {', '.join(self.policy.mx)}; RFC 8461 4.1)")
        if mode == mtasts.TESTING:
            self.log.info("%s MTA-STS testing: would have skipped %s (RFC 8461 5)",
                          self.tag, what)
            return None
        self.log.info("%s MTA-STS enforce: skipping %s", self.tag, what)
        return f"{TLS_REFUSAL} {what}"

    def accepts(self, hop, level):
        return self._enforced(hop, level) is None and self._remembered(level) is None

    def shortfall(self, hop, level):
        """The reply refusing a connection at `level` to `hop`, or None; under
        `mode: testing`, what would have been refused is logged (RFC 8461 5)."""
        reply = self._enforced(hop, level) or self._remembered(level)
        if reply:
            self.log.info("%s %s: %s", self.tag, hop, reply)
            return reply
        if self._mode(hop) == mtasts.TESTING and level != VERIFIED:
            self.log.info("%s MTA-STS testing: %s (%s) would have failed: %s instead of a "
                          "certificate valid for it (RFC 8461 5, 4.2)", self.tag,
                          hop.host, hop, CONNECTION_GAVE[level])
        return None

    def _enforced(self, hop, level):
        if self._mode(hop) != mtasts.ENFORCE or level == VERIFIED:
            return None
        return (f"{TLS_REFUSAL} MTA-STS policy of {self.domain} (mode enforce) requires TLS "
                f"with a certificate valid for {hop.host}; {hop} gave {CONNECTION_GAVE[level]} "
                "(RFC 8461 4.2, 5)")

    def _remembered(self, level):
        if rank(level) >= rank(self.remembered):
            return None
        return (f"{TLS_REFUSAL} {self.domain} has taken mail over "
                f"{WHAT_LEVEL_MEANS[self.remembered]} before; refusing to downgrade")

    def delivered(self, hop, level):
        memory = self.owner.memory
        if memory is None or level == PLAIN:    # only TLS is worth remembering
            return
        try:
            risen = memory.record(self.domain, level)
        except OSError as error:
            self.log.error("%s cannot save the TLS memory (%s): %s", self.tag, memory.path,
                           error)
            return
        if risen:
            self.log.info("%s TLS memory: %s now takes mail over %s (via %s); less is refused "
                          "from now on", self.tag, self.domain, WHAT_LEVEL_MEANS[level], hop)


def verification_failed(error):
    """The handshake failed because the certificate did not check out (not because TLS
    itself did not work)."""
    return isinstance(error, ssl.SSLCertVerificationError)
