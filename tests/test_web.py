"""Issue 16: the live web view over plain HTTP: every endpoint, the event stream, /metrics
with promtool, who may look, and the real process (started as root, dropped to nobody).
The browser tests are in test_web_browser.py."""
import base64
import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ElementTree

import pytest

import explain
import fsmsvg
import smtpd
import state
import web
from config import ConfigError
from tests.conftest import make_config
from tests.daemon import Sandbox, need, require_root
from tests.fake_mx import FakeMX, free_port
from tests.waiting import wait_until
from tests.wire import Client

TIMEOUT = 10                    # seconds for any one answer of the web view
MESSAGE = (b"From: Bob <bob@test.ru>\r\nSubject: =?utf-8?q?h=C3=A9llo?=\r\n"
           b"Date: Mon, 23 Nov 2026 15:30:26 +0000\r\n\r\nHi Alice!\r\n.\r\n")
KOI8_MESSAGE = b"Subject: =?koi8-r?b?0NLJ18XU?=\r\n\r\nHi\r\n.\r\n"   # "привет"
SVG_NS = "{http://www.w3.org/2000/svg}"


# ---------------------------------------------------------------------------------------
# Helpers (test_web_browser.py uses them too)


def web_config(tmp_path, **overrides):
    """make_config with the web view on a free loopback port."""
    overrides.setdefault("web.listen", f"127.0.0.1:{free_port(['127.0.0.1'])}")
    return make_config(tmp_path, **overrides)


def request(server, method, path, body=None, headers=None, source=None):
    """(status, headers, body bytes) of one request to the server's web view. `source`:
    the local address to connect from (another 127.0.0.x)."""
    host, port = server.web.address
    connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT,
                                            source_address=(source, 0) if source else None)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def get_json(server, path):
    status, _, body = request(server, "GET", path)
    assert status == 200, (path, status, body)
    return json.loads(body)


def csrf_token(server):
    _, _, page = request(server, "GET", "/")
    marker = b'<meta name="csrf-token" content="'
    start = page.index(marker) + len(marker)
    return page[start:page.index(b'"', start)].decode()


