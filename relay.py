"""Outbound delivery: the queue runner, MX resolution, an SMTP client on a raw socket, bounces.

The spool is the queue. `QueueRunner` keeps a schedule of spool files; when one is due, its
pending recipients are grouped by domain and each group is one job for a worker thread: one
SMTP transaction per domain (RFC 5321 4.5.4). After each job the recipients' states are
saved beside the spool file (storage.write_state), so a crash at any moment neither loses a
message nor sends a delivered recipient again. A message is removed from the spool when every
recipient is delivered or bounced.

    recipient: pending --2xx--> done
               pending --4xx/network--> pending (next attempt per [relay] retry)
               pending --5xx, or older than max_queue_age--> failed (a DSN to the sender)
"""
import email.policy
import email.utils
import heapq
import ipaddress
import queue
import random
import socket
import ssl
import threading
import time
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import NamedTuple

import dns.exception
import dns.nameserver
import dns.resolver

from storage import StorageError

PENDING, DONE, FAILED = "pending", "done", "failed"
MAX_REPLY_SIZE = 65536          # a remote reply longer than this is a protocol error


class Outcome(NamedTuple):
    """What happened to one recipient in one attempt."""
    status: str                 # DONE, PENDING (try again later) or FAILED (bounce)
    reply: str                  # the remote reply or our own explanation, one line
    remote: str = ""            # the host that gave it


class DeliveryError(Exception):
    """A whole group failed: permanent=False means try again later."""

    def __init__(self, reply, permanent=False):
        super().__init__(reply)
        self.reply = reply
        self.permanent = permanent


# ---------------------------------------------------------------------------------------
# Next hops: static routes, MX records (RFC 5321 5.1), the implicit MX, null MX (RFC 7505)


class Resolver:
    def __init__(self, config, log):
        self.config = config
        self.log = log
        self.dns = dns.resolver.Resolver(configure=not config.nameservers)
        if config.nameservers:
            self.dns.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                    for host, port in config.nameservers]
        self.dns.lifetime = config.connect_timeout
        self.dns.timeout = config.connect_timeout

    def next_hops(self, domain, tag=""):
        """[(ip, port)] in the order to try them. Raises DeliveryError."""
        if domain in self.config.routes:
            host, port = self.config.routes[domain]
            self.log.info("%s route for %s: %s:%d", tag, domain, host, port)
            return [(address, port) for address in self._route_addresses(host)]
        if domain.startswith("["):                  # RFC 5321 4.1.3: an address literal
            literal = domain[1:-1]
            literal = literal[5:] if literal.lower().startswith("ipv6:") else literal
            return [(literal, self.config.relay_port)]
        hops = []
        for name in self.mx_hosts(domain, tag):
            hops += [(address, self.config.relay_port) for address in self.addresses(name)]
        if not hops:
            raise DeliveryError(f"451 4.4.4 no address for the mail exchangers of {domain}")
        return hops

    def mx_hosts(self, domain, tag=""):
        """Host names in order: by preference, equal preferences shuffled (RFC 5321 5.1)."""
        try:
            answer = self.dns.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise DeliveryError(f"550 5.1.2 domain {domain} does not exist", permanent=True)
        except dns.resolver.NoAnswer:
            # RFC 5321 5.1: no MX records: the domain itself is the implicit MX, if it has
            # an address record.
            self.log.info("%s MX lookup for %s: none; trying its address (implicit MX)",
                          tag, domain)
            if not self.addresses(domain):
                raise DeliveryError(f"550 5.4.4 {domain} has no MX and no address",
                                    permanent=True)
            return [domain]
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as error:
            raise DeliveryError(f"451 4.4.3 DNS lookup for {domain} failed: {error}")
        except dns.exception.DNSException as error:     # a name DNS cannot even ask for
            raise DeliveryError(f"550 5.1.2 bad domain {domain}: {error}", permanent=True)
        records = sorted(answer, key=lambda record: record.preference)
        if len(records) == 1 and str(records[0].exchange) == ".":
            # RFC 7505 3: a null MX: this domain accepts no mail
            raise DeliveryError(f"556 5.1.10 {domain} accepts no mail (null MX)",
                                permanent=True)
        ordered = []
        for preference in sorted({record.preference for record in records}):
            same = [str(r.exchange).rstrip(".") for r in records if r.preference == preference]
            random.shuffle(same)
            ordered += same
        self.log.info("%s MX lookup for %s: %s", tag, domain, ", ".join(
            f"{r.preference} {str(r.exchange).rstrip('.')}" for r in records))
        return ordered

    def addresses(self, name):
        """A and AAAA records of a host; [] when it has none or the lookup fails."""
        found = []
        for record_type in ("A", "AAAA"):
            try:
                found += [record.address for record in self.dns.resolve(name, record_type)]
            except dns.exception.DNSException:
                continue
        return found

    def _route_addresses(self, host):
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise DeliveryError(f"451 4.4.3 cannot resolve route host {host}: {error}")
        return list(dict.fromkeys(info[4][0] for info in infos))


