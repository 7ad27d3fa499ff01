"""Writes that survive a crash: fsync the file, rename it into place, fsync the directory.

RFC 5321 6.1: once the server has answered 250 it is responsible for the message, so every
file the 250 depends on is on disk first. The Maildir, the spool and the users file all
write through these few functions.
"""
import errno
import os
import threading

# The errors that mean "the disk is full", as opposed to a broken or missing disk
FULL = (errno.ENOSPC, errno.EDQUOT)


def write_file(path, content, replace=False, mode=0o600):
    """Write `content` to `path` and fsync it. A file is never half-written under its name:
    a new one is created exclusively, and with replace=True it is written beside the old
    one and renamed over it (keeping the old file's owner and mode)."""
    target = path
    if replace:
        path = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        write_all(descriptor, content)
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        os.unlink(path)
        raise
    os.close(descriptor)
    if replace:
        _keep_owner_and_mode(target, path)
        os.replace(path, target)
        fsync_directory(os.path.dirname(target) or ".")


def write_all(descriptor, content):
    view = memoryview(content)
    while view:
        view = view[os.write(descriptor, view):]


def _keep_owner_and_mode(old, new):
    """A replaced file (the users file, edited by root with --add-user) stays readable by
    whoever could read the old one."""
    try:
        info = os.stat(old)
    except FileNotFoundError:
        return
    os.chmod(new, info.st_mode & 0o7777)
    if os.geteuid() == 0:
        os.chown(new, info.st_uid, info.st_gid)


class _DirectorySync:
    """The fsyncs of one directory, shared by the threads that need one (group commit).
    An fsync makes durable every entry changed before it started, so a thread that asks
    while one is running waits for it to end and then for one more, which the threads
    that asked meanwhile all share: under load, one fsync per round instead of one per
    message."""

    def __init__(self):
        self.changed = threading.Condition(_syncs_lock)
        self.asked = 0              # requests so far, numbered 1, 2, ...
        self.covered = 0            # requests up to this one are durable
        self.failed_up_to = 0       # requests up to this one share a failed fsync's error
        self.error = None
        self.running = False
        self.waiting = 0            # threads inside fsync_directory for this directory


_syncs_lock = threading.Lock()
_syncs = {}                         # directory path -> _DirectorySync, while in use


def fsync_directory(path):
    """Make a rename, link or unlink in `path` durable (raises the fsync's OSError)."""
    with _syncs_lock:
        sync = _syncs.setdefault(path, _DirectorySync())
        sync.waiting += 1
        sync.asked += 1
        ticket = sync.asked
        try:
            _wait_until_covered(path, sync, ticket)
        finally:
            sync.waiting -= 1
            if not sync.waiting:
                del _syncs[path]


def _wait_until_covered(path, sync, ticket):
    """With _syncs_lock held: return once request `ticket` is durable."""
    while sync.covered < ticket:
        if sync.failed_up_to >= ticket:
            raise sync.error
        if sync.running:
            sync.changed.wait()
            continue
        sync.running, round_end = True, sync.asked    # all asked so far: changed before
        _syncs_lock.release()
        error = None
        try:
            _fsync(path)
        except OSError as failure:
            error = failure
        finally:                    # whatever happened, the waiters hear of it
            _syncs_lock.acquire()
            sync.running = False
            sync.changed.notify_all()
        if error is None:
            sync.covered = round_end
        else:
            sync.failed_up_to, sync.error = round_end, error


def _fsync(path):
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_directories(path, mode=0o700):
    """mkdir -p, fsyncing each parent that gains an entry, so a new tree survives a crash.
    Returns the directories it created, outermost first."""
    if os.path.isdir(path):
        return []
    parent = os.path.dirname(os.path.abspath(path))
    created = make_directories(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return created
    fsync_directory(parent)
    return created + [path]
