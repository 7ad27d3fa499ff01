"""smtpd: a small, readable SMTP server (RFC 5321). This file owns the sockets and threads.

    python smtpd.py [IP] [--port N] [--config FILE] [--domain D]... [--maildir DIR] [--spool DIR]

A socketserver.ThreadingTCPServer gives each client its own thread. The thread reads lines
(a buffered reader, so pipelined commands work), hands each to state.dispatch(), and writes
the reply. The protocol is in state.py, the disk in storage.py, outbound mail in relay.py.
"""
import collections
import getpass
import logging
import logging.handlers
import os
import pwd
import queue
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time

import config as configuration
import passwords
import relay
import replies
import state
from storage import Storage, StorageError, Users, add_user as add_user_to_file

MAX_COMMAND_LINE = 512          # RFC 5321 4.5.3.1.4: a command line, CRLF included
RECEIVE_SIZE = 65536


class LineTooLong(Exception):
    """A command line over the limit; its bytes were discarded up to the next line end."""


class Connection:
    """The socket side of one session: lines and message text in, replies out.

    Reading is buffered: a packet may hold several commands (PIPELINING, RFC 2920) or part
    of one. Replies are collected and sent together just before the next blocking read, so
    a pipelined group gets its replies in one packet. Every line has a deadline: a client
    that sends a partial line and stalls is timed out like an idle one.
    """

    def __init__(self, sock, timeout, stopping):
        self.sock = sock
        self.timeout = timeout
        self.stopping = stopping            # the server's shutdown Event
        self.buffer = b""
        self.pending = []
        self.waiting_for_command = False    # blocked between commands (shutdown may wake it)
        self.tls = False
        # The kernel keeps the timeouts (SO_RCVTIMEO/SO_SNDTIMEO) on a blocking socket, so a
        # recv or send is one system call; Python's own socket timeouts add a poll() to each.
        sock.settimeout(None)
        self.receive_timeout = None
        self._set_receive_timeout(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))

    def _set_receive_timeout(self, seconds):
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        self.receive_timeout = seconds

    def send(self, data):
        self.pending.append(data)

    def start_tls(self, context):
        """RFC 3207 4.2: the handshake follows the 220 at once. Anything the client sent
        after STARTTLS in clear text is discarded unread (the CVE-2011-0411 injection).
        Returns how many octets were discarded."""
        self.flush()
        discarded, self.buffer = len(self.buffer), b""
        self.sock.settimeout(self.timeout)     # the ssl module needs Python's timeouts
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.tls = True
        return discarded

    def flush(self):
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            self.sock.sendall(data)

    def _receive(self, deadline):
        """One recv that waits no later than `deadline`."""
        self.flush()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if self.tls:
            return self._receive_tls(deadline)
        # Usually the deadline is a whole idle timeout away and the option is already right;
        # it changes only while a partial line waits for its end (a slow or stalling client).
        if abs(remaining - self.receive_timeout) > 0.05:
            self._set_receive_timeout(remaining)
        try:
            return self.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:             # SO_RCVTIMEO expired
            raise TimeoutError from None

    def _receive_tls(self, deadline):
        """Under TLS the socket cannot be woken from outside (a shutdown would break the TLS
        layer the 421 must travel through), so an idle wait looks at the server every
        half second."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(min(remaining, 0.5))
            try:
                return self.sock.recv(RECEIVE_SIZE)
            except TimeoutError:
                if self.waiting_for_command and self.stopping.is_set():
                    return b""

    def read_line(self, limit=MAX_COMMAND_LINE):
        """The next line without its line end; None when the client has gone.
        Raises LineTooLong (the buffer never holds more than `limit`) or TimeoutError."""
        deadline = time.monotonic() + self.timeout
        too_long = False
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end + 1], self.buffer[end + 1:]
                if too_long or len(line) > limit:
                    raise LineTooLong
                return line[:-2] if line.endswith(b"\r\n") else line[:-1]
            if len(self.buffer) > limit:
                too_long, self.buffer = True, self.buffer[-1:]
            data = self._receive(deadline)
            if not data:
                return None
            self.buffer += data

    def read_message(self, keep_at_most, progress=None):
        """The message text after 354, up to <CRLF>.<CRLF> (RFC 5321 4.1.1.4), still
        dot-stuffed; None when the client has gone. Only that exact sequence ends it: a bare
        LF or CR never does (RFC 5321 2.3.8). Past `keep_at_most` octets the text is read
        and dropped (RawMessage.oversize). Raises TimeoutError if a line takes too long.
        `progress(octets)` (--trace) hears about every 64 KiB."""
        # The CRLF that ended "DATA" begins the terminator of an empty message.
        text = bytearray(b"\r\n")
        text += self.buffer
        self.buffer = b""
        searched, oversize, total, reported = 0, False, 0, 0
        deadline = time.monotonic() + self.timeout
        while True:
            end = text.find(b"\r\n.\r\n", searched)
            if end >= 0:
                self.buffer = bytes(text[end + 5:])
                body = b"" if oversize else bytes(text[2:end + 2])
                return state.RawMessage(body, oversize)
            if len(text) > keep_at_most:
                oversize = True
                del text[:-4]
            searched = max(0, len(text) - 4)
            data = self._receive(deadline)
            if not data:
                return None
            if b"\n" in data:
                deadline = time.monotonic() + self.timeout
            text += data
            total += len(data)
            if progress and total - reported >= 65536:
                progress(total)
                reported = total


def _timeval(seconds):
    """A struct timeval for SO_RCVTIMEO / SO_SNDTIMEO."""
    seconds = max(seconds, 0.001)           # zero would mean "wait forever"
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


class SessionLog:
    """The dialogue log: `[session] ip:port -> reply` and `<- command`, one line each."""

    def __init__(self, log, session_id, peer):
        self.log = log
        self.tag = f"[{session_id}] {peer}"
        self.enabled = log.isEnabledFor(logging.INFO)     # skip formatting when not logged

    def sent(self, reply):
        if self.log.isEnabledFor(logging.INFO):
            for line in reply.lines():
                self.log.info("%s -> %s", self.tag, line)

    def received(self, line):
        self.log.info("%s <- %s", self.tag, line)

    def trace(self, text, *args):
        """--trace: state changes and RFC sections, beside the dialogue."""
        self.log.info(f"%s    {text}", self.tag, *args)

    def info(self, text, *args):
        self.log.info(f"%s {text}", self.tag, *args)

    def error(self, text, *args, **kwargs):
        self.log.error(f"%s {text}", self.tag, *args, **kwargs)


def loggable(line):
    """A command line as the log shows it: control bytes escaped (a stray CR must not forge
    a log line), AUTH with its mechanism but never its credentials."""
    text = "".join(chr(byte) if 0x20 <= byte <= 0x7e else f"\\x{byte:02x}" for byte in line)
    verb, _, argument = text.partition(" ")
    if verb.upper() == "AUTH" and " " in argument.strip():
        return f"{verb} {argument.split()[0]} (credentials not logged)"
    return text


def format_peer(ip, port):
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class SessionHandler(socketserver.BaseRequestHandler):
    """One client, one thread: greet, then read a command and answer it until QUIT."""

    def handle(self):
        ip, port = self.client_address[:2]
        try:
            self.serve(ip, port)
        except OSError as error:                # gone before the session began
            self.server.log.info("%s connection lost: %s", format_peer(ip, port), error)
        finally:
            self.server.release(ip)             # the slot admit() gave this client

    def serve(self, ip, port):
        server = self.server
        session = state.new_session(server.protocol, ip, port)
        log = SessionLog(server.log, session["id"], format_peer(ip, port))
        connection = Connection(self.request, server.config.timeout, server.stopping)
        server.sessions[id(connection)] = (session, connection)    # unique while it lives
        try:
            self.converse(session, connection, log)
            connection.flush()
        except TimeoutError:
            self.send_and_close(connection, log, replies.TIMEOUT.format(hostname=server.hostname))
        except ssl.SSLError as error:
            log.info("TLS failed: %s", error.reason or error)
        except OSError as error:
            log.info("connection lost: %s", error)
        except Exception:
            log.error("session failed", exc_info=True)
        finally:
            server.sessions.pop(id(connection), None)
            log.info("disconnected")

    def converse(self, session, connection, log):
        server = self.server
        self.reply(connection, log, state.greeting(session))
        while session["state"] != state.CLOSED:
            connection.waiting_for_command = True
            if server.stopping.is_set():
                self.reply(connection, log, replies.SHUTTING_DOWN.format(hostname=server.hostname))
                return
            try:
                line = connection.read_line()
            except LineTooLong:
                log.received("(line over 512 octets, discarded)")
                self.reply(connection, log, state.refuse_long_line(session))
                continue
            finally:
                connection.waiting_for_command = False
            if line is None:
                if server.stopping.is_set():
                    self.reply(connection, log,
                               replies.SHUTTING_DOWN.format(hostname=server.hostname))
                return
            self.answer(session, connection, log, line)
            if session["state"] == state.DATA:
                if not self.receive_message(session, connection, log):
                    return
            if session["transition"] == ("STARTTLS", state.GREETED, state.START):
                self.start_tls(session, connection, log)

    def answer(self, session, connection, log, line):
        """Log the line (never a password: RFC 4954 14), run it, send the reply."""
        failures = session["auth_failures"]
        if session["state"] == state.AUTH:
            log.received("(SASL response, not logged)")
            reply = self.run(state.receive_auth_response, session, line, log)
        else:
            if log.enabled:
                log.received(loggable(line))
            reply = self.run(state.dispatch, session, line, log)
        if session["auth_failures"] > failures:
            time.sleep(self.server.config.auth_failure_delay)   # slows password guessing
        self.reply(connection, log, reply)
        if self.server.config.trace:
            log.trace(state.describe(session, reply))

    def start_tls(self, session, connection, log):
        discarded = connection.start_tls(self.server.tls_context)
        if discarded:
            log.info("discarded %d octets sent before the TLS handshake", discarded)
        state.restart_after_tls(session)
        log.info("TLS established: %s, %s", connection.sock.version(),
                 connection.sock.cipher()[0])

    def receive_message(self, session, connection, log):
        tracing = self.server.config.trace
        progress = None
        if tracing:
            log.trace("reading message text until <CRLF>.<CRLF> (RFC 5321 4.1.1.4)")
            progress = lambda octets: log.trace("DATA: %d octets so far", octets)
        raw = connection.read_message(state.raw_text_limit(session["server"]), progress)
        if raw is None:
            log.info("client left during DATA; nothing stored")
            return False
        size = "over the limit" if raw.oversize else f"{len(raw.text)} octets"
        log.received(f"(message text, {size})")
        if tracing:
            for note in state.framing_notes(raw):
                log.trace(note)
        reply = self.run(state.receive_message, session, raw, log)
        self.reply(connection, log, reply)
        if tracing:
            log.trace(state.describe(session, reply))
        return True

    def run(self, step, session, argument, log):
        """Run one protocol step; an unexpected error costs the transaction, not the session."""
        try:
            return step(session, argument)
        except Exception:
            log.error("error while handling a command; transaction discarded", exc_info=True)
            return state.abort_transaction(session)

    @staticmethod
    def reply(connection, log, reply):
        log.sent(reply)
        connection.send(reply.wire())

    @classmethod
    def send_and_close(cls, connection, log, reply):
        cls.reply(connection, log, reply)
        try:
            connection.flush()
        except OSError:
            pass


class SessionThreads:
    """One thread per client, as socketserver.ThreadingMixIn gives, except that a thread
    whose client has left waits for the next client instead of exiting. Starting a thread
    costs about half a millisecond of CPU, and the accept loop would wait for it each time."""

    def __init__(self, serve, keep_idle):
        self.serve = serve                  # serve(request, client_address): one session
        self.keep_idle = keep_idle          # idle threads kept for later clients
        self.clients = queue.SimpleQueue()  # (request, client_address) for an idle thread
        self.idle = 0
        self.lock = threading.Lock()

    def run(self, request, client_address):
        with self.lock:
            reuse = self.idle > 0
            if reuse:
                self.idle -= 1
        if reuse:
            self.clients.put((request, client_address))
            return
        threading.Thread(target=self._work, args=(request, client_address),
                         name="session", daemon=True).start()

    def _work(self, request, client_address):
        while True:
            self.serve(request, client_address)
            with self.lock:
                if self.idle >= self.keep_idle:
                    return
                self.idle += 1
            request, client_address = self.clients.get()


class SMTPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    request_queue_size = 4096       # a burst of connects waits in the kernel, not dropped

    def __init__(self, config, log, port=None, main=None):
        """The listener on config.port; with `main`, the submission listener (RFC 6409) on
        `port`, which shares main's users, disk and relay and requires AUTH before MAIL."""
        self.config = config
        self.log = log
        self.hostname = config.hostname
        self.address_family = socket.AF_INET6 if ":" in config.ip else socket.AF_INET
        self.stopping = threading.Event()
        self.sessions = {}                      # session id -> (session, connection)
        self._clients = collections.Counter()   # client ip -> open sessions
        self._clients_lock = threading.Lock()
        self.main = main
        self.submission = None
        self.threads = SessionThreads(self.process_request_thread, keep_idle=256)
        if main is None:
            self.users = Users(config.users_file)
            self.storage = Storage(config.maildir, config.spool)
            self.spool_lock = self.storage.lock_spool()    # one queue runner per spool
            if self.spool_lock is None:
                raise StorageError(f"spool {config.spool} is in use by process "
                                   f"{self.storage.spool_owner()}")
            self.relay = relay.QueueRunner(config, self.storage, self.users.has_mailbox, log)
            self.tls_context = make_tls_context(config)
        else:
            self.users, self.storage, self.relay = main.users, main.storage, main.relay
            self.tls_context = main.tls_context
        self.protocol = state.Server(
            hostname=config.hostname,
            local_domains=config.local_domains,
            has_mailbox=self.users.has_mailbox,
            deliver=self.deliver,
            relay_networks=config.relay_networks,
            max_message_size=config.max_message_size,
            max_recipients=config.max_recipients,
            max_errors=config.max_errors,
            tls_available=self.tls_context is not None,
            check_password=self.users.check_password,
            auth_plaintext=config.auth_allow_plaintext,
            max_auth_failures=config.auth_max_failures,
            auth_required=main is not None,
        )
        super().__init__((config.ip, config.port if port is None else port), SessionHandler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def deliver(self, envelope, message):
        name = self.storage.deliver(envelope, message)
        if name and self.relay:
            self.relay.enqueue(name)

    def process_request(self, request, client_address):
        """Admit the client (max_clients, per-IP cap) and give it a thread."""
        refusal = self.admit(client_address[0])
        if refusal:
            self.log.info("%s -> %s", format_peer(*client_address[:2]), refusal.lines()[0])
            try:
                request.sendall(refusal.wire())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.threads.run(request, client_address)
        except RuntimeError:                    # no thread could be started
            self.release(client_address[0])
            self.shutdown_request(request)

    def admit(self, ip):
        with self._clients_lock:
            if self.stopping.is_set():
                return replies.SHUTTING_DOWN.format(hostname=self.hostname)
            if sum(self._clients.values()) >= self.config.max_clients:
                return replies.TOO_MANY_CLIENTS.format(hostname=self.hostname)
            if self._clients[ip] >= self.config.max_clients_per_ip:
                return replies.TOO_MANY_FROM_YOU.format(hostname=self.hostname)
            self._clients[ip] += 1
        return None

    def release(self, ip):
        with self._clients_lock:
            self._clients[ip] -= 1
            if self._clients[ip] <= 0:
                del self._clients[ip]

    def handle_error(self, request, client_address):
        self.log.error("unhandled error for %s", client_address, exc_info=True)

    @property
    def address(self):
        return self.server_address[:2]

    def start(self):
        """Serve in a background thread (and start the relay). Returns self."""
        self._thread = threading.Thread(target=self.serve_forever, args=(0.1,), name="accept",
                                        daemon=True)
        self._thread.start()
        if self.main is None:
            self.relay.start()
        kind = "submission (AUTH required) " if self.main else ""
        self.log.info("%slistening on %s", kind, format_peer(*self.address))
        if self.submission:
            self.submission.start()
        return self

    def stop(self, grace=None):
        """Stop accepting (here and on the submission port); sessions waiting for a command
        get 421 4.3.2; sessions in DATA may finish, up to `grace` seconds in all (default
        the idle timeout). Then stop the relay and close the log."""
        listeners = [self] + ([self.submission] if self.submission else [])
        for listener in listeners:
            listener.stop_accepting()
        deadline = time.monotonic() + (self.config.timeout if grace is None else grace)
        for listener in listeners:
            listener.wait_for_sessions(deadline)
        self.relay.stop()
        self.spool_lock.close()
        self.log.info("stopped")
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)

    def stop_accepting(self):
        self.stopping.set()
        self.shutdown()
        self.server_close()
        for session, connection in list(self.sessions.values()):
            if connection.waiting_for_command and not connection.tls:    # TLS: see _receive_tls
                try:
                    connection.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    def wait_for_sessions(self, deadline):
        while self.sessions and time.monotonic() < deadline:
            time.sleep(0.01)