# ---------------------------------------------------------------------------------------
# The SMTP client, hand-written on a socket


class SmtpClient:
    """One outbound connection: commands out, whole replies in (RFC 5321 4.2.1).
    Every step has its own timeout (RFC 5321 4.5.3.2)."""

    def __init__(self, address, config, log, tag):
        self.config = config
        self.log = log
        self.tag = f"{tag} {address[0]}:{address[1]}"
        self.buffer = b""
        self.sock = socket.create_connection(address, timeout=config.connect_timeout)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def start_tls(self):
        """RFC 3207: opportunistic TLS. The certificate is not checked (there is no way to
        know the right name for an MX without DANE or MTA-STS); the point is that nobody
        on the path can read the mail."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.buffer = b""                   # RFC 3207 4.2: nothing read before TLS counts
        self.sock = context.wrap_socket(self.sock)
        self.log.info("%s TLS established: %s, %s", self.tag, self.sock.version(),
                      self.sock.cipher()[0])

    def reply(self, timeout):
        """(code, "text of all lines") of the next reply."""
        self.sock.settimeout(timeout)
        lines = []
        while True:
            line = self._line()
            self.log.info("%s <- %s", self.tag, line)
            code = line[:3]
            if not (code.isascii() and code.isdigit()) or line[3:4] not in ("", " ", "-"):
                raise DeliveryError(f"451 4.5.0 protocol error from remote: {line[:80]!r}")
            lines.append(line)
            if line[3:4] != "-":
                return int(line[:3]), " / ".join(lines)

    def _line(self):
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_REPLY_SIZE:
                raise DeliveryError("451 4.5.0 remote reply line too long")
            data = self.sock.recv(4096)
            if not data:
                raise DeliveryError("451 4.4.2 remote closed the connection")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def command(self, line, timeout=None):
        self.log.info("%s -> %s", self.tag, line)
        self.sock.settimeout(self.config.command_timeout)
        self.sock.sendall(line.encode("ascii") + b"\r\n")
        return self.reply(timeout or self.config.command_timeout)

    def send_data(self, data):
        """The message text (already dot-stuffed) and the final dot (RFC 5321 4.1.1.4)."""
        self.log.info("%s -> (message text, %d octets)", self.tag, len(data))
        self.sock.settimeout(self.config.command_timeout)    # RFC 5321 4.5.3.2.5: data block
        self.sock.sendall(data)
        self.log.info("%s -> .", self.tag)
        self.sock.sendall(b".\r\n")
        return self.reply(self.config.data_timeout)         # RFC 5321 4.5.3.2.6: after the dot


def parse_extensions(ehlo_text):
    """EHLO reply text -> {"SIZE": "1000", "8BITMIME": "", ...}."""
    extensions = {}
    for line in ehlo_text.split(" / ")[1:]:
        keyword, _, value = line[4:].partition(" ")
        extensions[keyword.upper()] = value
    return extensions


# ---------------------------------------------------------------------------------------
# One SMTP transaction for the recipients of one domain


class Transaction:
    """Deliver `recipients` of `message` (a storage.Spooled) to one domain's next hops."""

    def __init__(self, config, resolver, log, message, domain, recipients):
        self.config = config
        self.resolver = resolver
        self.log = log
        self.message = message
        self.domain = domain
        self.recipients = recipients
        self.tag = f"[{message.queue_id}]"

    def run(self):
        """{recipient: Outcome}. Never raises."""
        try:
            hops = self.resolver.next_hops(self.domain, self.tag)
        except DeliveryError as error:
            self._trace(f"no next hop for {self.domain}: {error.reply} "
                        f"({'permanent' if error.permanent else 'temporary'}; RFC 5321 5.1)")
            return self._all(FAILED if error.permanent else PENDING, error.reply)
        self._trace(f"next hops for {self.domain}, in order: "
                    f"{', '.join(f'{ip}:{port}' for ip, port in hops)} (RFC 5321 5.1)")
        last_error = f"451 4.4.1 no mail exchanger of {self.domain} answered"
        for address in hops:
            try:
                return self._deliver_via(address)
            except TryNextHost as error:
                last_error = error.reply
                self.log.info("%s %s:%d: %s; trying the next host", self.tag, *address,
                              error.reply)
            except DeliveryError as error:      # the transaction broke after MAIL
                return self._all(FAILED if error.permanent else PENDING, error.reply,
                                 f"{address[0]}:{address[1]}")
        return self._all(PENDING, last_error)

    def _trace(self, text):
        if self.config.trace:
            self.log.info("%s    %s", self.tag, text)

    def _all(self, status, reply, remote=""):
        return {recipient: Outcome(status, reply, remote) for recipient in self.recipients}

    def _deliver_via(self, address):
        try:
            return self._deliver_once(address, use_tls=self.config.relay_tls != "no")
        except TlsFailed as error:
            if self.config.relay_tls == "require":
                raise TryNextHost(error.reply)
            self.log.info("%s %s; trying again in clear text", self.tag, error.reply)
            return self._deliver_once(address, use_tls=False)

    def _deliver_once(self, address, use_tls):
        remote = f"{address[0]}:{address[1]}"
        try:
            client = SmtpClient(address, self.config, self.log, self.tag)
        except OSError as error:
            raise TryNextHost(f"451 4.4.1 cannot connect to {remote}: {error}")
        try:
            extensions = self._open(client, remote)
            extensions = self._secure(client, extensions, remote, use_tls)
            return self._send(client, extensions, remote)
        except TryNextHost:
            raise
        except DeliveryError as error:       # after MAIL: the whole group waits or fails
            raise TryNextHost(error.reply) if not getattr(error, "started", False) else error
        except OSError as error:
            raise TryNextHost(f"451 4.4.2 connection to {remote} failed: {error}")
        finally:
            client.close()

    def _open(self, client, remote):
        """Greeting and EHLO (HELO if EHLO is refused). Any failure here: the next host."""
        code, text = client.reply(self.config.command_timeout)    # RFC 5321 4.5.3.2.1
        if code != 220:
            raise TryNextHost(f"{text} (greeting from {remote})")
        hostname = self.config.hostname
        code, text = client.command(f"EHLO {hostname}")
        if code == 250:
            return parse_extensions(text)
        if 500 <= code < 600:                # RFC 5321 3.2: fall back to HELO
            code, text = client.command(f"HELO {hostname}")
            if code == 250:
                return {}
        raise TryNextHost(f"{text} (EHLO to {remote})")

    def _secure(self, client, extensions, remote, use_tls):
        """STARTTLS when the remote offers it; `[relay] tls = require` sends nothing in clear."""
        if use_tls and "STARTTLS" in extensions:
            self._trace("the remote offers STARTTLS: upgrading before MAIL (RFC 3207 4)")
            code, text = client.command("STARTTLS")
            if code != 220:
                raise TlsFailed(f"454 4.7.0 STARTTLS refused by {remote}: {text}")
            try:
                client.start_tls()
            except (ssl.SSLError, OSError) as error:
                raise TlsFailed(f"454 4.7.0 TLS handshake with {remote} failed: {error}")
            code, text = client.command(f"EHLO {self.config.hostname}")    # RFC 3207 4.2
            if code != 250:
                raise TryNextHost(f"{text} (EHLO after STARTTLS to {remote})")
            return parse_extensions(text)
        if self.config.relay_tls == "require":
            raise TryNextHost(f"451 4.7.10 {remote} offers no STARTTLS and [relay] tls = require")
        self.log.info("%s sending in clear text (%s)", self.tag,
                      "TLS not offered" if use_tls else "TLS off for this attempt")
        return extensions

    def _send(self, client, extensions, remote):
        message = self.message
        outcomes = {}
        try:
            limit = int(extensions.get("SIZE") or 0)
        except ValueError:
            limit = 0
        if limit and message.size > limit:                        # RFC 1870 6
            return self._all(FAILED, f"552 5.3.4 message too big for {remote} "
                                     f"(limit {limit})", remote)
        parameters = f" SIZE={message.size}" if "SIZE" in extensions else ""
        if message.body_8bit and "8BITMIME" in extensions:         # RFC 6152
            parameters += " BODY=8BITMIME"
        code, text = self._started(client.command,
                                   f"MAIL FROM:<{message.reverse_path}>{parameters}")
        if code != 250:
            return self._all(FAILED if code >= 500 else PENDING, text, remote)
        accepted = []
        for recipient in self.recipients:
            code, text = self._started(client.command, f"RCPT TO:<{recipient}>")
            if code in (250, 251):
                accepted.append(recipient)
            else:
                outcomes[recipient] = Outcome(FAILED if code >= 500 else PENDING, text, remote)
        if not accepted:
            self._quit(client)
            return outcomes
        code, text = self._started(client.command, "DATA")
        if code == 354:
            code, text = self._started(client.send_data, message.data)
        status = DONE if code == 250 else FAILED if code >= 500 else PENDING
        outcomes.update({recipient: Outcome(status, text, remote) for recipient in accepted})
        self._quit(client)
        return outcomes

    @staticmethod
    def _started(step, *args):
        """Run a step after MAIL: a failure now means the group waits, not the next host."""
        try:
            return step(*args)
        except (DeliveryError, OSError) as error:
            reply = getattr(error, "reply", None) or f"451 4.4.2 connection failed: {error}"
            failure = DeliveryError(reply)
            failure.started = True
            raise failure from None

    @staticmethod
    def _quit(client):
        try:
            client.command("QUIT")
        except (DeliveryError, OSError):
            pass


