"""smtpd: a small, readable SMTP server (RFC 5321). This file owns the sockets and threads.

    python smtpd.py [IP] [--port N] [--config FILE] [--domain D]... [--maildir DIR] [--spool DIR]

A `Listener` (socketserver.TCPServer) accepts clients and gives each one a thread of its own
(`SessionThreads`: socketserver's ThreadingMixIn, except that a thread whose client has gone
waits for the next client instead of exiting). The thread reads lines (buffered, so that
pipelined commands work), hands each to state.dispatch(), sends the reply, and then does what
the reply says: read the next command, read the message text, read a SASL line, start TLS,
or close. The protocol is in state.py, the shared parts (users, disk, queue) in mailsystem.py.
"""
import functools
import os
import queue
import selectors
import socket
import socketserver
import ssl
import sys
import threading
import time

import commands
import config as configuration
import daemon
import dkimsign
import events
import explain
import processes
import replies
import signals
import state
from admission import Admission
from aliases import AliasError
from connection import ClientTooSlow, Connection, LineTooLong
from envelope import Client
from mailsystem import MailSystem
from replies import Next
from sessionlog import SessionLog, format_peer, loggable
from storage import StorageError
from users import UsersFileError

CUT_OFF_WAIT = 1.0      # seconds for sessions cut off at shutdown to log their end

# The pseudo-verbs whose 250 means "stored" (RFC 5321 6.1), for the web view's counters
MESSAGE_ENDS = frozenset({state.END_OF_DATA, state.END_OF_LAST_CHUNK})