class EventStream:
    """GET /events on a socket of its own: `next(name)` reads events until one of that
    name, within a deadline, and returns its data."""

    def __init__(self, server):
        host, port = server.web.address
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.sock.sendall(f"GET /events HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        self.buffer = b""
        self.head = self._until(b"\r\n\r\n")
        self.seen = []                      # (name, data) of every event read

    def _until(self, separator):
        deadline = time.monotonic() + TIMEOUT
        while separator not in self.buffer:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {separator!r} within {TIMEOUT}s: {self.buffer!r}")
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the stream ended")
            self.buffer += data
        found, _, self.buffer = self.buffer.partition(separator)
        return found

    def next(self, name, where=lambda data: True, limit=500):
        for _ in range(limit):
            block = self._until(b"\n\n").decode()
            fields = dict(line.split(": ", 1) for line in block.splitlines()
                          if ": " in line and not line.startswith(":"))
            if "event" not in fields:
                continue
            data = json.loads(fields["data"])
            self.seen.append((fields["event"], data))
            if fields["event"] == name and where(data):
                return data
        raise AssertionError(f"no {name} event in {limit} events")

    def close(self):
        self.sock.close()


def send_one(server, recipients=("alice@test.ru",), helo="client.example",
             sender="bob@test.ru", text=MESSAGE):
    with Client(server.address) as client:
        code, _ = client.send_message(sender, list(recipients), text, helo=helo)
        assert code == 250
        assert client.code("QUIT") == 221


@pytest.fixture
def web_server(tmp_path, start_server):
    return start_server(web_config(tmp_path))


# ---------------------------------------------------------------------------------------
# The page and its files


def test_page_is_served_with_its_security_headers(web_server):
    status, headers, body = request(web_server, "GET", "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "'unsafe-inline'" not in policy and "http" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    page = body.decode()
    assert '<script src="/static/app.js" defer></script>' in page
    assert "<script>" not in page and " style=" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")


def test_static_files_and_nothing_else(web_server):
    for name, kind in web.ASSETS.items():
        status, headers, body = request(web_server, "GET", f"/static/{name}")
        assert (status, headers["Content-Type"]) == (200, kind) and body
    for path in ("/static/web.py", "/static/..%2fweb.py", "/static/../smtpd.py",
                 "/static/index.html", "/nothing"):
        assert request(web_server, "GET", path)[0] == 404, path


def test_wrong_methods_are_refused(web_server):
    assert request(web_server, "POST", "/api/sessions")[0] == 405
    assert request(web_server, "GET", "/api/queue/flush")[0] == 405
    assert request(web_server, "PUT", "/")[0] == 501


def test_the_diagram_has_every_state_and_every_move_of_the_table(web_server):
    _, _, body = request(web_server, "GET", "/")
    page = body.decode()
    svg = ElementTree.fromstring(page[page.index("<svg"):page.index("</svg>") + 6])
    groups = svg.iter(f"{SVG_NS}g")
    states, edges = [], set()
    for group in groups:
        kind = group.get("class", "").split()
        if "state" in kind:
            states.append(group.get("data-state"))
        if "edge" in kind and "entry" not in kind:
            edges.add((group.get("data-from"), group.get("data-to")))
    assert states == list(state.TRANSITIONS)
    assert edges == {(source, target) for source, target, _ in explain.edges()}
    assert get_json(web_server, "/api/fsm")["states"] == list(state.TRANSITIONS)


def test_the_layout_follows_a_transaction_left_to_right():
    places = fsmsvg.layout()
    path = [places[name].x for name in (state.START, state.GREETED, state.MAIL, state.RCPT,
                                        state.DATA)]
    assert path == sorted(path) and len(set(path)) == len(path)
    assert places[state.CLOSED].bar and places[state.CLOSED].y > max(
        place.y for place in places.values() if not place.bar)


# ---------------------------------------------------------------------------------------
# Sessions and the event stream


def test_the_stream_shows_a_session_line_by_line(web_server):
    stream = EventStream(web_server)
    try:
        assert b"200 OK" in stream.head and b"text/event-stream" in stream.head
        assert b"Content-Security-Policy" in stream.head
        snapshot = stream.next("snapshot")
        assert snapshot["live"] == [] and snapshot["queue"]["messages"] == []
        send_one(web_server)
        opened = stream.next("opened")["session"]
        # the event is written when the web thread gets to it: the greeting may be out by then
        assert opened["state"] in (state.START, state.GREETED), opened
        assert opened["peer"].startswith("127.0.0.1:")
        mail = stream.next("line", lambda data: data["line"].get("move", {}).get("to")
                           == state.MAIL)["line"]
        assert mail["text"] == ["250 2.1.0 Sender <bob@test.ru> ok"]
        assert mail["rfc"] == "RFC 5321 4.1.1.2"
        assert mail["explain"].startswith("MAIL accepted")
        assert mail["move"] == {"verb": "MAIL", "from": state.GREETED, "to": state.MAIL}
        closed = stream.next("closed")["session"]
        assert (closed["id"], closed["state"]) == (opened["id"], state.CLOSED)
        lines = [data["line"] for name, data in stream.seen if name == "line"]
        assert [line["n"] for line in lines] == sorted(line["n"] for line in lines)
        assert {"dir": "<-", "text": ["MAIL FROM:<bob@test.ru>"]}.items() <= \
            next(line for line in lines if line["dir"] == "<-" and "MAIL" in line["text"][0]
                 ).items()
        if ("mailbox", {}) not in stream.seen:      # a batch says it after its lines
            stream.next("mailbox")                  # alice's Maildir has a new message
    finally:
        stream.close()


def test_a_session_and_its_dialogue_from_the_api(web_server):
    with Client(web_server.address) as client:
        client.command("EHLO client.example")
        client.command("MAIL FROM:<bob@test.ru>")
        live = get_json(web_server, "/api/sessions")["live"]
        assert [(item["state"], item["helo"]) for item in live] == [(state.MAIL,
                                                                    "client.example")]
        session = get_json(web_server, f"/api/sessions/{live[0]['id']}")
        texts = [(line["dir"], line["text"][0]) for line in session["lines"]]
        assert texts[:2] == [("->", "220 mail.test.ru ESMTP smtpd ready"),
                             ("<-", "EHLO client.example")]
        greeting = session["lines"][0]
        assert greeting["rfc"] == "RFC 5321 4.3.1" and "EHLO or HELO" in greeting["explain"]
        client.command("QUIT")
    wait_until(lambda: get_json(web_server, "/api/sessions")["history"], TIMEOUT)
    finished = get_json(web_server, "/api/sessions")["history"][0]
    assert (finished["id"], finished["state"]) == (live[0]["id"], state.CLOSED)
    assert finished["move"] == {"verb": "QUIT", "from": state.MAIL, "to": state.CLOSED}
    assert request(web_server, "GET", "/api/sessions/nosuch")[0] == 404


def test_a_refused_reply_cites_its_own_section(web_server):
    with Client(web_server.address) as client:
        client.command("EHLO client.example")
        client.command("MAIL FROM:<bob@test.ru>")
        assert client.code("RCPT TO:<nobody@test.ru>") == 550
        session_id = get_json(web_server, "/api/sessions")["live"][0]["id"]
        lines = get_json(web_server, f"/api/sessions/{session_id}")["lines"]
    refusal = [line for line in lines if line["text"][0].startswith("550")][0]
    assert refusal["rfc"] == "RFC 5321 3.3, 4.2.2"
    assert refusal["explain"].startswith("RCPT refused (550, permanent negative)")


def test_the_stream_ends_when_the_server_stops(tmp_path):
    server = smtpd.start(web_config(tmp_path), console=False)
    stream = EventStream(server)
    try:
        stream.next("snapshot")
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 1})
        stopper.start()
        with pytest.raises(EOFError):
            stream.next("never")
        stopper.join(TIMEOUT)
        assert not stopper.is_alive()
    finally:
        stream.close()
        server.stop(grace=1)


