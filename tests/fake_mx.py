"""A scripted SMTP listener standing in for a remote mail exchanger in the relay tests.

    mx = FakeMX("127.0.0.3", port, rcpt=["450 4.2.0 busy", "250 2.1.5 ok"])

`rcpt` is the list of replies to successive RCPT commands (the last one repeats; "CLOSE"
hangs up instead of answering);
`greeting=None` never greets (a hung server). Every finished transaction is kept in
`messages` as (mail_from, [rcpt_to], data) and signalled through `received`.

Hostile or broken peers (all off by default):
`ehlo_flood=True` answers EHLO with `250-` lines that never end; `dribble=True` (or a number
of seconds between bytes, True = 0.1) sends an endless multiline greeting one byte at a time;
`hang_on_quit=True` never answers QUIT (the transaction before it is complete and counted).
`mail_reply` is the answer to MAIL; `commands` keeps every command line as it arrived
(decoded as UTF-8), `raw_commands` the same lines as bytes.
Each session is signalled through `connections` (see `wait_for_sessions`), each QUIT
received through `quits`; `stop()` ends the endless ones.

Real TLS: with `tls_context` (an ssl server context, tests/pki.py), STARTTLS is answered 220
and the handshake made (offer it with `ehlo=ehlo_offering("STARTTLS")`); each finished
transaction's `tls` says whether it came over TLS (parallel to `messages`), `handshakes`
counts the handshakes that worked, `handshake_errors` keeps those that did not. Without it,
STARTTLS is answered 220 and clear text follows (a broken TLS server).

Extensions: `ehlo=ehlo_offering("DSN", "SMTPUTF8", "CHUNKING")` advertises them (and, unless
`eight_bit=False`, SIZE and 8BITMIME). BDAT (RFC 3030) is always accepted: every chunk is kept
in `chunks` as (command line, octets), each answered `bdat_reply` (the last one
`data_reply`), and the reassembled text of a finished transaction goes to `messages`.
"""
import itertools
import socket
import socketserver
import threading


def ehlo_offering(*keywords, eight_bit=True, size=100000000):
    """An EHLO reply listing `keywords`, after SIZE and 8BITMIME unless told otherwise."""
    offered = ([f"SIZE {size}"] if size else []) + (["8BITMIME"] if eight_bit else [])
    offered += ["PIPELINING", *keywords]
    return ("250-fake.mx", *[f"250-{keyword}" for keyword in offered[:-1]],
            f"250 {offered[-1]}")


class FakeMX(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host, port=0, greeting="220 fake.mx ESMTP", ehlo=("250-fake.mx",
                 "250-SIZE 100000000", "250-8BITMIME", "250 PIPELINING"), rcpt=("250 2.1.5 ok",),
                 data_reply="250 2.0.0 queued", ehlo_flood=False, dribble=None,
                 hang_on_quit=False, *, mail_reply="250 2.1.0 ok",
                 bdat_reply="250 2.0.0 chunk ok", tls_context=None):
        self.greeting = greeting
        self.mail_reply = mail_reply
        self.bdat_reply = bdat_reply
        self.commands = []          # every command line received, as sent (without CRLF)
        self.raw_commands = []      # the same, as bytes
        self.chunks = []            # (BDAT command line, its octets), in order
        self.ehlo_flood = ehlo_flood
        self.dribble = 0.1 if dribble is True else dribble
        self.hang_on_quit = hang_on_quit
        self.stopping = threading.Event()
        self.connections = threading.Semaphore(0)   # released once per session
        self.quits = threading.Semaphore(0)         # released once per QUIT received
        self.ehlo = ehlo
        self.rcpt_replies = list(rcpt)
        self.data_reply = data_reply
        self.messages = []
        self.tls = []               # for each of `messages`: did it come over TLS
        self.tls_context = tls_context
        self.handshakes = 0
        self.handshake_errors = []
        self.sessions = 0
        self.received = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.open_sockets = []
        super().__init__((host, port), FakeMXHandler)
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def port(self):
        return self.server_address[1]

    def next_rcpt_reply(self):
        with self.lock:
            if len(self.rcpt_replies) > 1:
                return self.rcpt_replies.pop(0)
            return self.rcpt_replies[0]

    def wait_for(self, count, timeout=15):
        """True once `count` more messages have arrived."""
        return all(self.received.acquire(timeout=timeout) for _ in range(count))

    def wait_for_sessions(self, count, timeout=15):
        """True once `count` more sessions have begun."""
        return all(self.connections.acquire(timeout=timeout) for _ in range(count))

    def wait_for_quit(self, timeout=15):
        """True once a client has sent QUIT."""
        return self.quits.acquire(timeout=timeout)

    def stop(self):
        self.stopping.set()
        self.shutdown()
        self.server_close()
        for sock in self.open_sockets:
            try:                # shutdown first: close() waits for the handler's makefiles
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass


