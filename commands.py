"""The command-line tools that work on a server's files: --queue, --flush, --add-user and
--tls-domains.

They never create the data directories (a listing run from the wrong place shows an empty
queue, and leaves no empty mail/ spool/ logs/ behind), and --flush, when it delivers the
queue itself, does it as `[server] user`, so that the files it writes are the server's.
"""
import getpass
import os
import signal
import sys

import time

import daemon
import passwords
import queuerunner
from delivery import duration
from log import Log
from mailsystem import MailSystem
from mtasts import PolicyCache
from spool import Spool
from storage import StorageError
from tlsmemory import PLAIN, TlsMemory
from users import UsersFileError, add_user as add_user_to_file


def show_queue(config):
    """python smtpd.py --queue: the queue, like Postfix's mailq, then the TLS each queued
    domain has shown before (what the relay will not go below)."""
    spool = Spool(config.spool)
    entries = queuerunner.queue_entries(spool)
    print("\n".join(queuerunner.queue_listing(spool, entries=entries)))
    domains = sorted({recipient.address.domain for entry in entries if entry.message
                      for recipient in entry.message.recipients})
    if domains:
        memory = TlsMemory(config.spool)
        print("TLS of the queued domains (the least the relay accepts for them):")
        print("\n".join(f"    {domain}  {memory.level(domain)}" for domain in domains))
    return 0


def show_tls_domains(config, now=None):
    """python smtpd.py --tls-domains: what the TLS memory holds, and the MTA-STS policy
    cached for each domain (RFC 8461), one line a domain."""
    now = time.time() if now is None else now
    memory = TlsMemory(config.spool)
    levels = {entry.domain: entry for entry in memory.entries()}
    policies = {policy.domain: policy for policy in PolicyCache(config.spool).policies()}
    if memory.problem:
        print(f"smtpd: the TLS memory cannot be read: {memory.problem}", file=sys.stderr)
    if not levels and not policies:
        print("No domain has a TLS record or an MTA-STS policy yet")
        return 0
    for domain in sorted(set(levels) | set(policies)):
        print(tls_domain_line(domain, levels.get(domain), policies.get(domain), now))
    return 0


def tls_domain_line(domain, entry, policy, now):
    """`remote.test  verified since 2026-12-02 13:00:00  MTA-STS enforce id 2026 expires in 1d`"""
    if entry is None:
        level = f"{PLAIN} (nothing delivered over TLS yet)"
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.since))
        level = f"{entry.level} since {since}"
    if policy is None:
        return f"{domain}  {level}  MTA-STS: none cached"
    left = policy.expires - now
    expiry = f"expires in {duration(left)}" if left > 0 else "expired"
    return (f"{domain}  {level}  MTA-STS {policy.mode} id {policy.id} {expiry} "
            f"(mx {', '.join(policy.mx) or '-'})")


def flush_queue(config):
    """python smtpd.py --flush: ask the running server to deliver the queue now, or, when
    no server holds the spool, make one delivery attempt for every message here."""
    spool = Spool(config.spool)
    if not os.path.isdir(spool.directory):
        print("Mail queue is empty")
        return 0
    owner = spool.owner()
    lock = spool.lock()
    if lock is None:
        holder = owner or spool.owner()
        try:
            os.kill(holder, signal.SIGUSR1)
        except ProcessLookupError:          # its children still hold the lock (processes.py)
            return fail(f"smtpd: the server that holds the spool (pid {holder}) has ended, "
                        "and its processes are stopping; try again in a few seconds")
        print(f"smtpd: asked the running server (pid {holder}) to deliver the queue now")
        return 0
    lock.close()                            # MailSystem.start takes it again
    log = Log(config.log_level)
    # As the server starts (daemon.py): what is loaded lazily, the Public Suffix List and
    # the DKIM keys are read while still root; after the drop they may be unreadable
    daemon.preload()
    system = MailSystem(config, log)
    daemon.drop_privileges(config, log)
    system.start()
    try:
        system.queue.wait_for_one_pass(system.queue.flush())
    finally:
        system.stop()
    print("\n".join(queuerunner.queue_listing(spool)))
    return 0


def add_user(config, login):
    """python smtpd.py --add-user alice@test.ru: ask for a password, store its scrypt hash."""
    local_part, _, domain = login.lower().partition("@")
    if not domain or domain not in config.local_domains:
        return fail(f"smtpd: --add-user {login}: give name@domain with a local domain "
                    f"({', '.join(config.local_domains)})")
    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {login}: ")
        if getpass.getpass("Again: ") != password:
            return fail("smtpd: --add-user: the passwords differ")
    else:                                   # a script: the password is the first line
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        return fail("smtpd: --add-user: empty password")
    try:
        replaced = add_user_to_file(config.users_file, f"{local_part}@{domain}",
                                    passwords.hash_password(password))
    except (OSError, UsersFileError, StorageError) as error:
        return fail(f"smtpd: --add-user: {error}")
    if replaced:
        print(f"smtpd: {local_part}@{domain}: password changed in {config.users_file}")
    else:
        print(f"smtpd: {local_part}@{domain} added to {config.users_file}")
    return 0


def fail(line):
    print(line, file=sys.stderr)
    return 2