class SessionRunner:
    """One client's session, from the greeting to the close, on the thread it was given."""

    def __init__(self, listener, request, client_address):
        self.listener = listener
        self.config = listener.system.config
        self.ip, self.port = client_address[:2]
        self.session = state.Session(listener.policy, Client(self.ip, self.port))
        peer = format_peer(self.ip, self.port)
        self.connection = Connection(request, self.config, listener.shutdown_signal.wakeup,
                                     listener.system.log)
        hub = listener.events
        self.log = SessionLog(listener.system.log, self.session.id, peer,
                              hub.open_session(self.session, peer) if hub else None)
        self.trace_after = None         # --trace: the line that follows the next reply
        self.transition = None          # the move of the reply about to be sent

    def run(self):
        connection, log = self.connection, self.log
        try:
            self.converse()
        except ClientTooSlow as slow:
            self.send(slow.reply.format(hostname=self.config.hostname))
            self._flush_quietly()
        except ssl.SSLError as error:
            log.info("TLS failed: %s", error.reason or error)
        except OSError as error:
            log.info("connection lost: %s", error)
        except Exception:
            log.error("session failed", exc_info=True)
        finally:
            state.end_session(self.session)
            connection.close()
            log.info("disconnected")
            if log.record is not None:
                self.listener.events.close_session(log.record)

    def converse(self):
        if self.listener.implicit_tls:          # RFC 8314 3.3: TLS from the first byte
            self.connection.start_tls(self.listener.system.tls_context)
            self.session.tls = True
        reply = state.greeting(self.session)
        while reply.then is not Next.CLOSE:
            if reply.then is Next.CHUNK:        # BDAT: its octets come before its reply
                reply = self.receive_chunk(reply.octets)
            else:
                self.send(reply)
                reply = self.next_reply(reply.then)
            if reply is None:                   # the client has gone
                return
        self.send(reply)
        self.connection.flush()

    def next_reply(self, then):
        """Do what the last reply said, and return the reply to send next."""
        if then is Next.TLS:
            self.start_tls()
            then = Next.COMMAND
        if then is Next.TEXT:
            return self.receive_text()
        return self.receive_line(then)

    def receive_line(self, then):
        stopping = self.listener.shutdown_signal
        if stopping.is_set():
            return self.shutting_down()
        connection = self.connection
        connection.waiting_for_command = True
        try:
            line = connection.read_line(state.LINE_LIMITS[then])
        except LineTooLong:
            self.log.received("(line too long, discarded)")
            return state.refuse_long_line(self.session)
        finally:
            connection.waiting_for_command = False
        if line is None:
            return self.shutting_down() if stopping.is_set() else None
        if then is Next.SASL:
            self.log.received("(SASL response, not logged)")
            return self.run_step(state.receive_auth_response, line)
        self.log.received(loggable(line))
        return self.run_step(state.dispatch, line)

    def receive_text(self):
        tracing = self.config.trace
        progress = None
        if tracing:
            self.log.trace("reading message text until <CRLF>.<CRLF> (RFC 5321 4.1.1.4)")
            progress = lambda octets: self.log.trace(f"DATA: {octets} octets so far")
        text, envelope = self.session.text, self.session.envelope
        if not self._read_unless_cut_off(self.connection.read_text, text, progress):
            self.log.info("%s during DATA; nothing stored", self._why_gone())
            return None
        size = "over the limit" if text.oversize else f"{text.size} octets"
        self.log.received(f"(message text, {size})")
        if tracing:
            for note in explain.framing_notes(text):
                self.log.trace(note)
        return self._stored(self.run_step(state.receive_text), envelope, text)

    def receive_chunk(self, octets):
        """Read a BDAT chunk into the message (or drop it, when BDAT was refused) and return
        its reply (RFC 3030 2)."""
        text, envelope = self.session.text, self.session.envelope
        if not self._read_unless_cut_off(self.connection.read_chunk, octets, text):
            self.log.info("%s during BDAT; nothing stored", self._why_gone())
            return None
        self.log.received(f"(BDAT chunk, {octets} octets)")
        return self._stored(self.run_step(state.receive_chunk), envelope, text)

    def _read_unless_cut_off(self, read, *arguments):
        """read(*arguments), False when the client has gone; also when this server cut the
        session off at the end of the shutdown grace and the client's next octets then met the
        closed socket (a reset, not an end of file)."""
        try:
            return read(*arguments)
        except ConnectionResetError:
            if self.listener.shutdown_signal.is_set():
                return False
            raise

    def _why_gone(self):
        return "cut off at the end of the shutdown grace" \
            if self.listener.shutdown_signal.is_set() else "client left"

    def _stored(self, reply, envelope, text):
        """Count a message the reply says was stored (RFC 5321 6.1: the 250 after the end of
        the text, or of the LAST chunk)."""
        move = self.transition
        if reply.code < 300 and move is not None and move.verb in MESSAGE_ENDS:
            self.log.accepted(envelope, text.size)
        return reply

    def run_step(self, step, *argument):
        """Run one protocol step; an unexpected error costs the transaction, not the session."""
        try:
            reply = step(self.session, *argument)
            self.transition = self.session.transition
        except Exception:
            self.log.error("error while handling a command; transaction discarded",
                           exc_info=True)
            reply = state.abort_transaction(self.session)
            self.transition = None
        if reply.then is Next.CHUNK:            # no reply line: the move is shown alone
            self.log.moved(self.transition)
            self.transition = None
        if self.config.trace:                   # logged after the reply line (send)
            self.trace_after = explain.describe(self.session, reply)
            if reply.then is Next.CHUNK:        # no reply line comes first
                self.log.trace(self.trace_after)
                self.trace_after = None
        return reply

    def start_tls(self):
        connection = self.connection
        discarded = connection.start_tls(self.listener.system.tls_context)
        if discarded:
            self.log.info("discarded %d octets sent before the TLS handshake", discarded)
        state.restart_after_tls(self.session)
        self.log.info("TLS established: %s, %s", connection.sock.version(),
                      connection.sock.cipher()[0])

    def shutting_down(self):
        return replies.SHUTTING_DOWN.format(hostname=self.config.hostname)

    def send(self, reply):
        if reply.delay:
            self.connection.flush()
            time.sleep(reply.delay)
        self.log.sent(reply, self.transition)
        self.transition = None
        if self.trace_after:
            self.log.trace(self.trace_after)
            self.trace_after = None
        self.connection.send(reply.wire())

    def _flush_quietly(self):
        try:
            self.connection.flush()
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
        self.stopped = False
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
                if self.stopped or self.idle >= self.keep_idle:
                    return
                self.idle += 1
            job = self.clients.get()
            if job is None:                 # stop(): no more clients
                return
            request, client_address = job

    def stop(self):
        """Let every idle thread end."""
        with self.lock:
            self.stopped = True
            idle, self.idle = self.idle, 0
        for _ in range(idle):
            self.clients.put(None)


