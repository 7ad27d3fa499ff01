"""Issue 16: the live web view in a real browser: headless Chromium driven by Selenium,
against an in-process server on loopback.

CI installs Debian's chromium and chromium-driver and PyPI's selenium (tests/requirements.txt);
elsewhere these tests skip when one is missing (tests/daemon.py's `need`). Every wait is
WebDriverWait on a condition in the page, bounded by WAIT seconds.

    SMTPD_UPDATE_DOCS=1 python -m pytest tests/test_web_browser.py -k screenshot

rewrites docs/web.png (the README's picture) from a real run.
"""
import base64
import os
import shutil
import tempfile

import pytest

import state
import web
from tests.daemon import ROOT, need
from tests.fake_mx import FakeMX
from tests.test_web import get_json, queued_world, send_one, web_config
from tests.wire import Client

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:                     # need() below says what is missing
    webdriver = None

WAIT = 10                               # seconds for anything to show in the page
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--window-size=1400,1300")
SCREENSHOT = os.path.join(ROOT, "docs", "web.png")
XSS_HELO = "<img/src=x/onerror=window.pwned=1>"
XSS_SENDER = '"<img src=x onerror=window.pwned=2>"@example.org'
XSS_SUBJECT = "<script>window.pwned=3</script><img src=x onerror=window.pwned=4>"


def find_tool(*names):
    return next((shutil.which(name) for name in names if shutil.which(name)), None)


