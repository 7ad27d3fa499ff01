"""The live web view: watch every session move through the state machine, with the queue,
the mailboxes and /metrics. Standard library only (http.server, a thread per connection).

    [web] listen = 127.0.0.1:8025          python smtpd.py --web 127.0.0.1:8025

    GET  /                          the page (the state diagram drawn by fsmsvg.py)
    GET  /static/app.js, style.css  its script and style, served from web/
    GET  /events                    Server-Sent Events: a snapshot, then every change
    GET  /metrics                   Prometheus text format
    GET  /api/sessions              live and finished sessions
    GET  /api/sessions/<id>         one session with its recent dialogue
    GET  /api/queue                 what --queue shows, as data
    POST /api/queue/flush           "deliver now" (--flush); {"queue_id": ...} for one message
    GET  /api/mailboxes[/<domain>/<user>[/<message>]]
    GET  /api/metrics, /api/fsm     the same counters as JSON; the diagram's edges

Who may look: loopback clients, always; others only with the `[web] password` (HTTP basic
auth, RFC 7617), and the page is then served over TLS when `[tls]` has a certificate. A
loopback request must name the server by an IP address or `localhost` (Host header), so a
web site that points its own name at 127.0.0.1 (DNS rebinding) cannot read the page.
A POST needs the CSRF token that the page carries. Every response forbids framing, sniffing
and any script or style but the server's own (Content-Security-Policy).
"""
import base64
import binascii
import hmac
import http.server
import ipaddress
import json
import os
import secrets
import socket
import ssl
import sys
import threading
import urllib.parse

import events
import explain
import fsmsvg
import metrics
import webdata
from config import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PAGE = "index.html"             # the page's template, in web/
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
KEEPALIVE = 10                  # seconds between SSE comments (a gone page is noticed then)
MAX_CONNECTIONS = 32            # at once; beyond it 503
MAX_BODY = 4096                 # octets of a POST body
BATCH = 500                     # events written at once to one page
REQUEST_TIMEOUT = 30            # seconds for a request to arrive whole
CSRF_HEADER = "X-CSRF-Token"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
JSON_TYPE = "application/json; charset=utf-8"


def is_loopback(ip):
    try:
        address = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return False
    if getattr(address, "ipv4_mapped", None):       # ::ffff:127.0.0.1 on a dual-stack socket
        address = address.ipv4_mapped
    return any(address in network for network in LOOPBACK)


class WebView:
    """The web listener of one Server, bound at once (before the privilege drop)."""

    def __init__(self, server):
        config = server.config
        self.config = config
        self.hub = server.events
        self.system = server.system
        self.log = server.log
        host, port = config.web_listen
        self.listen_text = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        if not is_loopback(host) and not config.web_password:
            raise ConfigError(f"[web] listen = {self.listen_text!r}: not a loopback address, "
                              "so set [web] password (the page shows people's mail)")
        self.tls = self.system.tls_context if config.web_password else None
        self.csrf_token = secrets.token_urlsafe(32)
        self.assets = {name: _read_asset(name) for name in ASSETS}
        self.page = self._render_page(_read_asset(PAGE).decode("utf-8"))
        self.stopping = threading.Event()
        try:
            self.http = _HTTPServer((host, port), self)
        except OSError as error:
            raise ConfigError(f"[web] listen = {self.listen_text!r}: cannot listen: "
                              f"{error.strerror or error}") from None
        self._thread = None

    @property
    def address(self):
        return self.http.server_address[:2]

    @property
    def url(self):
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{port}/"

    def start(self):
        self._thread = threading.Thread(target=self.http.serve_forever, args=(0.5,),
                                        name="web", daemon=True)
        self._thread.start()
        if self.config.web_password and not self.tls:
            self.log.warning("web view: [web] password is sent in the clear: set [tls] cert "
                             "and key to serve the page over TLS")
        return self

    def stop(self):
        """Stop accepting, end every event stream and open connection, close the socket."""
        self.stopping.set()
        self.hub.close()
        if self._thread is not None:
            self.http.shutdown()
            self._thread.join(5)
        self.http.close_connections()
        self.http.server_close()

    def close(self):
        """Undo a view that never started."""
        self.http.server_close()

    def _render_page(self, template):
        return (template.replace("{{csrf}}", self.csrf_token)
                .replace("{{hostname}}", _escape(self.config.hostname))
                .replace("{{fsm}}", fsmsvg.draw())).encode("utf-8")

    # who may look (RFC 7617: basic auth)

    def refusal(self, client_ip, headers):
        """None when the request may go on, else (status, text, extra headers)."""
        if is_loopback(client_ip):
            if not _named_safely(headers.get("Host", ""), self.config.hostname):
                return 403, "Use an IP address or localhost in the URL", {}
            return None
        if not self.config.web_password:
            return 403, "The web view answers loopback clients only", {}
        if not self._password_given(headers.get("Authorization", "")):
            return 401, "The web view needs the [web] password", {
                "WWW-Authenticate": 'Basic realm="smtpd", charset="UTF-8"'}
        return None

    def _password_given(self, authorization):
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        password = decoded.partition(b":")[2]       # any user name
        return hmac.compare_digest(password, self.config.web_password.encode("utf-8"))

    # what the page asks for

    def queue_length(self):
        return len(self.system.spool.names())

    def metrics(self):
        return metrics.collect(self.hub, self.queue_length())

    def snapshot(self):
        found = webdata.sessions_json(self.hub)
        found["queue"] = webdata.queue_json(self.system.spool)
        return found

    def flush(self, queue_id=None):
        queue = self.system.queue
        if queue is None:
            return None
        return queue.flush(None if queue_id is None else {queue_id})