class Listener(socketserver.TCPServer):
    """One listening socket: the SMTP port; or the submission port (RFC 6409), where AUTH
    is required before MAIL; or the submissions port (RFC 8314), the same under TLS from
    the first byte. It accepts until `stop_accepting`, woken by an event."""
    allow_reuse_address = True
    request_queue_size = 4096       # a burst of connects waits in the kernel, not dropped

    def __init__(self, system, admission, shutdown, port, auth_required=False,
                 implicit_tls=False, events=None):
        self.system = system
        self.events = events            # events.Hub when the web view is on, else None
        self.admission = admission
        self.shutdown_signal = shutdown
        self.auth_required = auth_required
        self.implicit_tls = implicit_tls
        self.policy = system.policy(auth_required)
        self.sessions = {}              # id(runner) -> runner, while its session lasts
        self.threads = SessionThreads(self.serve_client, keep_idle=256)
        ip = system.config.ip
        self.address_family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        super().__init__((ip, port), None)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    @property
    def address(self):
        return self.server_address[:2]

    @property
    def kind(self):
        """What the "listening on" line calls it."""
        return "submissions (TLS, AUTH required) " if self.implicit_tls else \
            "submission (AUTH required) " if self.auth_required else ""

    def accept_until_stopped(self):
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self.shutdown_signal.wakeup, selectors.EVENT_READ)
            while not self.shutdown_signal.is_set():
                for key, _ in selector.select():
                    if key.fileobj is not self.socket:
                        return
                    try:
                        request, client_address = self.get_request()
                    except OSError:
                        continue
                    self.process_request(request, client_address)

    def process_request(self, request, client_address):
        """Admit the client (max_clients, per-IP cap) and give it a thread."""
        refusal = self.admission.admit(client_address[0])
        if refusal:
            self.system.log.info("%s -> %s", format_peer(*client_address[:2]),
                                 refusal.lines()[0])
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
            self.admission.release(client_address[0])
            self.shutdown_request(request)

    def serve_client(self, request, client_address):
        try:
            runner = SessionRunner(self, request, client_address)
        except OSError as error:                # gone before the session began
            self.system.log.info("%s connection lost: %s",
                                 format_peer(*client_address[:2]), error)
            self.admission.release(client_address[0])
            return
        self.sessions[id(runner)] = runner
        try:
            runner.run()
        finally:
            self.sessions.pop(id(runner), None)
            self.admission.release(client_address[0])
            self.shutdown_signal.session_ended()

    def stop_accepting(self):
        self.server_close()
        for runner in list(self.sessions.values()):
            connection = runner.connection
            if connection.waiting_for_command and not connection.tls:   # TLS: the wakeup
                try:
                    connection.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    def end_sessions(self):
        """Past the grace period: cut off the sessions still open."""
        for runner in list(self.sessions.values()):
            try:
                runner.connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.threads.stop()


class Shutdown:
    """How a server tells its listeners and sessions that it is stopping: an event for the
    threads that look, and a pipe that becomes readable for those that wait in a poll."""

    def __init__(self):
        self.event = threading.Event()
        self.wakeup, self._wakeup_write = os.pipe()
        self.sessions_ended = threading.Condition()

    def is_set(self):
        return self.event.is_set()

    def begin(self):
        self.event.set()
        os.write(self._wakeup_write, b"x")      # never read: it stays readable

    def session_ended(self):
        with self.sessions_ended:
            self.sessions_ended.notify_all()

    def wait_for(self, predicate, timeout):
        with self.sessions_ended:
            self.sessions_ended.wait_for(predicate, timeout)

    def close(self):
        os.close(self.wakeup)
        os.close(self._wakeup_write)