# ---------------------------------------------------------------------------------------
# The queue


def queued_world(tmp_path, start_server):
    """A server whose route to remote.test is a port nobody listens on (yet): a message to
    it waits in the queue with one failed attempt. Returns (server, port)."""
    port = free_port(["127.0.0.1"])
    server = start_server(web_config(tmp_path, **{"relay.routes": f"remote.test=127.0.0.1:"
                                                                  f"{port}",
                                                  "relay.retry": "3600"}))
    send_one(server, ["carol@remote.test"])
    wait_until(lambda: [r for m in get_json(server, "/api/queue")["messages"]
                        for r in m["recipients"] if r["attempts"] == 1], TIMEOUT)
    return server, port


def test_the_queue_as_queue_shows_it_and_deliver_now(tmp_path, start_server):
    server, port = queued_world(tmp_path, start_server)
    queued = get_json(server, "/api/queue")
    message = queued["messages"][0]
    recipient = message["recipients"][0]
    assert (message["sender"], recipient["address"], recipient["status"]) == (
        "bob@test.ru", "carol@remote.test", "pending")
    assert "cannot connect" in recipient["last_error"]
    assert 3500 < recipient["next_attempt"] - queued["now"] <= 3600
    assert queued["listing"][0].startswith(message["queue_id"])
    assert queued["listing"][-1] == "-- 1 message(s) in the queue"
    mx = FakeMX("127.0.0.1", port)
    try:
        assert request(server, "POST", "/api/queue/flush", b"{}")[0] == 403
        assert request(server, "POST", "/api/queue/flush", b"{}",
                       {web.CSRF_HEADER: "wrong"})[0] == 403
        status, _, body = request(server, "POST", "/api/queue/flush", b"{}",
                                  {web.CSRF_HEADER: csrf_token(server)})
        assert status == 202 and json.loads(body)["queue_id"] is None
        assert mx.wait_for(1, TIMEOUT)
        assert wait_until(lambda: get_json(server, "/api/queue")["messages"] == [], TIMEOUT)
    finally:
        mx.stop()
    assert get_json(server, "/api/metrics")["smtpd_relayed_recipients_total"] == 1


def test_deliver_now_for_one_message(tmp_path, start_server):
    server, port = queued_world(tmp_path, start_server)
    queue_id = get_json(server, "/api/queue")["messages"][0]["queue_id"]
    mx = FakeMX("127.0.0.1", port)
    try:
        token = {web.CSRF_HEADER: csrf_token(server)}
        assert request(server, "POST", "/api/queue/flush", b"[1]", token)[0] == 400
        assert request(server, "POST", "/api/queue/flush",
                       json.dumps({"queue_id": "0" * 16}).encode(), token)[0] == 202
        assert not mx.wait_for_sessions(1, 0.5)         # another id: nothing is due
        assert request(server, "POST", "/api/queue/flush",
                       json.dumps({"queue_id": queue_id}).encode(), token)[0] == 202
        assert mx.wait_for(1, TIMEOUT)
    finally:
        mx.stop()