def make_tls_context(config):
    """The server side of STARTTLS, or None when no certificate is configured."""
    if not (config.tls_cert or config.tls_key):
        return None
    if not (config.tls_cert and config.tls_key):
        raise configuration.ConfigError("[tls] cert and key: set both, or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise configuration.ConfigError(
            f"[tls] cert/key {config.tls_cert}, {config.tls_key}: "
            f"{getattr(error, 'strerror', None) or error}") from None
    return context


def drop_privileges(config, log):
    """Started as root (to bind port 25): give the data directories to [server] user and
    become that user, as Postfix and OpenSMTPD do. `user = root` keeps root on purpose."""
    if os.geteuid() != 0:
        return
    if config.user == "root":
        log.warning("running as root because [server] user = root")
        return
    try:
        account = pwd.getpwnam(config.user)
    except KeyError:
        raise configuration.ConfigError(f"[server] user = {config.user!r}: no such user") \
            from None
    for top in (config.maildir, config.spool, config.log_dir):
        _give_tree(top, account.pw_uid, account.pw_gid)
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    log.info("running as %s (uid %d)", config.user, account.pw_uid)


def _give_tree(top, uid, gid):
    os.chown(top, uid, gid)
    for directory, subdirectories, names in os.walk(top):
        for name in subdirectories + names:
            os.chown(os.path.join(directory, name), uid, gid, follow_symlinks=False)