class Server:
    """A running smtpd: the mail system and its listeners (port 25 and, if configured, the
    submission port), each accepting on a thread of its own."""

    def __init__(self, config, log):
        self.config = config
        self.log = log
        self.system = MailSystem(config, log)
        self.shutdown = Shutdown()
        admission = Admission(config)
        self.events = events.Hub() if config.web_listen else None
        self.listeners = []
        self.web = None
        hub = self.events
        try:
            self.listeners.append(Listener(self.system, admission, self.shutdown, config.port,
                                           events=hub))
            if config.submission_port:
                self.listeners.append(Listener(self.system, admission, self.shutdown,
                                               config.submission_port, auth_required=True,
                                               events=hub))
            if config.submissions_port:
                if self.system.tls_context is None:
                    raise configuration.ConfigError(
                        "[tls] submissions_port: needs [tls] cert and key (TLS from the "
                        "first byte)")
                self.listeners.append(Listener(self.system, admission, self.shutdown,
                                               config.submissions_port, auth_required=True,
                                               implicit_tls=True, events=hub))
            if config.web_listen:
                self.web = make_web_view(self)
        except BaseException:
            self.close()
            raise
        self._threads = []

    @property
    def address(self):
        return self.listeners[0].address

    def start(self):
        """Start the queue runner, then accept on every listener. Returns self."""
        self.system.start()
        self.start_accepting()
        self.start_web()
        return self

    def start_accepting(self, announce=True):
        for listener in self.listeners:
            thread = threading.Thread(target=listener.accept_until_stopped, name="accept",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
            if announce:
                self.log.info("%slistening on %s", listener.kind,
                              format_peer(*listener.address))

    def start_web(self):
        if self.web:
            self.system.queue.watch(self.events)
            self.web.start()
            self.log.info("web view on %s", self.web.url)

    # [server] processes (processes.py): what a forked process keeps of the server it was

    def become_accepting_process(self, admission, hub, outbound):
        """Ask `admission` before greeting a client, publish sessions to `hub` (None: no web
        view), hand stored mail to `outbound`. The queue and the web view are other
        processes'; the spool lock stays open here too, so that no other server takes the
        spool (and removes this one's files in spool/tmp as leftovers) while this process
        still stores mail."""
        self.system.hand_off_to(outbound)
        self.events = hub
        for listener in self.listeners:
            listener.admission = admission
            listener.events = hub
            # several processes wait on the socket; those the client did not go to must not
            # then block in accept()
            listener.socket.setblocking(False)
        if self.web:
            self.web.close()
            self.web = None

    def become_queue_process(self):
        """Deliver the queue and serve the web view; the SMTP ports are other processes'.
        The spool lock stays open here too: while this process delivers, even after the
        supervisor has gone, no other server may take the spool."""
        for listener in self.listeners:
            listener.server_close()
        self.listeners = []
        self.system.start_queue()
        self.start_web()

    def run_until_signalled(self, arrived):
        """SIGINT/SIGTERM/SIGHUP stop the server; SIGUSR1 makes the queue due now (--flush).
        `arrived`: the signals.Signals for signals.HANDLED, made before the server started,
        so that a signal that came meanwhile is acted on now. The main thread does nothing
        else (signals.py says why it waits that way)."""
        while True:
            numbers = arrived.wait()
            if signals.FLUSH in numbers:
                threading.Thread(target=self.system.queue.flush, daemon=True).start()
            if any(number in signals.STOP for number in numbers):
                break
        arrived.close()
        self.stop()
        return 0

    def stop(self, grace=None):
        """Stop accepting everywhere; sessions waiting for a command get 421 4.3.2, sessions
        in DATA may finish, up to `grace` seconds in all (default the idle timeout). Then
        stop the queue runner and close the log. A second call does nothing."""
        if self.wind_down(grace):
            self.log.info("stopped")
        self.log.close()

    def wind_down(self, grace=None):
        """stop() without its last log line; False when the server was already stopping."""
        if self.shutdown.is_set():
            return False
        self.shutdown.begin()
        for thread in self._threads:            # the accept loops see the wakeup and end
            thread.join(5)
        for listener in self.listeners:
            listener.stop_accepting()
        self.shutdown.wait_for(lambda: not any(listener.sessions for listener in self.listeners),
                               self.config.timeout if grace is None else grace)
        for listener in self.listeners:
            listener.end_sessions()
        # the cut-off sessions' threads log why they ended before the process goes
        self.shutdown.wait_for(lambda: not any(listener.sessions for listener in self.listeners),
                               CUT_OFF_WAIT)
        if self.web:
            self.web.stop()
        self.system.stop()
        self.shutdown.close()
        return True

    def close(self):
        """Undo a Server that never started (start-up failed after binding)."""
        for listener in self.listeners:
            listener.server_close()
        if self.web:
            self.web.close()
        self.shutdown.close()


def make_web_view(server):
    """The web view (web.py), bound now: before the privilege drop, like the SMTP ports.
    Imported here, so that no SMTP module depends on the web side and a server without
    [web] listen never loads it. Raises ConfigError with the one line to show."""
    import web
    return web.WebView(server)


def start(config, log=None, console=True):
    """Build, bind and start a server for `config` in this process (the tests use port 0),
    without the start-up steps of the command line. Returns the running Server."""
    log = log or daemon.make_log(config, console)
    try:
        daemon.prepare_directories(config)
        log.open_file(daemon.log_path(config))
        server = Server(config, log)
    except BaseException:
        log.close()
        raise
    return server.start()


def main(argv=None):
    """The command line: serve, or one of the tools (--fsm, --queue, --flush, --add-user,
    --dkim-keygen, --tls-domains)."""
    try:
        config, args = configuration.load(sys.argv[1:] if argv is None else argv)
        if args.fsm:
            print(explain.draw(args.fsm))
            return 0
        if args.queue:
            return commands.show_queue(config)
        if args.flush:
            return commands.flush_queue(config)
        if args.add_user:
            return commands.add_user(config, args.add_user)
        if args.dkim_keygen:
            return dkimsign.keygen_main(config, args.dkim_keygen,
                                        args.selector or config.dkim_selector)
        if args.tls_domains:
            return commands.show_tls_domains(config)
        # From here a SIGTERM waits for the server to be up, then stops it in order: the
        # default action would kill a server that has already greeted a client.
        arrived = signals.Signals(signals.HANDLED)
        make_server = Server if config.processes == 1 else \
            functools.partial(processes.Supervisor, Server, arrived=arrived)
        server = daemon.start_service(config, make_server)
    except (configuration.ConfigError, daemon.StartupError, StorageError, UsersFileError,
            AliasError, dkimsign.SigningKeyError) as error:
        return commands.fail(f"smtpd: {error}")
    return server.run_until_signalled(arrived)


if __name__ == "__main__":
    sys.exit(main())