# ---------------------------------------------------------------------------------------
# Mailboxes


def test_mailboxes_and_one_message(web_server):
    send_one(web_server)
    boxes = get_json(web_server, "/api/mailboxes")["mailboxes"]
    assert {"domain": "test.ru", "user": "alice", "messages": 1, "in_users_file": True} in boxes
    assert {"domain": "test.ru", "user": "bob", "messages": 0, "in_users_file": True} in boxes
    listing = get_json(web_server, "/api/mailboxes/test.ru/alice")["messages"]
    assert [(item["subject"], item["sender"], item["date"]) for item in listing] == [
        ("h\u00e9llo", "Bob <bob@test.ru>", "Mon, 23 Nov 2026 15:30:26 +0000")]
    message = get_json(web_server, f"/api/mailboxes/test.ru/alice/{listing[0]['id']}")
    headers = dict(message["headers"])
    assert headers["Subject"] == "h\u00e9llo" and headers["Return-Path"] == "<bob@test.ru>"
    assert "Subject: =?utf-8?q?h=C3=A9llo?=\nDate:" in message["source"]
    assert message["source"].endswith("Hi Alice!\n") and not message["truncated"]
    assert get_json(web_server, "/api/mailboxes/test.ru/bob")["messages"] == []


def test_no_path_leaves_the_maildir(web_server):
    send_one(web_server)
    for path in ("/api/mailboxes/test.ru/nobody", "/api/mailboxes/other.org/alice",
                 "/api/mailboxes/test.ru/..", "/api/mailboxes/test.ru/alice/..",
                 "/api/mailboxes/test.ru/alice/%2e%2e%2f%2e%2e%2fusers",
                 "/api/mailboxes/test.ru/alice/new", "/api/mailboxes/..%2f..%2f/x/y"):
        assert request(web_server, "GET", path)[0] == 404, path


# ---------------------------------------------------------------------------------------
# /metrics