class TryNextHost(DeliveryError):
    """This host failed before the transaction began (RFC 5321 5.1: try the next one)."""


class TlsFailed(TryNextHost):
    """STARTTLS was offered but did not work; clear text may be tried unless TLS is required."""


# ---------------------------------------------------------------------------------------
# Bounces: RFC 3464 delivery status notifications


def build_dsn(hostname, spooled, failures, now=None):
    """A multipart/report DSN for `failures` ({recipient: Outcome}) of `spooled`."""
    now = now or time.time()
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = f"<{spooled.reverse_path}>"
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = email.utils.formatdate(now, localtime=True)
    report["Message-ID"] = email.utils.make_msgid("dsn", domain=hostname)
    report["Auto-Submitted"] = "auto-replied"                     # RFC 3834 5
    lines = [f"This is the mail system at {hostname}.", "",
             "Your message could not be delivered to these recipients:", ""]
    lines += [f"<{recipient}>: {outcome.reply}" for recipient, outcome in failures.items()]
    report.attach(MIMEText("\n".join(lines) + "\n", "plain", "us-ascii"))
    report.attach(_delivery_status(hostname, spooled, failures, now))
    headers = Message()
    headers.set_type("text/rfc822-headers")                       # RFC 3462
    headers.set_payload(_original_headers(spooled.data))
    report.attach(headers)
    return report.as_bytes(policy=email.policy.SMTP)


