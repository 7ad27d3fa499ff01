"""[server] processes = N: one server as N accepting processes, a queue process and the
supervisor that forks them, so that sessions run on every core (each process has its own
interpreter lock). With processes = 1, the default, none of this runs.

    supervisor           the process the user started: binds, drops privileges, takes the
     |                   spool lock (so --flush's SIGUSR1 and SIGTERM reach it); no threads
     |-- queue process   the queue runner and the web view (MailSystem.start_queue)
     '-- accepting 1..N  the listeners and one thread per client, as with processes = 1,
                         all accepting on the same sockets, bound before the fork

Each child talks to the supervisor over a socketpair of its own (SOCK_SEQPACKET: one pickled
message per send); what is for the queue process the supervisor passes on:

    ADMIT n ip        accepting -> supervisor, answered at once with ADMITTED n and None or
                      the 421 to send (max_clients and max_clients_per_ip count every process)
    RELEASE ip        accepting -> supervisor: that client's session has ended
    QUEUE name        accepting -> supervisor -> queue: a spool file, durable, to deliver
    SESSION ...       accepting -> supervisor -> queue: a session's line, for the web view
                      (remotesessions.py)
    PROCESS_ENDED n   supervisor -> queue: accepting process n has gone, and its sessions
    FLUSH             supervisor -> queue: --flush (SIGUSR1) came

A child that ends unexpectedly is forked again and the places its clients held are freed;
what it stored is in the spool, and a new queue process takes up the whole spool. The
supervisor never starts a thread, so no fork copies a lock that another thread holds. On
SIGTERM, SIGINT or SIGHUP it stops the accepting processes (each lets sessions in DATA finish, as one
process does), then the queue process.

Every child keeps its inherited copy of the spool lock (flock(2): one lock, held until its
last copy is closed). A supervisor killed with SIGKILL leaves children that notice at once
(their channel ends) and stop, sessions in DATA within ORPHAN_GRACE; until the last has
ended, a new server is refused the spool, so nothing is delivered twice and no file of theirs
is taken for a leftover.
"""
import collections
import enum
import errno
import os
import pickle
import queue
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import replies
import signals
from admission import Admission
from remotesessions import DROPPABLE, ForwardingHub, RemoteSessions
from sessionlog import format_peer

MESSAGE_LIMIT = 1 << 16         # octets in one message (remotesessions.py cuts lines to fit)
RESTART_DELAY = 1.0             # a child that lived shorter than this waits before a restart
ADMIT_TIMEOUT = 10.0            # seconds an accepting process waits for the supervisor
STOP_MARGIN = 10.0              # seconds past the grace period before a child is killed
QUEUE_STOP_TIMEOUT = 5.0        # seconds for the queue process (its runner waits 2 s)
ORPHAN_GRACE = 5.0              # seconds for sessions in DATA once the supervisor is gone
OUTBOX_LIMIT = 10000            # messages waiting for a child before web view lines are dropped


class Say(enum.Enum):
    """What a message says (its first item)."""
    ADMIT = "admit"
    ADMITTED = "admitted"
    RELEASE = "release"
    QUEUE = "queue"
    SESSION = "session"
    PROCESS_ENDED = "process ended"
    FLUSH = "flush"


class Role(enum.Enum):
    QUEUE = "queue process"
    ACCEPTING = "accepting process"


