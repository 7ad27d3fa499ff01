"""The local mailboxes as the web view shows them: who has one, what is in it, one message.

Read straight from the Maildir tree (<maildir>/<domain>/<user>/{new,cur}) and the users
file, never written. A name that arrives in a URL is only ever compared with what the
directory listing holds (`_entry`), so no path is ever made from it: `../` and the like
find nothing. Headers are decoded with the `email` package (RFC 2047 encoded words, RFC 6532
UTF-8); the text is shown as text, whatever it holds (the page escapes it).
"""
import collections
import email.parser
import email.policy
import email.utils
import os
from typing import NamedTuple, Optional

from users import UsersFileError, read_users_file

HEADER_LIMIT = 64 << 10         # octets read to find a message's header block
SOURCE_LIMIT = 1 << 20          # octets of a message's source shown
MESSAGES_LIMIT = 500            # newest messages listed per mailbox
FOLDERS = ("new", "cur")        # where delivered messages are (tmp/ holds unfinished ones)
SUMMARY_FIELDS = ("Date", "From", "To", "Subject")


class Mailbox(NamedTuple):
    domain: str
    user: str
    messages: int               # in new/ and cur/
    in_users_file: bool         # False: a folder only (a user since removed, postmaster)


class Summary(NamedTuple):
    id: str                     # the Maildir file name
    folder: str                 # new or cur
    received: float             # the file's mtime: when it was delivered
    size: int                   # octets on disk (LF line ends)
    date: str
    sender: str                 # From:
    to: str
    subject: str


class Message(NamedTuple):
    summary: Summary
    headers: list               # [(name, decoded value)], in order
    source: str                 # the file as text (UTF-8; anything else replaced)
    truncated: bool             # the source shown is the first SOURCE_LIMIT octets


def mailboxes(config):
    """[Mailbox] of every local domain: the users file's names and the folders on disk."""
    try:
        names = read_users_file(config.users_file)[0]
    except UsersFileError:
        names = {}
    found = []
    for domain in config.local_domains:
        listed = {name.partition("@")[0] for name in names
                  if "@" not in name or name.partition("@")[2] == domain}
        on_disk = set(_listing(os.path.join(config.maildir, domain)))
        for user in sorted(listed | on_disk | {"postmaster"}):
            count = len(_message_files(config, domain, user)) if user in on_disk else 0
            found.append(Mailbox(domain, user, count, user in listed))
    return found


def summaries(config, domain, user):
    """[Summary] of one mailbox, newest first, or None when there is no such mailbox."""
    if domain not in config.local_domains:
        return None
    files = _message_files(config, domain, user)
    if files is None:
        return [] if user in {box.user for box in mailboxes(config) if box.domain == domain} \
            else None
    files.sort(key=lambda item: item[2], reverse=True)
    return [_summary(path, folder, name, mtime, size)
            for folder, name, mtime, size, path in files[:MESSAGES_LIMIT]]


def message(config, domain, user, message_id):
    """One Message, or None when the mailbox or the message is not there."""
    if domain not in config.local_domains:
        return None
    for folder, name, mtime, size, path in _message_files(config, domain, user) or ():
        if name == message_id:
            summary = _summary(path, folder, name, mtime, size)
            return Message(summary, _headers(path), *_source(path))
    return None


# ---------------------------------------------------------------------------------------


def _listing(path):
    try:
        return [entry.name for entry in os.scandir(path)
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")]
    except OSError:
        return []


def _entry(directory, name):
    """`directory/name` if `name` is one of the directory's own entries, else None."""
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    return os.path.join(directory, name) if name in names else None


def _message_files(config, domain, user):
    """[(folder, name, mtime, size, path)] of a mailbox's messages, or None if it has no
    folder."""
    domain_folder = _entry(config.maildir, domain)
    mailbox = domain_folder and _entry(domain_folder, user)
    if not mailbox:
        return None
    files = []
    for folder in FOLDERS:
        try:
            entries = list(os.scandir(os.path.join(mailbox, folder)))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    status = entry.stat(follow_symlinks=False)
                    files.append((folder, entry.name, status.st_mtime, status.st_size,
                                  entry.path))
            except OSError:             # gone meanwhile (a reader moved it to cur/)
                continue
    return files


def _summary(path, folder, name, mtime, size):
    fields = dict(_headers(path, SUMMARY_FIELDS))
    return Summary(name, folder, mtime, size, fields.get("Date", ""),
                   fields.get("From", ""), fields.get("To", ""), fields.get("Subject", ""))


def _headers(path, wanted=None):
    """[(name, decoded value)] of the message's header block: every field in order, or the
    first of each `wanted` one (named as `wanted` spells it)."""
    try:
        with open(path, "rb") as message_file:
            head = message_file.read(HEADER_LIMIT)
    except OSError:
        return []
    end = head.find(b"\n\n")
    head = head if end < 0 else head[:end + 1]
    parsed = _parse(head, email.policy.default)
    spelled = {name.lower(): name for name in wanted or ()}
    seen, found = collections.Counter(), []
    for name in parsed.keys():
        key = name.lower()
        if wanted is not None and (key not in spelled or seen[key]):
            continue
        found.append((spelled.get(key, name), _decoded(parsed, head, name, seen[key])))
        seen[key] += 1
    return found


def _parse(head, policy):
    return email.parser.BytesHeaderParser(policy=policy).parsebytes(head)


def _decoded(parsed, head, name, index):
    """The `index`th `name` field as text; one the `email` package cannot decode (a
    malformed address, say) is shown as it was sent."""
    try:
        return str(parsed.get_all(name)[index])
    except Exception:                   # a malformed header must not hide the message
        raw = _parse(head, email.policy.compat32).get_all(name) or [""]
        return str(raw[min(index, len(raw) - 1)])


def _source(path):
    try:
        with open(path, "rb") as message_file:
            data = message_file.read(SOURCE_LIMIT + 1)
    except OSError:
        return "", False
    return data[:SOURCE_LIMIT].decode("utf-8", "replace"), len(data) > SOURCE_LIMIT


def received_date(summary: Optional[Summary]):
    """The delivery time in RFC 5322 form (for a listing)."""
    return email.utils.formatdate(summary.received, localtime=True) if summary else ""


# The charsets a header's encoded words are most often in (RFC 2047): their codecs are
# imported when first used, so preload() makes them imported while the server is root
COMMON_CHARSETS = ("utf-8", "us-ascii", "iso-8859-1", "iso-8859-2", "iso-8859-5",
                   "iso-8859-15", "koi8-r", "koi8-u", "windows-1250", "windows-1251",
                   "windows-1252", "cp866", "gb2312", "gbk", "gb18030", "big5", "shift_jis",
                   "euc-jp", "iso-2022-jp", "euc-kr")


def preload():
    """Decode a header in each common charset, and list and read a message, so that every
    module and codec this needs is loaded before the privilege drop (daemon.py)."""
    words = " ".join(f"=?{charset}?q?a?=" for charset in COMMON_CHARSETS)
    head = f"Subject: {words}\nFrom: =?utf-8?b?w6k=?= <a@example.invalid>\n\n".encode()
    parsed = _parse(head, email.policy.default)
    return [str(parsed["Subject"]), str(parsed["From"]), _parse(head, email.policy.compat32),
            email.utils.formatdate(0, localtime=True)]