def _delivery_status(hostname, spooled, failures, now):
    status = Message()
    status.set_type("message/delivery-status")                    # RFC 3464 2
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Queue-ID"] = spooled.queue_id
    per_message["Arrival-Date"] = email.utils.formatdate(spooled.created, localtime=True)
    fields = [per_message]
    for recipient, outcome in failures.items():
        per_recipient = Message()
        per_recipient["Final-Recipient"] = f"rfc822; {recipient}"
        per_recipient["Action"] = "failed"
        per_recipient["Status"] = enhanced_status(outcome.reply, default="5.0.0")
        if outcome.remote:
            per_recipient["Remote-MTA"] = f"dns; {outcome.remote}"
        per_recipient["Diagnostic-Code"] = f"smtp; {outcome.reply}"
        per_recipient["Last-Attempt-Date"] = email.utils.formatdate(now, localtime=True)
        fields.append(per_recipient)
    status.set_payload(fields)
    return status


def enhanced_status(reply, default):
    """"550 5.1.1 no such user" -> "5.1.1"."""
    parts = reply.split(" ", 2)
    if len(parts) > 1 and parts[1].count(".") == 2 and parts[1][0] in "245":
        return parts[1]
    return default


def _original_headers(data):
    header = data.split(b"\r\n\r\n", 1)[0].replace(b"\r\n..", b"\r\n.")
    # 8-bit header bytes are shown escaped: a DSN part must stay ASCII to be sent anywhere
    return header.decode("ascii", "backslashreplace").replace("\r\n", "\n") + "\n"


