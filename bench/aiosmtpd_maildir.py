"""The aiosmtpd peer for bench/run.py: aiosmtpd with a handler that stores every message in
each recipient's Maildir, <maildir>/<domain>/<user>/new/, with Python's mailbox.Maildir
(written to tmp/, then linked into new/).

    python bench/aiosmtpd_maildir.py --port P --maildir DIR [--fsync] [--backlog N]

mailbox.Maildir.add() quietly fsyncs each message file (not the directory) before linking
it; the handler runs inside the event loop, so that fsync blocks every session. By default
this peer turns that fsync off (the issue's peer is "aiosmtpd-Maildir, which does not
fsync"); `--fsync` keeps the standard library's behaviour as it ships.

It listens on 127.0.0.1 only. The backlog defaults to asyncio's own default (100), which is
what aiosmtpd's Controller and `python -m aiosmtpd` use.
"""
import argparse
import asyncio
import logging
import mailbox
import os
import signal

from aiosmtpd.smtp import SMTP


def _close_without_fsync(file):
    """Stands in for mailbox._sync_close (flush, fsync, close): flush and close only."""
    file.close()


class MaildirHandler:
    """One copy of the message in every recipient's Maildir (like a local delivery agent)."""

    def __init__(self, root):
        self.root = root
        self.boxes = {}

    def box(self, address):
        local_part, _, domain = address.lower().rpartition("@")
        folder = os.path.join(self.root, domain or "localhost", local_part)
        box = self.boxes.get(folder)
        if box is None:
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            box = self.boxes[folder] = mailbox.Maildir(folder, factory=None, create=True)
        return box

    async def handle_DATA(self, server, session, envelope):
        message = b"Return-Path: <%s>\r\n" % envelope.mail_from.encode() + envelope.content
        for address in envelope.rcpt_tos:
            self.box(address).add(message)
        return "250 2.0.0 Ok: queued"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--backlog", type=int, default=100,
                        help="listen backlog (default 100, asyncio's and aiosmtpd's default)")
    parser.add_argument("--fsync", action="store_true",
                        help="keep mailbox.Maildir's own fsync of each message file")
    args = parser.parse_args()
    if not args.fsync:
        mailbox._sync_close = _close_without_fsync
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    handler = MaildirHandler(args.maildir)

    async def serve():
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="aiosmtpd.test", decode_data=False),
            host="127.0.0.1", port=args.port, backlog=args.backlog)
        await stop
        server.close()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