def test_metrics_count_what_happened_and_promtool_accepts_them(web_server):
    send_one(web_server)
    with Client(web_server.address) as client:
        client.command("EHLO client.example")
        client.command("MAIL FROM:<bob@test.ru>")
        client.command("RCPT TO:<nobody@test.ru>")
        wait_until(lambda: get_json(web_server, "/api/sessions")["live"], TIMEOUT)
        status, headers, body = request(web_server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    for sample in ("smtpd_sessions_open 1", "smtpd_sessions_total 2",
                   'smtpd_sessions_in_state{state="RCPT"} 0',
                   'smtpd_sessions_in_state{state="MAIL"} 1',
                   'smtpd_replies_total{class="3xx"} 1', 'smtpd_replies_total{class="5xx"} 1',
                   "smtpd_messages_accepted_total 1", "smtpd_local_deliveries_total 1",
                   "smtpd_queue_messages 0"):
        assert f"\n{sample}\n" in text, sample
    need(shutil.which("promtool"), "promtool is not installed (Debian package prometheus)")
    checked = subprocess.run(["promtool", "check", "metrics"], input=body,
                             capture_output=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_metrics_count_relayed_and_bounced(tmp_path, start_server):
    mx = FakeMX("127.0.0.1", rcpt=["250 2.1.5 ok", "550 5.1.1 no such user"])
    try:
        server = start_server(web_config(tmp_path, **{
            "relay.routes": f"remote.test=127.0.0.1:{mx.port}"}))
        send_one(server, ["carol@remote.test", "dave@remote.test"])
        assert mx.wait_for(1, TIMEOUT)
        assert wait_until(lambda: get_json(server, "/api/metrics")[
            "smtpd_local_deliveries_total"] == 1, TIMEOUT)      # bob's bounce
        found = get_json(server, "/api/metrics")
    finally:
        mx.stop()
    assert (found["smtpd_relayed_recipients_total"], found["smtpd_bounced_recipients_total"],
            found["smtpd_messages_accepted_total"]) == (1, 1, 1)
    assert found["smtpd_received_message_bytes_total"] == len(MESSAGE) - 3


# ---------------------------------------------------------------------------------------
# Who may look


def test_a_client_off_loopback_is_refused(tmp_path, start_server, monkeypatch):
    # Tests talk only to 127.0.0.0/8: here only 127.0.0.1 counts as loopback, so a request
    # from 127.0.0.2 is what a request from another machine is to a real server
    monkeypatch.setattr(web, "LOOPBACK", (web.ipaddress.ip_network("127.0.0.1/32"),))
    server = start_server(web_config(tmp_path))
    status, _, body = request(server, "GET", "/", source="127.0.0.2")
    assert status == 403 and b"loopback clients only" in body
    assert request(server, "GET", "/metrics", source="127.0.0.2")[0] == 403
    assert request(server, "GET", "/")[0] == 200


def test_the_password_lets_others_in(tmp_path, start_server, monkeypatch):
    monkeypatch.setattr(web, "LOOPBACK", (web.ipaddress.ip_network("127.0.0.1/32"),))
    server = start_server(web_config(tmp_path, **{"web.password": "s3cret"}))

    def basic(credentials):
        return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}

    status, headers, _ = request(server, "GET", "/", source="127.0.0.2")
    assert status == 401 and headers["WWW-Authenticate"].startswith('Basic realm="smtpd"')
    assert request(server, "GET", "/", headers=basic(b"admin:wrong"), source="127.0.0.2"
                   )[0] == 401
    assert request(server, "GET", "/", headers={"Authorization": "Basic !!"},
                   source="127.0.0.2")[0] == 401
    assert request(server, "GET", "/metrics", headers=basic(b"prometheus:s3cret"),
                   source="127.0.0.2")[0] == 200


def test_a_rebound_name_is_refused(web_server):
    assert request(web_server, "GET", "/", headers={"Host": "evil.example:8025"})[0] == 403
    for host in ("localhost:8025", "127.0.0.1", "mail.test.ru:8025", "[::1]:8025"):
        assert request(web_server, "GET", "/", headers={"Host": host})[0] == 200, host


def test_a_non_loopback_listen_needs_a_password(tmp_path):
    config = make_config(tmp_path, **{"web.listen": "0.0.0.0:8025"})
    with pytest.raises(ConfigError) as refused:
        smtpd.start(config, console=False)
    assert str(refused.value) == ("[web] listen = '0.0.0.0:8025': not a loopback address, so "
                                  "set [web] password (the page shows people's mail)")


def test_a_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(tmp_path, **{"web.listen": f"127.0.0.1:{port}"})
        with pytest.raises(ConfigError) as refused:
            smtpd.start(config, console=False)
    assert str(refused.value) == (f"[web] listen = '127.0.0.1:{port}': cannot listen: "
                                  "Address already in use")


def test_the_view_is_off_without_listen(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **{"web.listen": ""}))
    assert server.web is None and server.events is None
    assert all(listener.events is None for listener in server.listeners)


def test_start_up_names_the_url(tmp_path, start_server):
    server = start_server(web_config(tmp_path))
    log = (tmp_path / "logs" / "smtpd.log").read_text()
    assert f"web view on http://127.0.0.1:{server.web.address[1]}/\n" in log


# ---------------------------------------------------------------------------------------
# The real process


def test_the_daemon_serves_the_page_after_dropping_root():
    require_root()
    box = Sandbox()
    try:
        port = free_port(["127.0.0.1"])
        process = box.start({"web.listen": f"127.0.0.1:{port}"})
        assert wait_until(lambda: any(f"web view on http://127.0.0.1:{port}/" in line
                                      for line in process.stderr_lines()), TIMEOUT)
        with Client(process.address) as client:
            code, _ = client.send_message("bob@test.ru", ["alice@test.ru"], MESSAGE)
            assert code == 250
            client.command("QUIT")
        with Client(process.address) as client:        # a codec loaded only for this
            code, _ = client.send_message("bob@test.ru", ["alice@test.ru"], KOI8_MESSAGE)
            assert code == 250
            client.command("QUIT")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        for path, expected in (("/", b"<svg"), ("/static/app.js", b"EventSource"),
                               ("/api/mailboxes/test.ru/alice", b"h\\u00e9llo"),
                               ("/api/mailboxes/test.ru/alice",
                                "привет".encode("unicode_escape")),
                               ("/metrics", b"\nsmtpd_messages_accepted_total 2\n")):
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200 and expected in body, (path, body[:300])
            connection.close()
        assert process.uids()[1] != 0
        assert process.stop() == 0
        assert process.traceback_count == 0, process.stderr_text()
    finally:
        box.cleanup()