def _named_safely(host_header, hostname):
    """A Host that an attacker's DNS cannot have made point here: an IP literal, localhost
    (RFC 6761 6.3), or the server's own name."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host in ("localhost", hostname) or host.endswith(".localhost")


def _read_asset(name):
    with open(os.path.join(HERE, "web", name), "rb") as asset:
        return asset.read()


def _escape(text):
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#x27;"))


class _HTTPServer(http.server.ThreadingHTTPServer):
    """http.server with threads, its connections counted (and cut at stop), TLS when set."""
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address, view):
        self.view = view
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.open = set()
        self.open_lock = threading.Lock()
        super().__init__(address, Handler)

    def get_request(self):
        sock, client = super().get_request()
        if self.view.tls is not None:       # the handshake happens in the request's thread
            sock = self.view.tls.wrap_socket(sock, server_side=True,
                                             do_handshake_on_connect=False)
        return sock, client

    def handle_error(self, request, client_address):
        """A page that went away mid-request, a failed TLS handshake: one debug line, never a
        traceback on the console."""
        self.view.log.debug("web view: request from %s failed: %s", client_address[0],
                            sys.exc_info()[1])

    def process_request(self, request, client_address):
        with self.open_lock:
            busy = len(self.open) >= MAX_CONNECTIONS
            if not busy:
                self.open.add(request)
        if busy:
            _send_quietly(request, b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0"
                                   b"\r\n\r\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.open_lock:
            self.open.discard(request)
        super().shutdown_request(request)

    def close_connections(self):
        with self.open_lock:
            requests = list(self.open)
        for request in requests:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _send_quietly(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------
# Requests


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "smtpd-web"
    sys_version = ""
    timeout = REQUEST_TIMEOUT

    @property
    def view(self):
        return self.server.view

    def setup(self):
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()      # in this thread, not in the accept loop

    def log_message(self, format, *args):
        pass                        # the server's log is the SMTP dialogue's; not this

    def do_GET(self):
        if self._admitted():
            self._route(GET_ROUTES)

    def do_POST(self):
        if self._admitted():
            self._route(POST_ROUTES)

    def _admitted(self):
        refusal = self.view.refusal(self.client_address[0], self.headers)
        if refusal is None:
            return True
        status, text, extra = refusal
        self.send_text(status, text + "\n", extra)
        return False

    def _route(self, routes):
        path = urllib.parse.urlsplit(self.path).path
        parts = [urllib.parse.unquote(part) for part in path.strip("/").split("/")] \
            if path.strip("/") else []
        for pattern, action in routes:
            arguments = _match(pattern, parts)
            if arguments is not None:
                action(self, *arguments)
                return
        if any(_match(pattern, parts) is not None for pattern, _ in
               (POST_ROUTES if routes is GET_ROUTES else GET_ROUTES)):
            self.send_text(405, "Method not allowed\n")
            return
        self.send_text(404, "Not found\n")

    # responses

    def send_body(self, status, content_type, body, extra=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_text(self, status, text, extra=None):
        self.send_body(status, "text/plain; charset=utf-8", text.encode("utf-8"), extra)

    def send_json(self, value, status=200):
        self.send_body(status, JSON_TYPE, json.dumps(value).encode("utf-8"))

    def send_found(self, value):
        if value is None:
            self.send_json({"error": "not found"}, 404)
        else:
            self.send_json(value)

    # the pages

    def page(self):
        self.send_body(200, "text/html; charset=utf-8", self.view.page)

    def asset(self, name):
        if name not in ASSETS:
            self.send_text(404, "Not found\n")
            return
        self.send_body(200, ASSETS[name], self.view.assets[name])

    def metrics_text(self):
        self.send_body(200, metrics.CONTENT_TYPE,
                       metrics.exposition(self.view.metrics()).encode("utf-8"))

    def metrics_json(self):
        self.send_json(metrics.as_json(self.view.metrics()))

    def fsm(self):
        self.send_json({"states": list(fsmsvg.layout()),
                        "edges": [{"from": source, "to": target, "label": label}
                                  for source, target, label in explain.edges()]})

    def sessions(self):
        self.send_json(webdata.sessions_json(self.view.hub))

    def session(self, session_id):
        record = self.view.hub.find(session_id)
        self.send_found(None if record is None else webdata.session_with_lines(record))

    def queue(self):
        self.send_json(webdata.queue_json(self.view.system.spool))

    def mailboxes(self):
        self.send_json(webdata.mailboxes_json(self.view.config))

    def mailbox(self, domain, user):
        self.send_found(webdata.summaries_json(self.view.config, domain, user))

    def message(self, domain, user, message_id):
        self.send_found(webdata.message_json(self.view.config, domain, user, message_id))

    def flush(self):
        """POST /api/queue/flush: what --flush does (a body {"queue_id": id}: one message)."""
        if not self._csrf_ok():
            self.send_json({"error": "missing or wrong CSRF token"}, 403)
            return
        body = self._body()
        if body is None:
            self.send_json({"error": "the body must be a JSON object"}, 400)
            return
        queue_id = body.get("queue_id")
        if queue_id is not None and not isinstance(queue_id, str):
            self.send_json({"error": "queue_id must be a string"}, 400)
            return
        flushed_at = self.view.flush(queue_id)
        if flushed_at is None:
            self.send_json({"error": "the queue runner is not running"}, 503)
            return
        self.send_json({"flushed_at": flushed_at, "queue_id": queue_id}, 202)

    def _csrf_ok(self):
        token = self.headers.get(CSRF_HEADER, "")
        return hmac.compare_digest(token.encode("utf-8", "replace"),
                                   self.view.csrf_token.encode("utf-8"))

    def _body(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return None
        if not 0 <= length <= MAX_BODY:
            return None
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            return None
        return body if isinstance(body, dict) else None

    # Server-Sent Events (text/event-stream)

    def stream(self):
        view = self.view
        watcher = view.hub.watch()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(b"retry: 2000\n\n")
            self._event("snapshot", view.snapshot())
            self.wfile.flush()
            self._follow(watcher)
        except (OSError, ValueError):
            pass                                # the page went away
        finally:
            view.hub.unwatch(watcher)
            self.close_connection = True

    def _follow(self, watcher):
        view = self.view
        while not view.stopping.is_set():
            event = watcher.next(KEEPALIVE)
            if watcher.closed:
                return
            if event is None:
                self.wfile.write(b": keepalive\n\n")
            else:
                self._batch([event] + watcher.pending(BATCH))
            self.wfile.flush()

    def _batch(self, batch):
        """Session events in order; queue and mailbox changes once each, after them."""
        kinds = set()
        for event in batch:
            if event is None:
                continue
            if event.kind in (events.Kind.QUEUE, events.Kind.MAILBOX):
                kinds.add(event.kind)
                continue
            self._event(*webdata.event_json(event))
        if events.Kind.QUEUE in kinds:
            self._event("queue", webdata.queue_json(self.view.system.spool))
        if events.Kind.MAILBOX in kinds:
            self._event("mailbox", {})

    def _event(self, name, data):
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode("utf-8"))


def _match(pattern, parts):
    """The values of the `*` parts of `pattern` (a tuple of words) in `parts`, or None."""
    if len(pattern) != len(parts):
        return None
    found = []
    for word, part in zip(pattern, parts):
        if word == "*":
            if not part:
                return None
            found.append(part)
        elif word != part:
            return None
    return found


GET_ROUTES = [
    ((), Handler.page),
    (("static", "*"), Handler.asset),
    (("events",), Handler.stream),
    (("metrics",), Handler.metrics_text),
    (("api", "metrics"), Handler.metrics_json),
    (("api", "fsm"), Handler.fsm),
    (("api", "sessions"), Handler.sessions),
    (("api", "sessions", "*"), Handler.session),
    (("api", "queue"), Handler.queue),
    (("api", "mailboxes"), Handler.mailboxes),
    (("api", "mailboxes", "*", "*"), Handler.mailbox),
    (("api", "mailboxes", "*", "*", "*"), Handler.message),
]
POST_ROUTES = [
    (("api", "queue", "flush"), Handler.flush),
]
