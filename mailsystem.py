"""The parts every listener shares, and the one way mail enters the system.

A `MailSystem` owns the users file, the routing decision, the Maildir, the spool and the
queue runner that delivers it, and the TLS certificate. Listeners (smtpd.py) turn it into a
protocol `Policy`; the bounce builder and anything else that makes mail call `submit`.

    open_message(envelope, prefix) -> Draft      the text is written as it arrives
    open_message(envelope, prefix, checked=True) the same for mail checks.py checks: our
                                                 own Authentication-Results taken out of
                                                 every copy (unchecked mail: of the
                                                 Maildir copies, as it streams)
    submit(draft)                                durable in Maildir and spool, queue told
    submit_message(envelope, message)            the same for a message already in memory
"""
import ssl
import time

import authresults
import dkimsign
import dsn
import ids
import queuerunner
import state
from aliases import Aliases
from bounce import Bouncer, Notice
from checks import Checks
from config import ConfigError
from forwarding import Forwarder
from resolver import Resolver
from routing import Router
from spool import Spool
from storage import Draft, Maildir, StorageError
from users import Users


class MailSystem:
    def __init__(self, config, log):
        self.config = config
        self.log = log
        self.users = Users(config.users_file)
        aliases = Aliases(config.aliases_file, config.local_domains, log) \
            if config.aliases_file else None
        self.router = Router(config.local_domains, self.users.has_mailbox, aliases,
                             config.suffix_separators, log=log)
        self.maildir = Maildir(config.maildir)
        self.spool = Spool(config.spool)
        self.tls_context = make_tls_context(config)
        # [checks] (issue 15): asked of the server's own nameservers, as the relay is
        self.checks = Checks.from_config(
            config, Resolver(config, log, timeout=config.check_dns_timeout).lookup, log)
        # read now, as root: the keys are 0600 files (raises dkimsign.SigningKeyError)
        self.signer = dkimsign.Signer(config.dkim_keys, log) if config.dkim_keys else None
        self.queue = None
        self.outbound = None            # where spool names go: the queue runner, or a handoff
        self.bouncer = None             # bounce.Bouncer for the notices owed at delivery
        self._spool_lock = None

    def prepare(self):
        """Create the data directories that are missing; return those it created."""
        return self.maildir.prepare() + self.spool.prepare()

    def start(self):
        """Take the spool (one queue runner per spool) and start delivering it."""
        return self.take_spool().start_queue()

    def take_spool(self):
        """Take the spool's lock, or raise StorageError naming the process that has it, and
        the forwarding key kept there."""
        self._spool_lock = self.spool.lock()
        if self._spool_lock is None:
            raise spool_in_use(self.spool)
        self.router.forwarder = Forwarder.for_spool(self.spool.directory)
        return self

    def start_queue(self):
        """Start the queue runner: mail stored from now on is handed to it."""
        self.queue = queuerunner.QueueRunner(self.config, self.spool, self.router,
                                             self.submit_message, self.log, self.signer)
        self.outbound = self.queue
        self.bouncer = self.queue.bouncer
        self.queue.start()
        return self

    def hand_off_to(self, outbound):
        """Mail stored here goes to a queue runner in another process: `outbound.enqueue(
        spool_name)` (processes.py). Notices this process owes are built here."""
        self.outbound = outbound
        self.bouncer = Bouncer(self.config.hostname, self.router, self.submit_message,
                               self.log)

    def leave_spool(self):
        """Close this process's copy of the spool lock (a forked process: the lock stays
        with the process that took it)."""
        if self._spool_lock:
            self._spool_lock.close()
            self._spool_lock = None

    def stop(self):
        if self.queue:
            self.queue.stop()
        self.leave_spool()

    def remove_leftovers(self, started):
        """What a crash left behind: stale Maildir tmp/ files, spool temporaries and state
        files without their spool file. Each removal is logged."""
        for path in self.maildir.remove_stale() + self.spool.remove_leftovers(started):
            self.log.info("removed a leftover of an earlier run: %s", path)

    def policy(self, auth_required=False):
        """What the protocol needs, for a listener (auth_required: the submission port)."""
        config = self.config
        return state.Policy(
            hostname=config.hostname,
            router=self.router,
            open_message=self.open_message,
            submit=self.submit,
            relay_networks=config.relay_networks,
            max_message_size=config.max_message_size,
            max_recipients=config.max_recipients,
            max_errors=config.max_errors,
            max_rejected_recipients=config.max_rejected_recipients,
            tls_available=self.tls_context is not None,
            check_password=self.users.check_password,
            auth_plaintext=config.auth_allow_plaintext,
            auth_required=auth_required,
            max_auth_failures=config.auth_max_failures,
            auth_failure_delay=config.auth_failure_delay,
            may_send_as=self.router.may_send_as if config.sender_login_match else None,
            checks=self.checks,
        )

    # The one way in

    def open_message(self, envelope, prefix=b"", checked=False):
        """A Draft that writes the text, as it arrives, to the files the router plans for it
        (Maildir copies, the spool file, forwards). Authentication-Results fields with our
        authserv-id that came with a message are forged or stale (RFC 8601 5): they are
        removed from every Maildir copy, and for `checked` mail (from outside) from every
        copy. Raises StorageError."""
        plan = self.router.plan(envelope)
        for forward in plan.forwards:
            forward.envelope.queue_id = ids.queue_id()
            self.log.info("[%s] %s forwarded as %s to %s", envelope.queue_id,
                          forward.delivered_to.text, forward.envelope.queue_id,
                          ", ".join(f"<{r.address.text}>" for r in forward.envelope.recipients))
        try:
            return Draft(self.maildir, self.spool, plan, prefix,
                         header_filter=self._own_fields if checked else None,
                         local_filter=self._own_fields)
        except StorageError as problem:
            self.log.error("[%s] cannot store a message: %s", envelope.queue_id, problem)
            raise

    def _own_fields(self):
        return authresults.OwnFields(self.config.hostname)

    def submit(self, draft, headers=b""):
        """Make the message durable (RFC 5321 6.1), then tell the queue about its remote
        recipients. `headers` is the message's header block (for a notice to the sender).
        Raises StorageError, logged here once."""
        try:
            spool_names = draft.commit()
        except StorageError as problem:
            self.log.error("[%s] cannot store a message: %s", draft.envelope.queue_id,
                           problem)
            raise
        for spool_name in spool_names if self.outbound else ():
            self.outbound.enqueue(spool_name)
        self._notify_delivered(draft.envelope, headers)
        return spool_names

    def _notify_delivered(self, envelope, headers):
        """RFC 3461 4.1: a local recipient that asked NOTIFY=SUCCESS hears of its delivery
        (bounce.Bouncer applies dsn.wants; a notice is never sent for <>)."""
        if not self.bouncer or not any("NOTIFY" in recipient.parameters
                                     for recipient in envelope.local_recipients):
            return
        notices = [Notice(recipient, dsn.DELIVERED, "2.0.0", "250 2.0.0 delivered to mailbox")
                   for recipient in envelope.local_recipients]
        try:
            self.bouncer.notify(envelope, notices, _with_line_end(headers), time.time())
        except (OSError, StorageError) as problem:      # the mail itself is delivered
            self.log.error("[%s] cannot send the delivered notice: %s", envelope.queue_id,
                           problem)

    def submit_message(self, envelope, message):
        """Submit a message that is already whole in memory (a bounce): CRLF line ends, not
        dot-stuffed. Gives it a queue id if it has none."""
        envelope.queue_id = envelope.queue_id or ids.queue_id()
        if not message.endswith(b"\r\n"):
            message += b"\r\n"
        draft = self.open_message(envelope)
        draft.write(message)
        return self.submit(draft)


def spool_in_use(spool):
    """The StorageError for a spool another process holds, naming it."""
    owner = spool.owner()
    if owner and not spool.running(owner):
        return StorageError(f"spool {spool.directory} is in use by the processes of a server "
                            f"that has ended (pid {owner}); they stop within a few seconds")
    return StorageError(f"spool {spool.directory} is in use by process {owner}")


def _with_line_end(headers):
    """The header block as a notice quotes it: CRLF after its last line."""
    return headers if not headers or headers.endswith(b"\r\n") else headers + b"\r\n"


def make_tls_context(config):
    """The server side of STARTTLS, or None when no certificate is configured."""
    if not (config.tls_cert or config.tls_key):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ConfigError("[tls] cert and key: set both, or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"[tls] cert/key {config.tls_cert}, {config.tls_key}: "
            f"{getattr(error, 'strerror', None) or error}") from None
    return context