class FakeMXHandler(socketserver.StreamRequestHandler):
    timeout = 20

    def handle(self):
        server = self.server
        server.open_sockets.append(self.request)
        with server.lock:
            server.sessions += 1
        server.connections.release()
        if server.dribble:
            self.dribble_forever(server.dribble)
            return
        if server.greeting is None:
            self.request.recv(1)            # hang until the client gives up
            return
        self.send(server.greeting)
        mail_from, rcpt_to = None, []
        self.text = b""                     # the BDAT chunks of this transaction so far
        while True:
            line = self.rfile.readline(1024)
            if not line:
                return
            command = line.decode("utf-8", "replace").rstrip("\r\n")
            with server.lock:
                server.commands.append(command)
                server.raw_commands.append(line.rstrip(b"\r\n"))
            verb = command[:4].upper()
            if verb == "EHLO" and server.ehlo_flood:
                self.flood_forever()
                return
            if verb == "EHLO":
                self.send(*server.ehlo)
            elif verb == "HELO":
                self.send("250 fake.mx")
            elif verb == "MAIL":
                mail_from, rcpt_to = command[10:].split(">")[0].lstrip("<"), []
                self.send(server.mail_reply)
            elif verb == "RCPT":
                reply = server.next_rcpt_reply()
                if reply == "CLOSE":                # drop the connection mid-transaction
                    return
                if reply.startswith("2"):
                    rcpt_to.append(command[8:].split(">")[0].lstrip("<"))
                self.send(reply)
            elif verb == "DATA":
                self.send("354 go ahead")
                data = self.read_data()
                if data is None:
                    return
                self.send(server.data_reply)
                if server.data_reply.startswith("2"):
                    self.keep(mail_from, rcpt_to, data)
            elif verb == "BDAT":
                if not self.read_chunk(command, mail_from, rcpt_to):
                    return
            elif verb == "STAR":                    # STARTTLS
                self.send("220 2.0.0 go ahead")
                if server.tls_context is not None and not self.start_tls():
                    return
            elif verb == "QUIT":
                server.quits.release()
                if server.hang_on_quit:             # never answer; wait for the client to go
                    self.hang()
                    return
                self.send("221 2.0.0 bye")
                return
            else:
                self.send("250 2.0.0 ok")

    def start_tls(self):
        """RFC 3207: the handshake on this connection; False when it failed."""
        server = self.server
        self.wfile.flush()
        try:
            secure = server.tls_context.wrap_socket(self.request, server_side=True)
        except (OSError, ValueError) as error:
            with server.lock:
                server.handshake_errors.append(str(error))
            return False
        with server.lock:
            server.handshakes += 1
            server.open_sockets.append(secure)
        self.request = self.connection = secure
        self.rfile = secure.makefile("rb")
        self.wfile = secure.makefile("wb", buffering=0)
        self.secure = True
        return True

    def keep(self, mail_from, rcpt_to, text):
        """A finished transaction."""
        server = self.server
        with server.lock:
            server.messages.append((mail_from, rcpt_to, text))
            server.tls.append(getattr(self, "secure", False))
        server.received.release()

    def read_chunk(self, command, mail_from, rcpt_to):
        """One BDAT chunk (RFC 3030 2): exactly its octets, then its reply. False when the
        client went away."""
        server = self.server
        words = command.split()
        size, last = int(words[1]), words[-1].upper() == "LAST"
        octets = self.rfile.read(size)
        if len(octets) < size:
            return False
        with server.lock:
            server.chunks.append((command, octets))
            self.text += octets
        if not last:
            self.send(server.bdat_reply)
            return True
        text, self.text = self.text, b""
        self.send(server.data_reply)
        if server.data_reply.startswith("2"):
            self.keep(mail_from, rcpt_to, text)
        return True

    def flood_forever(self):
        """An EHLO reply that never ends: `250-` lines until the client leaves or stop()."""
        chunk = b"250-flood flood flood flood flood flood flood flood flood\r\n" * 64
        while not self.server.stopping.is_set():
            try:
                self.request.sendall(chunk)
            except OSError:
                return

    def dribble_forever(self, interval):
        """A greeting that never ends, one byte every `interval` seconds."""
        for byte in itertools.cycle(b"220-dribble.fake.mx still greeting\r\n"):
            if self.server.stopping.wait(interval):
                return
            try:
                self.request.sendall(bytes([byte]))
            except OSError:
                return

    def hang(self):
        """Say nothing until the client closes (or the socket timeout, or stop())."""
        try:
            while self.request.recv(4096):
                pass
        except OSError:
            pass

    def read_data(self):
        lines = []
        while True:
            line = self.rfile.readline(1 << 20)
            if not line:
                return None
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)

    def send(self, *lines):
        try:
            self.wfile.write(b"".join(line.encode() + b"\r\n" for line in lines))
        except OSError:
            pass


def free_port(hosts):
    """A port number free on every one of `hosts` (the relay uses one port for all MXs)."""
    for _ in range(50):
        probe = socket.socket()
        probe.bind((hosts[0], 0))
        port = probe.getsockname()[1]
        probe.close()
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


class Blackhole:
    """A host that never answers a connect: a listening socket that accepts nothing, its
    backlog filled, so that the kernel drops every further SYN (the client's connect hangs
    until its timeout, as with a host behind a firewall that drops packets)."""

    def __init__(self, host, port):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(0)
        self.address = (host, port)
        self.fillers = []
        for _ in range(4):                  # backlog 0 still queues one; fill it for good
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            try:
                filler.connect(self.address)
            except BlockingIOError:
                pass
            self.fillers.append(filler)

    def stop(self):
        for sock in self.fillers + [self.listener]:
            sock.close()
