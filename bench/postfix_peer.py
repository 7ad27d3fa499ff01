"""The Postfix peer of bench/run.py (issue 17): a private Postfix instance of our own, as
tests/test_interop.py builds one, tuned only where the benchmark would otherwise measure a
limit of the configuration rather than of Postfix.

- main.cf, master.cf, the queue and the data directory live in the peer's temporary
  directory; its smtpd listens on 127.0.0.1:<port> only; no chroot; the log goes to a file
  (`maillog_file`, through postlogd) instead of syslog.
- Local mail: `virtual_mailbox_domains = test.ru`, delivered by virtual(8) to Maildir under
  `virtual_mailbox_base` = the peer's Maildir, `test.ru/<user>/new/`, the same layout as
  smtpd's (so the bench counts both the same way). Mailboxes: `user` and `1user` ...
  `100user` (what smtp-source -r N sends to).
- Durability as it ships: cleanup(8) fsyncs the queue file before smtpd(8) sends the 250,
  and virtual(8) fsyncs each Maildir file before it links it into new/ (neither fsyncs a
  directory; strace shows it, see bench/README.md).
- `default_process_limit = 1200`, so that smtpd(8) may run 1,000 processes at once (the
  scaling section's largest point) and 200 sessions are not its own limit; master(8) also
  listens with a backlog of that size. Everything else is Postfix's default: 20 parallel
  deliveries per destination, `in_flow_delay = 1s`, smtpd processes reused 100 times.
- Relaying (the relay drain): `relayhost = [127.0.0.x]:<port>`, no DNS at all
  (`smtp_dns_support_level = disabled`, the next hop is an address literal).

master(8) is started in the foreground (`master -c <etc> -d`) by the bench in its own session,
so that killing the process group stops it and every Postfix process it started. The
queue directories are made first with `postfix -c <etc> check`. Postfix needs root: it
switches to the `postfix` user.
"""
import os
import pwd
import shutil
import subprocess
import time

SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
DAEMON_DIRECTORIES = ("/usr/lib/postfix/sbin", "/usr/libexec/postfix", "/usr/lib/postfix")
PROCESS_LIMIT = 1200
MAX_MESSAGE_SIZE = 20000000         # as smtpd's in the bench (10 MiB of text + headers)
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def find_postfix():
    """(postfix, master) paths, or None for each that is missing."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    postfix = shutil.which("postfix", path=path)
    master = next((os.path.join(d, "master") for d in DAEMON_DIRECTORIES
                   if os.access(os.path.join(d, "master"), os.X_OK)), None)
    if postfix and not master:
        try:
            daemon_directory = subprocess.run(
                [shutil.which("postconf", path=path) or "postconf", "-h", "daemon_directory"],
                capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            daemon_directory = ""
        candidate = os.path.join(daemon_directory, "master")
        master = candidate if daemon_directory and os.access(candidate, os.X_OK) else None
    return postfix, master


def unavailable():
    """Why the Postfix peer cannot run here, or None."""
    postfix, master = find_postfix()
    if not postfix or not master:
        return "Postfix is not installed (Debian/Ubuntu package `postfix`)"
    if os.geteuid() != 0:
        return "a private Postfix needs root (it switches to the `postfix` user)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no `postfix` user (install the Debian package)"
    return None


def mailboxes():
    """Every local mailbox of the bench: user@test.ru, 1user@ ... 100user@."""
    return ["user"] + [f"{n}user" for n in range(1, 101)]


def configure(directory, port, maildir, domain="test.ru", relayhost=None, extra=None):
    """Write main.cf, master.cf and the mailbox map under `directory`; make the directories.
    `relayhost`: (address, port) of the next hop for every domain that is not `domain`.
    Returns the config directory (for `master -c` and `postfix -c`)."""
    account = pwd.getpwnam("postfix")
    etc, queue, data = (os.path.join(directory, name) for name in ("etc", "queue", "data"))
    for folder in (etc, queue, data, maildir):
        os.makedirs(folder, exist_ok=True)
    for folder in (data, maildir):
        os.chown(folder, account.pw_uid, account.pw_gid)
    os.chmod(directory, 0o755)              # postfix (the user) must reach its queue and mail
    with open(os.path.join(etc, "vmailbox"), "w") as boxes:
        boxes.write("".join(f"{name}@{domain} {domain}/{name}/\n" for name in mailboxes()))
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": queue, "data_directory": data,
        "mail_owner": "postfix", "setgid_group": "postdrop",
        "myhostname": "postfix.test", "mydomain": "postfix.test", "myorigin": "postfix.test",
        "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
        "mydestination": "", "mynetworks": "127.0.0.0/8",
        "relayhost": "[{}]:{}".format(*relayhost) if relayhost else "",
        "smtp_dns_support_level": "disabled",
        "alias_maps": "", "alias_database": "", "local_recipient_maps": "",
        "smtpd_peername_lookup": "no", "biff": "no",
        "maillog_file": os.path.join(directory, "maillog"), "maillog_file_prefixes": directory,
        "virtual_mailbox_domains": domain,
        "virtual_mailbox_maps": f"texthash:{os.path.join(etc, 'vmailbox')}",
        "virtual_mailbox_base": maildir, "virtual_minimum_uid": "1",
        "virtual_uid_maps": f"static:{account.pw_uid}",
        "virtual_gid_maps": f"static:{account.pw_gid}",
        "default_process_limit": str(PROCESS_LIMIT),
        "message_size_limit": str(MAX_MESSAGE_SIZE),
        "virtual_mailbox_limit": "0",
        **(extra or {}),
    }
    with open(os.path.join(etc, "main.cf"), "w") as main_cf:
        main_cf.write("".join(f"{key} = {value}\n" for key, value in settings.items()))
    with open(os.path.join(etc, "master.cf"), "w") as master_cf:
        master_cf.write(MASTER_CF.format(port=port))
    # Postfix waits for a config file changed in the last second or two (it may be half
    # written): date ours back.
    past = time.time() - 60
    for name in os.listdir(etc):
        os.utime(os.path.join(etc, name), (past, past))
    return etc


def prepare(etc, timeout=60):
    """`postfix -c etc check`: makes the queue directories with their owners. Raises
    RuntimeError with Postfix's complaint when the configuration is refused."""
    postfix, _ = find_postfix()
    try:
        result = subprocess.run([postfix, "-c", etc, "check"], capture_output=True,
                                stdin=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"postfix check: {error}") from None
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace").strip()
        raise RuntimeError(f"postfix -c {etc} check exited {result.returncode}: "
                           + (output[-300:] or "(see the maillog)"))


def master_command(etc):
    """master(8) in the foreground (-d: it does not detach), on our configuration."""
    return [find_postfix()[1], "-c", etc, "-d"]


def queued(directory):
    """Queue files in the instance's queues (a message accepted and not yet delivered or
    bounced is in one of them)."""
    count = 0
    for name in QUEUES:
        for _, _, files in os.walk(os.path.join(directory, "queue", name)):
            count += len(files)
    return count


def maillog_tail(directory, lines=15):
    try:
        with open(os.path.join(directory, "maillog"), errors="replace") as log:
            return "".join(log.readlines()[-lines:])
    except OSError:
        return "(no maillog)"