_instances = iter(range(1, 1 << 30))


def make_logger(config, console=True):
    """The dialogue log: <log dir>/smtpd.log (rotated) and, if asked, the console."""
    os.makedirs(config.log_dir, exist_ok=True)
    log = logging.getLogger(f"smtpd.{next(_instances)}")
    log.setLevel(config.log_level)
    log.propagate = False
    formatter = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.handlers.RotatingFileHandler(
        os.path.join(config.log_dir, "smtpd.log"), maxBytes=10 << 20, backupCount=5)]
    if console:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    return log


def start(config, console=True, as_service=False):
    """Build, bind and start a server for `config` (tests use port 0). Returns the server.
    `as_service` (the command line) drops root privileges after binding."""
    log = make_logger(config, console)
    server = None
    try:
        server = SMTPServer(config, log)
        if config.submission_port:
            server.submission = SMTPServer(config, log, port=config.submission_port, main=server)
        if as_service:
            drop_privileges(config, log)
    except BaseException:
        if server:
            server.server_close()
            server.spool_lock.close()
        for handler in list(log.handlers):
            handler.close()
            log.removeHandler(handler)
        raise
    return server.start()


def main(argv=None):
    try:
        config, args = configuration.load(sys.argv[1:] if argv is None else argv)
        if args.fsm:
            print(state.draw(args.fsm))
            return 0
        if args.queue:
            return show_queue(config)
        if args.flush:
            return flush_queue(config)
        if args.add_user:
            return add_user(config, args.add_user)
        server = start(config, as_service=True)
    except configuration.ConfigError as error:
        return fail(f"smtpd: {error}")
    except StorageError as error:
        return fail(f"smtpd: {error}")
    except OSError as error:
        return fail(f"smtpd: cannot listen on {format_peer(config.ip, config.port)}: "
                    f"{error.strerror or error}")
    return serve_until_signalled(server)