@pytest.fixture
def browser(monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")    # Selenium Manager must download nothing
    need(webdriver is not None, "selenium is not installed (pip install -r tests/requirements.txt)")
    chromium = find_tool("chromium", "chromium-browser")
    driver_path = find_tool("chromedriver")
    need(chromium, "chromium is not installed (Debian package chromium)")
    need(driver_path, "chromedriver is not installed (Debian package chromium-driver)")
    profile = tempfile.mkdtemp(prefix="smtpd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(WAIT * 3)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(browser, server):
    browser.get(server.web.url)
    wait_for(browser, lambda page: page.find_element(By.ID, "status").text == "live",
             "the event stream to connect")


def wait_for(browser, condition, what):
    try:
        return WebDriverWait(browser, WAIT, poll_frequency=0.05).until(
            lambda page: _quietly(condition, page))
    except TimeoutException:
        pytest.fail(f"the page did not show {what} within {WAIT}s", pytrace=False)


def _quietly(condition, page):
    try:
        return condition(page)
    except Exception:                   # an element not there yet, or replaced meanwhile
        return False


def click(browser, selector, what):
    """Click the element `selector` once it is there (again, if the page redrew it)."""
    def clicked(page):
        page.find_element(By.CSS_SELECTOR, selector).click()
        return True
    wait_for(browser, clicked, what)


MARKER = '#fsm g.state[data-state="{state}"] circle.marker'


def marker_in(state_name, session_id=None):
    selector = MARKER.format(state=state_name)
    if session_id:
        selector += f'[data-session="{session_id}"]'
    return lambda page: page.find_elements(By.CSS_SELECTOR, selector)


def dialogue_text(page):
    return page.find_element(By.ID, "dialogue-lines").text


# ---------------------------------------------------------------------------------------


def test_the_marker_moves_through_every_state(browser, tmp_path, start_server):
    server = start_server(web_config(tmp_path))
    open_page(browser, server)
    with Client(server.address) as client:
        session_id = wait_for(browser, lambda page: marker_in(state.START)(page)[0]
                              .get_attribute("data-session"), "a marker in START")
        steps = [("EHLO client.example", state.GREETED), ("MAIL FROM:<bob@test.ru>", state.MAIL),
                 ("RCPT TO:<alice@test.ru>", state.RCPT), ("DATA", state.DATA)]
        for command, expected in steps:
            client.command(command)
            wait_for(browser, marker_in(expected, session_id), f"the marker in {expected}")
            count = browser.find_element(
                By.CSS_SELECTOR, f'#fsm g.state[data-state="{expected}"] text.count')
            assert count.text == "1"
        assert browser.find_elements(By.CSS_SELECTOR,
                                     '#fsm g.edge.taken[data-from="RCPT"][data-to="DATA"]')
        client.send(b"Subject: hi\r\n\r\nHello\r\n.\r\n")
        assert client.reply()[0] == 250
        wait_for(browser, marker_in(state.GREETED, session_id), "the marker back in GREETED")
        client.command("QUIT")
    wait_for(browser, lambda page: not page.find_elements(By.CSS_SELECTOR, "circle.marker"),
             "no marker once the session is over")
    finished = wait_for(browser, lambda page: page.find_element(
        By.CSS_SELECTOR, f'#finished-sessions tr[data-session="{session_id}"]').text,
        "the session among the finished")
    assert "client.example CLOSED GREETED \u2192 CLOSED (QUIT)" in finished


def test_the_dialogue_pane_shows_the_lines_and_their_sections(browser, tmp_path,
                                                             start_server):
    server = start_server(web_config(tmp_path))
    open_page(browser, server)
    with Client(server.address) as client:
        client.command("EHLO client.example")
        click(browser, MARKER.format(state=state.GREETED), "a marker in GREETED")
        wait_for(browser, lambda page: "-> 220 mail.test.ru ESMTP" in dialogue_text(page),
                 "the greeting in the dialogue")
        client.command("MAIL FROM:<bob@test.ru>")
        client.command("RCPT TO:<nobody@test.ru>")
        wait_for(browser, lambda page: "-> 550 5.1.1" in dialogue_text(page), "the 550")
        text = dialogue_text(browser)
        assert "<- MAIL FROM:<bob@test.ru>" in text
        assert "-> 250 2.1.0 Sender <bob@test.ru> ok" in text
        assert "GREETED \u2192 MAIL (MAIL)" in text
        sections = [item.text for item in browser.find_elements(By.CSS_SELECTOR,
                                                                 "#dialogue-lines .rfc")]
        assert ["RFC 5321 4.3.1", "RFC 5321 4.1.1.1", "RFC 5321 4.1.1.2",
                "RFC 5321 3.3, 4.2.2"] == sections
        assert "RCPT refused (550, permanent negative): add one recipient" in text
        client.command("QUIT")


def test_a_message_appears_in_its_mailbox_and_opens(browser, tmp_path, start_server):
    server = start_server(web_config(tmp_path))
    open_page(browser, server)
    send_one(server)
    alice = 'a[data-mailbox="alice@test.ru"]'
    wait_for(browser, lambda page: page.find_element(By.CSS_SELECTOR, alice).find_element(
        By.XPATH, "..").text.endswith(" 1"), "one message in alice's mailbox")
    click(browser, alice, "alice's mailbox")
    row = wait_for(browser, lambda page: page.find_element(By.CSS_SELECTOR,
                                                           "#message-rows tr"), "the message")
    assert "h\u00e9llo" in row.text and "Bob <bob@test.ru>" in row.text
    click(browser, "#message-rows tr", "the message")
    wait_for(browser, lambda page: page.find_element(By.ID, "message-view").is_displayed(),
             "the message view")
    headers = browser.find_element(By.ID, "message-headers").text
    assert "Subject h\u00e9llo" in headers and "Return-Path <bob@test.ru>" in headers
    assert "Hi Alice!" in browser.find_element(By.ID, "message-source").text


def test_deliver_now_sends_a_queued_message(browser, tmp_path, start_server):
    server, port = queued_world(tmp_path, start_server)
    open_page(browser, server)
    queue_id = get_json(server, "/api/queue")["messages"][0]["queue_id"]
    row = wait_for(browser, lambda page: page.find_element(
        By.CSS_SELECTOR, f'#queue-rows tr[data-queue-id="{queue_id}"]'), "the queued message")
    assert "<carol@remote.test> pending, 1 attempt(s), next attempt in" in row.text
    assert "cannot connect" in row.text
    mx = FakeMX("127.0.0.1", port)
    try:
        click(browser, f'#queue-rows tr[data-queue-id="{queue_id}"] button.flush-one',
              "deliver now")
        assert mx.wait_for(1, WAIT)
        wait_for(browser, lambda page: not page.find_elements(By.CSS_SELECTOR,
                                                              "#queue-rows tr"),
                 "the queue emptied")
    finally:
        mx.stop()
    assert browser.find_element(By.ID, "queue-empty").is_displayed()


def test_markup_from_the_wire_stays_text(browser, tmp_path, start_server):
    server = start_server(web_config(tmp_path))
    open_page(browser, server)
    subject = f"Subject: {XSS_SUBJECT}\r\n\r\n<script>window.pwned=5</script>\r\n.\r\n"
    with Client(server.address) as client:
        assert client.code(f"EHLO {XSS_HELO}") == 250
        click(browser, MARKER.format(state=state.GREETED), "the session")
        assert client.code(f"MAIL FROM:<{XSS_SENDER}>") == 250
        assert client.code("RCPT TO:<alice@test.ru>") == 250
        assert client.code("DATA") == 354
        client.send(subject.encode())
        assert client.reply()[0] == 250
        wait_for(browser, lambda page: XSS_SENDER in dialogue_text(page), "the sender")
        client.command("QUIT")
    click(browser, 'a[data-mailbox="alice@test.ru"]', "alice's mailbox")
    click(browser, "#message-rows tr", "the message")
    wait_for(browser, lambda page: XSS_SUBJECT in page.find_element(By.ID,
                                                                     "message-title").text,
             "the subject, as text")
    assert XSS_HELO in browser.find_element(By.ID, "finished-sessions").text
    assert browser.execute_script("return window.pwned") is None
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    assert browser.execute_script(
        "return [...document.scripts].map(s => s.getAttribute('src'))") == ["/static/app.js"]


def test_without_the_password_a_client_off_loopback_is_refused(browser, tmp_path,
                                                              start_server, monkeypatch):
    # Only 127.0.0.2 counts as loopback here, so the browser on 127.0.0.1 is a remote client
    monkeypatch.setattr(web, "LOOPBACK", (web.ipaddress.ip_network("127.0.0.2/32"),))
    server = start_server(web_config(tmp_path, **{"web.password": "s3cret"}))
    browser.get(server.web.url)         # 401: headless Chromium shows none of the page
    assert not browser.find_elements(By.ID, "fsm")
    assert "smtpd" not in browser.title
    host, port = server.web.address
    browser.get(f"http://anyone:s3cret@{host}:{port}/")
    wait_for(browser, lambda page: page.find_element(By.ID, "status").text == "live",
             "the page and its event stream, with the password")


def test_screenshot_of_a_busy_page(browser, tmp_path, start_server):
    """The README's picture: a session in RCPT, one in GREETED, one finished, a queued
    message, a message in a mailbox; written to docs/web.png with SMTPD_UPDATE_DOCS=1."""
    server, _ = queued_world(tmp_path, start_server)
    send_one(server)
    browser.set_window_size(1400, 1640)         # the queue and the mailboxes too
    open_page(browser, server)
    with Client(server.address) as first, Client(server.address) as second:
        first.command("EHLO student.example")
        first.command("MAIL FROM:<bob@test.ru>")
        first.command("RCPT TO:<alice@test.ru>")
        second.command("EHLO laptop.example")
        wait_for(browser, marker_in(state.GREETED), "the second session in GREETED")
        click(browser, MARKER.format(state=state.RCPT), "the first session in RCPT")
        wait_for(browser, lambda page: "-> 250 2.1.5 Recipient" in dialogue_text(page),
                 "the followed dialogue")
        click(browser, 'a[data-mailbox="alice@test.ru"]', "the mailboxes")
        wait_for(browser, lambda page: page.find_element(By.CSS_SELECTOR, "#message-rows tr"),
                 "alice's message")
        browser.execute_script("window.scrollTo(0, 0)")
        png = base64.b64decode(browser.get_screenshot_as_base64())
        first.command("QUIT")
        second.command("QUIT")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20000
    target = SCREENSHOT if os.environ.get("SMTPD_UPDATE_DOCS") else str(tmp_path / "web.png")
    with open(target, "wb") as picture:
        picture.write(png)
