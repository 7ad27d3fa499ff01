"""Starting as a service: the steps between reading the config and serving the first client.

    sudo python smtpd.py 0.0.0.0 --port 25

1. Load, while still root, everything a later code path imports lazily (the bounce builder's
   `email` modules, dnspython's record types, codecs, dkimpy, the MTA-STS fetch; the Public
   Suffix List and the DKIM keys are read when the mail system is built): after the drop the
   interpreter's own files may be unreadable (a venv or pyenv in a 0700 home directory).
2. Create the data directories that are missing; stop if another server holds the spool;
   bind the listening sockets.
3. Started as root: hand what it created (and only that) to `[server] user`, and become it,
   as Postfix and OpenSMTPD do. `user = root` keeps root on purpose.
4. Check, as the run user, that the users file, the certificate and key are readable and
   every data directory is a writable directory: if not, stop with one line naming it.
5. Open the log file, clean up what a crash left behind, start the queue and the listeners.
"""
import os
import pwd
import time

import bounce
import dkimsign
import dkimverify
import durable
import mailsystem
import mtasts
import resolver
from config import ConfigError
from log import Log
from spool import Spool


class StartupError(Exception):
    """The one line the user sees when the server cannot start."""


def make_log(config, console=True):
    """The log, writing to the console; the file is opened once the server runs as its user."""
    return Log(config.log_level, console=console)


def log_path(config):
    return os.path.join(config.log_dir, "smtpd.log")


def preload():
    """Import now what the server would otherwise import on first use."""
    bounce.preload()
    resolver.preload()
    dkimsign.preload()
    dkimverify.preload()
    mtasts.preload()
    "mail.example".encode("idna")           # socket.getaddrinfo's codec for host names


def start_service(config, make_server):
    """Steps 1-5 above. Returns the running server; raises StartupError or ConfigError."""
    started = time.time()
    log = make_log(config)
    preload()
    if config.web_listen:                   # the web view decodes headers of any charset
        import mailview
        mailview.preload()
    created = prepare_directories(config)
    spool = Spool(config.spool)
    if spool.held_by_another():             # before the ports: the line must say why
        raise mailsystem.spool_in_use(spool)
    try:
        server = make_server(config, log)
    except OSError as error:
        raise StartupError(f"cannot listen on {config.ip}:{config.port}: "
                           f"{error.strerror or error}") from None
    try:
        account = drop_privileges(config, log, created)
        check_access(config)
        log.open_file(log_path(config))
        if account:
            log.info("running as %s (uid %d)", account.pw_name, account.pw_uid)
        server.system.remove_leftovers(started)
        return server.start()
    except BaseException:
        server.close()
        raise


def prepare_directories(config):
    """mkdir -p the Maildir, the spool (and its tmp/) and the log directory. Returns what
    it created; an existing path is left as it is (checked later)."""
    created = []
    for label, path in data_directories(config):
        for directory in (path, os.path.join(path, "tmp")) if label == "[storage] spool" \
                else (path,):
            try:
                created += durable.make_directories(directory)
            except OSError as error:
                raise StartupError(f"{label} {path}: {error.strerror or error}") from None
    return created


def data_directories(config):
    return [("[storage] maildir", config.maildir), ("[storage] spool", config.spool),
            ("[log] dir", config.log_dir)]


def run_user(config):
    """The account to become when started as root, or None to stay as we are."""
    if os.geteuid() != 0 or config.user == "root":
        return None
    try:
        return pwd.getpwnam(config.user)
    except KeyError:
        raise ConfigError(f"[server] user = {config.user!r}: no such user") from None


def drop_privileges(config, log, created=()):
    """Give the directories this start created to the run user, then become that user.
    Returns the account, or None when it stays as it is."""
    if os.geteuid() == 0 and config.user == "root":
        log.warning("running as root because [server] user = root")
    account = run_user(config)
    if account is None:
        return None
    for path in created:
        os.chown(path, account.pw_uid, account.pw_gid)
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    return account


def check_access(config):
    """As the run user: every file readable, every data directory a writable directory."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    readable = [("[users] file", config.users_file)]
    if config.aliases_file:
        readable.append(("[users] aliases", config.aliases_file))
    if config.tls_cert:
        readable += [("[tls] cert", config.tls_cert), ("[tls] key", config.tls_key)]
    if config.relay_ca_file:            # the relay loads it for each verifying TLS context
        readable.append(("[relay] ca_file", config.relay_ca_file))
    for label, path in readable:
        if not os.access(path, os.R_OK):
            raise StartupError(f"{label} {path}: {_why_not(path, user, 'readable')}")
    directories = data_directories(config) + [("[storage] spool", os.path.join(config.spool,
                                                                                  "tmp"))]
    for label, path in directories:
        if not os.path.isdir(path):
            raise StartupError(f"{label} {path}: not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise StartupError(f"{label} {path}: {_why_not(path, user, 'writable')}")
    log_file = log_path(config)
    if os.path.exists(log_file) and not os.access(log_file, os.W_OK):
        raise StartupError(f"[log] dir {log_file}: {_why_not(log_file, user, 'writable')}")


def _why_not(path, user, what):
    try:
        owner_id = os.stat(path).st_uid
    except FileNotFoundError:
        return "no such file or directory"
    except PermissionError:
        return f"not {what} by {user}: a directory above it is closed to {user}"
    try:
        owner = pwd.getpwuid(owner_id).pw_name
    except KeyError:
        owner = f"uid {owner_id}"
    return f"not {what} by {user} (owned by {owner})"