# ---------------------------------------------------------------------------------------
# The queue runner


class Attempt:
    """One pass over a message: its state, and how many domain jobs are still running."""

    def __init__(self, spooled, record, jobs):
        self.spooled = spooled
        self.record = record
        self.jobs = jobs
        self.lock = threading.Lock()


class QueueRunner:
    def __init__(self, config, storage, has_mailbox, log):
        self.config = config
        self.storage = storage
        self.has_mailbox = has_mailbox
        self.log = log
        self.resolver = Resolver(config, log)
        self.jobs = queue.Queue()
        self._schedule = []                 # heap of (due time, name)
        self._due = {}                      # name -> its due time (stale heap entries differ)
        self._forced = set()                # names flushed: every pending recipient is due
        self._active = set()                # names with an attempt under way
        self._lock = threading.Condition()
        self._stopping = False
        self._threads = []

    # control

    def start(self):
        for name in self.storage.spooled_names():      # what a crash or restart left behind
            self.enqueue(name, self._next_due(name))
        self._spawn(self._schedule_loop, "relay-scheduler")
        for number in range(self.config.relay_workers):
            self._spawn(self._work_loop, f"relay-{number + 1}")
        return self

    def _spawn(self, target, name):
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, grace=2.0):
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        for _ in range(self.config.relay_workers):
            self.jobs.put(None)
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def enqueue(self, name, due=None):
        with self._lock:
            due = time.time() if due is None else due
            self._due[name] = due
            heapq.heappush(self._schedule, (due, name))
            self._lock.notify()

    def flush(self):
        """Make every queued message due now (python smtpd.py --flush, or SIGUSR1).
        Returns the time of the flush."""
        names = set(self.storage.spooled_names())
        flushed_at = time.time()
        with self._lock:
            self._forced |= names
        for name in names:
            self.enqueue(name, flushed_at)
        self.log.info("queue flushed: %d message(s) due now", len(names))
        return flushed_at

    def wait_for_one_pass(self, since, poll=0.05):
        """Wait until every message due at `since` has had its attempt."""
        while True:
            with self._lock:
                if not self._active and all(due > since for due in self._due.values()):
                    return
            time.sleep(poll)

    # scheduling

    def _next_due(self, name):
        record = self._read_state(name)
        if not record:
            return time.time()
        times = [r["next_attempt"] for r in record["recipients"].values()
                 if r["status"] == PENDING]
        return min(times) if times else time.time()

    def _schedule_loop(self):
        while True:
            with self._lock:
                name = self._pop_due()
                if self._stopping:
                    return
            if name:
                try:
                    self._begin(name)
                except Exception:
                    self.log.error("[%s] cannot start a delivery attempt; trying again later",
                                   name, exc_info=True)
                    self._give_back(name)

    def _give_back(self, name):
        """An attempt that could not run: due again after the first retry delay."""
        with self._lock:
            self._active.discard(name)
        self.enqueue(name, time.time() + self.config.retry[0])

    def _pop_due(self):
        """The next due name, or None after waiting a while. Called with the lock held."""
        while self._schedule and not self._stopping:
            due, name = self._schedule[0]
            if self._due.get(name) != due or name in self._active:
                heapq.heappop(self._schedule)           # stale, or already being attempted
                continue
            wait = due - time.time()
            if wait > 0:
                self._lock.wait(min(wait, 60))
                return None
            heapq.heappop(self._schedule)
            del self._due[name]
            self._active.add(name)
            return name
        self._lock.wait(60)
        return None

    def _begin(self, name):
        """Read the message and its state; queue one job per domain with due recipients."""
        try:
            spooled = self.storage.read_spooled(name)
            record = self._read_state(name) or self._new_record(spooled)
        except OSError as error:                # perhaps passing (out of descriptors)
            self.log.error("[%s] cannot read spool file: %s", name, error)
            self._give_back(name)
            return
        except StorageError as error:           # damaged: left for the admin (--queue)
            self.log.error("[%s] cannot read spool file: %s", name, error)
            self._end(name, None)
            return
        with self._lock:
            forced = name in self._forced
            self._forced.discard(name)
        now = time.time()
        by_domain = {}
        for recipient, state in record["recipients"].items():
            if state["status"] == PENDING and (forced or state["next_attempt"] <= now):
                domain = recipient.rpartition("@")[2].lower()
                by_domain.setdefault(domain, []).append(recipient)
        if not by_domain:
            self._end(name, record)
            return
        attempt = Attempt(spooled, record, len(by_domain))
        for domain, recipients in by_domain.items():
            self.jobs.put((attempt, domain, recipients))

    def _new_record(self, spooled):
        return {"queue_id": spooled.queue_id, "created": spooled.created,
                "recipients": {recipient: {"status": PENDING, "attempts": 0,
                                           "next_attempt": 0, "last_error": ""}
                               for recipient in spooled.recipients}}

    def _read_state(self, name):
        try:
            return self.storage.read_state(name)
        except StorageError as error:
            self.log.error("[%s] unreadable state, starting over: %s", name, error)
            return None

    def _work_loop(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            attempt, domain, recipients = job
            try:
                self._deliver(attempt, domain, recipients)
            except Exception:
                self.log.error("[%s] delivery to %s failed unexpectedly; trying again later",
                               attempt.spooled.queue_id, domain, exc_info=True)
                self._retry_later(attempt, recipients)
            self._job_done(attempt)

    def _deliver(self, attempt, domain, recipients):
        spooled = attempt.spooled
        outcomes = Transaction(self.config, self.resolver, self.log, spooled, domain,
                               recipients).run()
        with attempt.lock:
            failures = self._record(attempt.record, outcomes)
            if failures:
                self._bounce(spooled, failures)     # durable before the state says "failed"
            self.storage.write_state(spooled.name, attempt.record)

    def _retry_later(self, attempt, recipients):
        """After an unexpected error: whatever is not known to be delivered waits for the
        first retry delay (a failure whose bounce could not be made is tried again too)."""
        with attempt.lock:
            for recipient in recipients:
                state = attempt.record["recipients"][recipient]
                if state["status"] != DONE:
                    state.update(status=PENDING, next_attempt=time.time() + self.config.retry[0])
            try:
                self.storage.write_state(attempt.spooled.name, attempt.record)
            except (OSError, StorageError) as error:
                self.log.error("[%s] cannot save the queue state: %s",
                               attempt.spooled.queue_id, error)

    def _job_done(self, attempt):
        with attempt.lock:
            attempt.jobs -= 1
            last = attempt.jobs == 0
        if last:
            self._end(attempt.spooled.name, attempt.record)

    def _record(self, record, outcomes):
        """Apply one job's outcomes; return those that failed for good."""
        now = time.time()
        too_old = now - record["created"] >= self.config.max_queue_age
        failures = {}
        for recipient, outcome in outcomes.items():
            state = record["recipients"][recipient]
            state["attempts"] += 1
            state["last_error"] = "" if outcome.status == DONE else outcome.reply
            if outcome.status == PENDING and too_old:   # RFC 5321 4.5.4.1: give up
                outcome = outcome._replace(status=FAILED, reply=(
                    f"{outcome.reply} (gave up: in the queue since "
                    f"{email.utils.formatdate(record['created'], localtime=True)})"))
            state["status"] = outcome.status
            if outcome.status == PENDING:
                delays = self.config.retry
                state["next_attempt"] = now + delays[min(state["attempts"], len(delays)) - 1]
                if self.config.trace:
                    self.log.info("[%s]    <%s> retried in %ds (RFC 5321 4.5.4.1)",
                                  record["queue_id"], recipient, state["next_attempt"] - now)
            if outcome.status == FAILED:
                failures[recipient] = outcome
            self.log.info("[%s] <%s>: %s: %s", record["queue_id"], recipient,
                          outcome.status, outcome.reply)
        return failures

    def _end(self, name, record):
        """After an attempt: remove a finished message, or schedule the next attempt."""
        pending = [state["next_attempt"] for state in (record or {}).get("recipients", {}).values()
                   if state["status"] == PENDING]
        if record and not pending:
            try:
                self.storage.remove_spooled(name)
                self.log.info("[%s] finished; removed from the queue", record["queue_id"])
            except OSError as error:
                self.log.error("[%s] cannot remove the finished message: %s", name, error)
        with self._lock:
            self._active.discard(name)
            requested = self._due.pop(name, None)      # a flush during the attempt
        if pending:
            self.enqueue(name, min(pending + ([requested] if requested else [])))

    # bounces

    def _bounce(self, spooled, failures):
        """Send a DSN to the sender, local or remote; never for the null sender (4.5.5)."""
        if not spooled.reverse_path:
            self.log.info("[%s] not bounced: the sender is <>", spooled.queue_id)
            return
        dsn = build_dsn(self.config.hostname, spooled, failures)
        envelope = {
            "queue_id": f"{spooled.queue_id[:12]}{random.getrandbits(16):04x}",
            "client_ip": "127.0.0.1", "client_port": 0, "helo": self.config.hostname,
            "reverse_path": "", "mail_parameters": {}, "local": [], "remote": [],
        }
        envelope[self._route(spooled.reverse_path)].append(self._bounce_address(spooled))
        name = self.storage.deliver(envelope, dsn)
        self.log.info("[%s] bounce %s sent to <%s>", spooled.queue_id, envelope["queue_id"],
                      spooled.reverse_path)
        if name:
            self.enqueue(name)

    def _route(self, address):
        domain = address.rpartition("@")[2].lower()
        return "local" if domain in self.config.local_domains else "remote"

    def _bounce_address(self, spooled):
        """The sender, or the domain's postmaster when a local sender has no mailbox."""
        address = spooled.reverse_path
        local_part, _, domain = address.rpartition("@")
        if self._route(address) == "remote" or local_part.lower() == "postmaster" \
                or self.has_mailbox(local_part, domain.lower()):
            return address.lower() if self._route(address) == "local" else address
        return f"postmaster@{domain.lower()}"


# ---------------------------------------------------------------------------------------
# Queue inspection: python smtpd.py --queue


def queue_listing(storage, now=None):
    """Lines describing every queued message, like Postfix's mailq."""
    now = now or time.time()
    names = storage.spooled_names()
    if not names:
        return ["Mail queue is empty"]
    lines = []
    for name in names:
        try:
            spooled = storage.read_spooled(name)
            record = storage.read_state(name)
        except (OSError, StorageError) as error:
            lines.append(f"{name}  (unreadable: {error})")
            continue
        age = _duration(now - spooled.created)
        lines.append(f"{spooled.queue_id}  age {age}  {spooled.size} octets  "
                     f"from <{spooled.reverse_path}>  ({name}.smtp)")
        states = (record or {}).get("recipients", {})
        for recipient in spooled.recipients:
            state = states.get(recipient, {"status": PENDING, "attempts": 0,
                                           "next_attempt": 0, "last_error": ""})
            line = f"    <{recipient}>  {state['status']}, {state['attempts']} attempt(s)"
            if state["status"] == PENDING:
                wait = state["next_attempt"] - now
                line += ", next now" if wait <= 0 else f", next in {_duration(wait)}"
            if state["last_error"]:
                line += f", last error: {state['last_error']}"
            lines.append(line)
    lines.append(f"-- {len(names)} message(s) in the queue")
    return lines


def _duration(seconds):
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"
