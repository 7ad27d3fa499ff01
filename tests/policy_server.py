"""A loopback HTTPS server standing in for a domain's MTA-STS policy host (RFC 8461 3.3).

    server = PolicyServer("127.0.0.5", context, policy_text("enforce", ["mx1.remote.test"]))
    server.port                 # point mtasts.HTTPS_PORT at it (or port=443, as root)
    server.requests             # [(Host header, path)] of every GET, in order
    server.body = "..."         # change the policy served from now on
    server.stop()

`status` and `content_type` say what to answer (200 and text/plain unless told). Requests
are answered by a thread of their own; stop() ends the server and its threads.
"""
import http.server
import threading

POLICY_PATH = "/.well-known/mta-sts.txt"


def policy_text(mode, mx, max_age=86400):
    """A policy body as RFC 8461 3.2 writes one."""
    lines = ["version: STSv1", f"mode: {mode}", *[f"mx: {pattern}" for pattern in mx],
             f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10

    def do_GET(self):
        server = self.server
        with server.lock:
            server.requests.append((self.headers.get("Host", ""), self.path))
        body = server.body.encode() if self.path == POLICY_PATH else b"not here"
        status = server.status if self.path == POLICY_PATH else 404
        self.send_response(status)
        self.send_header("Content-Type", server.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *arguments):     # quiet: the test asserts what it needs
        pass


class PolicyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host, context, body, port=0, status=200, content_type="text/plain"):
        self.context = context
        self.body = body
        self.status = status
        self.content_type = content_type
        self.requests = []
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def port(self):
        return self.server_address[1]

    def get_request(self):
        sock, address = super().get_request()
        sock.settimeout(10)
        return self.context.wrap_socket(sock, server_side=True), address

    def handle_error(self, request, client_address):
        pass                                # a client that rejects our certificate

    def stop(self):
        self.shutdown()
        self.server_close()