class Channel:
    """One end of a socketpair between the supervisor and a child."""

    def __init__(self, sock):
        self.sock = sock

    def send(self, *message):
        """Send one message (blocking); False when the other end has gone."""
        try:
            self.sock.send(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
            return True
        except OSError:
            return False

    def receive(self):
        """The next message as a tuple, or None once the other end has gone."""
        try:
            data = self.sock.recv(MESSAGE_LIMIT)
        except BlockingIOError:
            raise
        except OSError:
            return None
        return pickle.loads(data) if data else None

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()


class Outbox:
    """The supervisor's end of a channel: it must never wait for a child (one that does not
    read, stopped or busy, would hold up every other), so what the child's socket cannot
    take now waits here, sent when select() says it can. Web view lines are dropped past
    OUTBOX_LIMIT waiting messages; spool names and everything else never are."""

    def __init__(self, channel):
        self.channel = channel
        channel.sock.setblocking(False)
        self.waiting = collections.deque()
        self.dropped = 0

    def post(self, *message, droppable=False):
        if droppable and len(self.waiting) >= OUTBOX_LIMIT:
            self.dropped += 1
            return
        self.waiting.append(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
        self.flush()

    def flush(self):
        """Send what the socket takes now."""
        while self.waiting:
            try:
                self.channel.sock.send(self.waiting[0])
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno != errno.EMSGSIZE:   # the child has gone: read below
                    self.waiting.clear()
                    return
                self.dropped += 1                   # never made: kept short (LINE_LIMIT)
            self.waiting.popleft()


# --- in the supervisor ---------------------------------------------------------------------

@dataclass
class Child:
    role: Role
    number: int                     # 1..N for an accepting process, 0 for the queue process
    pid: int
    channel: Channel                # the supervisor's end
    outbox: Outbox
    started: float
    admitted: collections.Counter = field(default_factory=collections.Counter)

    @property
    def name(self):
        return f"{self.role.value} {self.number}" if self.role is Role.ACCEPTING \
            else self.role.value


class Supervisor:
    """The server as processes; made where smtpd.Server would be (daemon.start_service)."""

    def __init__(self, make_server, config, log, arrived=None):
        self.config = config
        self.log = log
        self.server = make_server(config, log)  # built and bound here, forked into each child
        self.system = self.server.system
        self.admission = Admission(config)
        self.children = {}                      # channel fileno -> Child
        self.restarts = []                      # (when, role, number) of children to fork
        # signals.Signals, made before start(): a child forked meanwhile closes it
        self.signals = arrived
        self.stop_requested = False
        self.flush_requested = False
        self.stopping_since = None              # when SIGTERM went to the accepting processes
        self.queue_stopped_at = None            # when SIGTERM went to the queue process

    def close(self):
        self.server.close()

    def start(self):
        """Take the spool, fork the queue process and the accepting processes. Returns self."""
        self.system.take_spool()
        self._fork(Role.QUEUE, 0)
        for number in range(1, self.config.processes + 1):
            self._fork(Role.ACCEPTING, number)
        for listener in self.server.listeners:
            self.log.info("%slistening on %s", listener.kind, format_peer(*listener.address))
        self.log.info("%d accepting processes and a queue process ([server] processes)",
                      self.config.processes)
        return self

    def _fork(self, role, number):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        # until the child has its own Signals, a signal for it must wait (not be taken for
        # the supervisor's through the wakeup descriptor they share)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals.HANDLED)
        try:
            pid = os.fork()
            if pid == 0:
                ours.close()
                self._run_child(role, number, Channel(theirs), mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        channel = Channel(ours)
        child = Child(role, number, pid, channel, Outbox(channel), time.monotonic())
        self.children[child.channel.fileno()] = child
        return child

    def _run_child(self, role, number, channel, mask):
        """In the forked process: never returns. SIGTERM (or the supervisor's end) stops it;
        SIGINT and SIGHUP are the supervisor's to act on. `mask`: the signal mask to restore."""
        code = 1
        try:
            if self.signals:
                self.signals.close()
            signal.signal(signal.SIGINT, signal.SIG_IGN)       # a terminal's ^C and hang-up
            signal.signal(signal.SIGHUP, signal.SIG_IGN)       # reach every process
            signal.signal(signals.FLUSH, signal.SIG_IGN)
            sigterm = signals.Signals([signal.SIGTERM])
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for child in self.children.values():   # the other children's channels
                child.channel.close()
            self.log.reopen_after_fork()
            run = run_queue_process if role is Role.QUEUE else run_accepting_process
            code = run(self.server, channel, sigterm)
        except BaseException:
            self.log.error("%s failed", role.value, exc_info=True)
        finally:
            self.log.close()
            os._exit(code)

    # the loop

    def run_until_signalled(self, arrived):
        """`arrived`: the signals.Signals for signals.HANDLED, made before start()."""
        self.signals = arrived
        while self.children or self.restarts:
            self._act_on_signals()
            self._restart_due()
            behind = [fileno for fileno, child in self.children.items()
                      if child.outbox.waiting]
            readable, writable, _ = select.select([self.signals, *self.children], behind, [],
                                                  self._wait())
            for ready in writable:
                if ready in self.children:
                    self.children[ready].outbox.flush()
            for ready in readable:
                if ready is self.signals:
                    self._note(self.signals.take())
                elif ready in self.children:        # not reaped meanwhile
                    self._receive(self.children[ready])
        self.signals.close()
        self.system.leave_spool()
        self.log.info("stopped")
        self.log.close()
        return 0

    def _note(self, numbers):
        if signals.FLUSH in numbers:
            self.flush_requested = True
        if any(number in signals.STOP for number in numbers):
            self.stop_requested = True

    def _act_on_signals(self):
        if self.flush_requested:
            self.flush_requested = False
            self._send_to_queue(Say.FLUSH)
        if self.stop_requested and self.stopping_since is None:
            self.stopping_since = time.monotonic()
            self.restarts = []
            self._signal(Role.ACCEPTING, signal.SIGTERM)
        if self.stopping_since is None:
            return
        now = time.monotonic()
        if not self._of(Role.ACCEPTING) and self.queue_stopped_at is None:   # then the queue
            self.queue_stopped_at = now
            self._signal(Role.QUEUE, signal.SIGTERM)
        if now - self.stopping_since > self.config.timeout + STOP_MARGIN:
            self._signal(Role.ACCEPTING, signal.SIGKILL)
        if self.queue_stopped_at is not None and \
                now - self.queue_stopped_at > QUEUE_STOP_TIMEOUT:
            self._signal(Role.QUEUE, signal.SIGKILL)

    def _wait(self):
        """Seconds select() may wait: until the next restart is due, or a stop's deadline."""
        waits = [when - time.monotonic() for when, _, _ in self.restarts]
        if self.stopping_since is not None:
            waits.append(1.0)
        return max(0.0, min(waits)) if waits else None

    def _of(self, role):
        return [child for child in self.children.values() if child.role is role]

    def _signal(self, role, signum):
        for child in self._of(role):
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    def _send_to_queue(self, *message, droppable=False):
        for child in self._of(Role.QUEUE):
            child.outbox.post(*message, droppable=droppable)

    def _receive(self, child):
        try:
            message = child.channel.receive()
        except BlockingIOError:                 # select() said readable; nothing after all
            return
        if message is None:
            self._ended(child)
            return
        say, *arguments = message
        if say is Say.ADMIT:
            number, ip = arguments
            refusal = self.admission.admit(ip)
            if refusal is None:
                child.admitted[ip] += 1
            child.outbox.post(Say.ADMITTED, number, refusal)
        elif say is Say.RELEASE:
            ip, = arguments
            self._release(child, ip)
        elif say is Say.QUEUE:
            self._send_to_queue(Say.QUEUE, *arguments)
        elif say is Say.SESSION:
            operation = arguments[1]
            self._send_to_queue(Say.SESSION, child.number, *arguments,
                                droppable=operation in DROPPABLE)

    def _release(self, child, ip, count=1):
        for _ in range(min(count, child.admitted[ip])):
            self.admission.release(ip)
            child.admitted[ip] -= 1
        if child.admitted[ip] <= 0:
            del child.admitted[ip]

    def _ended(self, child):
        """A child's channel closed: it has ended (or is ending). Reap it; if the server is
        not stopping, free its clients' places and fork it again."""
        del self.children[child.channel.fileno()]
        child.channel.close()
        _, status = os.waitpid(child.pid, 0)
        for ip, count in list(child.admitted.items()):
            self._release(child, ip, count)
        if child.role is Role.ACCEPTING:
            self._send_to_queue(Say.PROCESS_ENDED, child.number)
        if self.stopping_since is not None:
            return
        self.log.error("%s (pid %d) ended unexpectedly (%s); starting it again", child.name,
                       child.pid, _describe(status))
        lived = time.monotonic() - child.started
        when = time.monotonic() + (RESTART_DELAY if lived < RESTART_DELAY else 0)
        self.restarts.append((when, child.role, child.number))

    def _restart_due(self):
        now = time.monotonic()
        due = [restart for restart in self.restarts if restart[0] <= now]
        self.restarts = [restart for restart in self.restarts if restart[0] > now]
        for _, role, number in due:
            child = self._fork(role, number)
            self.log.info("%s started again (pid %d)", child.name, child.pid)


def _describe(status):
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


# --- in a child ----------------------------------------------------------------------------

class SupervisorLink:
    """A child's end of its channel: messages out from any thread, and a thread that reads
    what the supervisor sends (`handle(message)`) until it has gone (`on_gone()`)."""

    def __init__(self, channel, handle, on_gone):
        self.channel = channel
        self.handle = handle
        self.on_gone = on_gone

    def start(self):
        threading.Thread(target=self._read, name="supervisor", daemon=True).start()

    def send(self, *message):
        return self.channel.send(*message)

    def _read(self):
        while True:
            message = self.channel.receive()
            if message is None:
                self.on_gone()
                return
            self.handle(message)


class RemoteAdmission:
    """Admission (admission.py) for an accepting process: the supervisor counts. Questions
    are numbered, so that an answer that comes after its question was given up on is not
    taken for the next one's (and the place it granted is given back)."""

    def __init__(self, link, config, log):
        self.link = link
        self.config = config
        self.log = log
        self.answers = queue.SimpleQueue()      # (question number, None or the 421)
        self.asked = 0
        self.given_up = {}                      # question number -> ip
        self.given_up_lock = threading.Lock()   # the waiting thread and the link's reader
        self.lock = threading.Lock()            # one question at a time (one per listener)

    def admit(self, ip):
        """None when the client may start, else the 421 it gets."""
        with self.lock:
            self.asked += 1
            number = self.asked
            if not self.link.send(Say.ADMIT, number, ip):       # the supervisor has gone
                return replies.SHUTTING_DOWN.format(hostname=self.config.hostname)
            deadline = time.monotonic() + ADMIT_TIMEOUT
            while True:
                try:
                    answered, refusal = self.answers.get(
                        timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    self._give_up(number, ip)
                    self.log.error("the supervisor did not answer within %.0f s whether %s "
                                   "may start a session", ADMIT_TIMEOUT, ip)
                    return replies.UNAVAILABLE.format(hostname=self.config.hostname)
                if answered == number:
                    return refusal

    def answered(self, number, refusal):
        """An answer, from the link's reader thread. One that comes after its question was
        given up on gives its place back at once: that client has had its 421, and a client
        of another process may be waiting for the place."""
        with self.given_up_lock:
            late = number in self.given_up
            if not late:
                self.answers.put((number, refusal))
        if late:
            self._give_back(number, refusal)

    def _give_up(self, number, ip):
        """Question `number` is given up on. An answer the reader queued after the wait
        ended and before this is late as well."""
        with self.given_up_lock:
            self.given_up[number] = ip
            arrived = []
            while not self.answers.empty():
                arrived.append(self.answers.get_nowait())
        for answered, refusal in arrived:
            self._give_back(answered, refusal)

    def _give_back(self, number, refusal):
        """A late answer: the place it granted, if any, is released."""
        with self.given_up_lock:
            ip = self.given_up.pop(number, None)
        if ip is not None and refusal is None:
            self.release(ip)

    def release(self, ip):
        self.link.send(Say.RELEASE, ip)


class Handoff:
    """Where an accepting process's stored mail goes: its spool names, to the queue process."""

    def __init__(self, link):
        self.link = link

    def enqueue(self, spool_name):
        self.link.send(Say.QUEUE, spool_name)      # if lost, the next queue process finds it


def run_accepting_process(server, channel, sigterm):
    admission = None
    orphaned = threading.Event()

    def handle(message):
        say, *arguments = message
        if say is Say.ADMITTED:
            admission.answered(*arguments)

    def supervisor_gone():
        orphaned.set()
        sigterm.interrupt()

    link = SupervisorLink(channel, handle, supervisor_gone)
    admission = RemoteAdmission(link, server.config, server.log)
    hub = ForwardingHub(lambda *fields: link.send(Say.SESSION, *fields)) \
        if server.events is not None else None
    server.become_accepting_process(admission, hub, Handoff(link))
    link.start()
    server.start_accepting(announce=False)
    _wait_for(sigterm, orphaned)
    # Without a supervisor nobody restarts the server while this process holds the spool:
    # sessions in DATA get a short grace, not the idle timeout
    server.wind_down(min(ORPHAN_GRACE, server.config.timeout) if orphaned.is_set() else None)
    return 0


def run_queue_process(server, channel, sigterm):
    server.become_queue_process()
    system = server.system
    sessions = RemoteSessions(server.events) if server.events is not None else None

    def handle(message):
        say, *arguments = message
        if say is Say.QUEUE:
            system.queue.enqueue(*arguments)
        elif say is Say.FLUSH:
            threading.Thread(target=system.queue.flush, daemon=True).start()
        elif say is Say.SESSION and sessions is not None:
            sessions.apply(*arguments)
        elif say is Say.PROCESS_ENDED and sessions is not None:
            sessions.process_ended(*arguments)

    gone = threading.Event()

    def supervisor_gone():
        gone.set()
        sigterm.interrupt()

    SupervisorLink(channel, handle, supervisor_gone).start()
    _wait_for(sigterm, gone)
    server.wind_down()
    return 0


def _wait_for(sigterm, supervisor_gone):
    """Until SIGTERM (`sigterm`: its signals.Signals) or the supervisor's end."""
    while signal.SIGTERM not in sigterm.wait() and not supervisor_gone.is_set():
        pass