def serve_until_signalled(server):
    """SIGINT/SIGTERM stop the server; SIGUSR1 makes the queue due now (--flush)."""
    stop_requested = threading.Event()

    def request_stop(signum, frame):
        stop_requested.set()

    def request_flush(signum, frame):
        threading.Thread(target=server.relay.flush, daemon=True).start()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGUSR1, request_flush)
    while not stop_requested.wait(1):
        pass
    server.stop()
    return 0


def show_queue(config):
    """python smtpd.py --queue: the queue, like Postfix's mailq."""
    storage = Storage(config.maildir, config.spool)
    print("\n".join(relay.queue_listing(storage)))
    return 0


def flush_queue(config):
    """python smtpd.py --flush: ask the running server to deliver the queue now, or, when
    no server holds the spool, make one delivery attempt for every message here."""
    storage = Storage(config.maildir, config.spool)
    lock = storage.lock_spool()
    if lock is None:
        owner = storage.spool_owner()
        os.kill(owner, signal.SIGUSR1)
        print(f"smtpd: asked the running server (pid {owner}) to deliver the queue now")
        return 0
    log = make_logger(config)
    runner = relay.QueueRunner(config, storage, Users(config.users_file).has_mailbox, log)
    try:
        runner.start()
        runner.wait_for_one_pass(runner.flush())
        runner.stop()
    finally:
        lock.close()
    print("\n".join(relay.queue_listing(storage)))
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
        add_user_to_file(config.users_file, f"{local_part}@{domain}",
                         passwords.hash_password(password))
    except (OSError, StorageError) as error:
        return fail(f"smtpd: --add-user: {error}")
    print(f"smtpd: {local_part}@{domain} added to {config.users_file}")
    return 0


def fail(line):
    print(line, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
