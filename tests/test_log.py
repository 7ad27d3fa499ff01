"""log.py: one line per event, written once; dialogue buffered until the session waits."""
import io
import os
import re
import signal
import threading
import time

import pytest

from log import Log

LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (.*)")


@pytest.fixture
def logged(tmp_path):
    console = io.StringIO()
    log = Log("INFO", console=console, max_bytes=1000, backups=2)
    log.open_file(str(tmp_path / "smtpd.log"))
    yield log, console, tmp_path / "smtpd.log"
    log.close()


def lines(text):
    return [LINE.fullmatch(line).group(1) for line in text.splitlines()]


def test_each_line_has_a_timestamp_and_goes_to_both(logged):
    log, console, path = logged
    log.info("listening on %s:%d", "127.0.0.1", 25)
    assert lines(console.getvalue()) == ["listening on 127.0.0.1:25"]
    assert lines(path.read_text()) == ["listening on 127.0.0.1:25"]


def test_dialogue_waits_for_flush_and_keeps_its_order(logged):
    log, console, path = logged
    log.dialogue("[a] <- NOOP")
    log.dialogue("[a] -> 250 2.0.0 Ok")
    assert console.getvalue() == "" and path.read_text() == ""
    log.info("an event")                    # written at once, after what was buffered
    assert lines(path.read_text()) == ["[a] <- NOOP", "[a] -> 250 2.0.0 Ok", "an event"]
    log.dialogue("[a] <- QUIT")
    log.flush()
    assert lines(console.getvalue())[-1] == "[a] <- QUIT"


def test_a_traceback_is_indented_under_one_line_in_the_file_only(logged):
    log, console, path = logged
    try:
        raise ValueError("broken")
    except ValueError:
        log.error("[%s] session failed", "abc", exc_info=True)
    assert lines(console.getvalue()) == ["[abc] session failed"]
    text = path.read_text().splitlines()
    assert LINE.fullmatch(text[0]).group(1) == "[abc] session failed"
    assert len(text) > 2 and all(line.startswith("    ") for line in text[1:])
    assert text[-1] == "    ValueError: broken"


def test_levels(tmp_path):
    console = io.StringIO()
    log = Log("WARNING", console=console)
    log.info("not shown")
    assert not log.enabled()                # the sessions then skip their dialogue lines
    log.warning("shown")
    log.flush()
    assert lines(console.getvalue()) == ["shown"]


def test_the_file_is_rotated(logged):
    log, _console, path = logged
    for number in range(40):
        log.info("line %d %s", number, "x" * 40)
    assert os.path.exists(f"{path}.1") and os.path.exists(f"{path}.2")
    assert not os.path.exists(f"{path}.3")
    assert os.path.getsize(path) <= 1000 + 100
    assert "line 39" in path.read_text()


def test_a_closed_console_does_not_raise(tmp_path):
    console = io.StringIO()
    log = Log("INFO", console=console)
    console.close()
    log.info("nobody is listening")         # a session must not die of its log


def test_two_processes_over_the_limit_at_once_rotate_once(tmp_path, monkeypatch):
    """[server] processes: the file is opened before the fork; a child opens it anew
    (processes.py does), so that the lock taken to rotate excludes the other process. The
    window between the check and the renames is widened to half a second."""
    path = tmp_path / "smtpd.log"
    path.write_text("GEN0\n" * 400)                 # over max_bytes below
    (tmp_path / "smtpd.log.1").write_text("GEN1\n")
    real_exists = os.path.exists

    def slow_exists(name):
        if str(name).endswith("smtpd.log.1"):
            time.sleep(0.5)
        return real_exists(name)

    monkeypatch.setattr(os.path, "exists", slow_exists)
    log = Log("INFO", console=False, max_bytes=1000, backups=5)
    log.open_file(str(path))
    pid = os.fork()
    if pid == 0:                                    # the child: never back into pytest
        code = 1
        try:
            log.reopen_after_fork()
            log.info("child")
            log.close()
            code = 0
        finally:
            os._exit(code)
    log.info("parent")
    log.close()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "GEN0" in (tmp_path / "smtpd.log.1").read_text()
    assert (tmp_path / "smtpd.log.2").read_text() == "GEN1\n"
    assert not (tmp_path / "smtpd.log.3").exists()
    written = (tmp_path / "smtpd.log.1").read_text().replace("GEN0\n", "") + \
        (path.read_text() if path.exists() else "")
    assert sorted(lines(written)) == ["child", "parent"]        # nothing lost either


def test_a_file_moved_away_is_followed_within_a_second(tmp_path, monkeypatch):
    """logrotate (or another process) renamed smtpd.log: the next line after a second goes
    to a new smtpd.log."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    path = tmp_path / "smtpd.log"
    log = Log("INFO", console=False)
    log.open_file(str(path))
    log.info("before")
    os.rename(path, tmp_path / "smtpd.log.1")
    log.info("same second")                         # not looked at yet: the old file
    clock[0] += 1.5
    log.info("after")
    log.close()
    assert lines((tmp_path / "smtpd.log.1").read_text()) == ["before", "same second"]
    assert lines(path.read_text()) == ["after"]


class StalledConsole(io.StringIO):
    """A console whose first write blocks until `go` is set, as a write(2) to a slow
    terminal or a full pipe does; `stalled` is set once that write has begun."""

    def __init__(self):
        super().__init__()
        self.stalled, self.go = threading.Event(), threading.Event()

    def write(self, text):
        if not self.stalled.is_set():
            self.stalled.set()
            assert self.go.wait(10)
        return super().write(text)


def test_no_session_waits_on_another_threads_write_and_no_line_is_lost(tmp_path):
    console = StalledConsole()
    log = Log("INFO", console=console)
    log.open_file(str(tmp_path / "smtpd.log"))
    writer = threading.Thread(target=log.info, args=("first",))
    writer.start()
    assert console.stalled.wait(10)         # the writer is inside its write
    flushed = threading.Event()

    def session():
        log.dialogue("[b] <- NOOP")
        log.flush()
        flushed.set()

    other = threading.Thread(target=session)
    other.start()
    assert flushed.wait(10)                 # flush() left its line to the writer
    assert lines((tmp_path / "smtpd.log").read_text()) == []
    console.go.set()
    writer.join(10)
    other.join(10)
    log.close()
    assert lines(console.getvalue()) == ["first", "[b] <- NOOP"]
    assert lines((tmp_path / "smtpd.log").read_text()) == ["first", "[b] <- NOOP"]


def test_a_line_written_while_another_thread_writes_is_out_when_write_returns(tmp_path):
    console = StalledConsole()
    log = Log("INFO", console=console)
    path = tmp_path / "smtpd.log"
    log.open_file(str(path))
    writer = threading.Thread(target=log.info, args=("first",))
    writer.start()
    assert console.stalled.wait(10)
    seen_on_return = []
    second = threading.Thread(
        target=lambda: (log.info("second"), seen_on_return.append(path.read_text())))
    second.start()
    second.join(0.2)                        # it must still be waiting for the writer
    assert second.is_alive() and not seen_on_return
    console.go.set()
    writer.join(10)
    second.join(10)
    log.close()
    assert lines(seen_on_return[0]) == ["first", "second"]


def test_a_child_forked_while_a_thread_writes_writes_its_own_lines(tmp_path):
    """[server] processes: the thread writing at the fork does not exist in the child, nor
    does the end of its batch; the child's lines go out all the same."""
    console = StalledConsole()
    path = tmp_path / "smtpd.log"
    log = Log("INFO", console=console)
    log.open_file(str(path))
    writer = threading.Thread(target=log.info, args=("parent",))
    writer.start()
    assert console.stalled.wait(10)
    pid = os.fork()
    if pid == 0:                                    # the child: never back into pytest
        code = 1
        try:
            signal.alarm(10)                        # a child that hangs dies
            log.reopen_after_fork()
            log.info("child")
            log.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    console.go.set()
    writer.join(10)
    log.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert sorted(lines(path.read_text())) == ["child", "parent"]


class BrokenConsole(io.StringIO):
    def write(self, text):
        raise RuntimeError("the console is broken")


def test_a_console_that_raises_takes_no_line_from_the_file(tmp_path):
    path = tmp_path / "smtpd.log"
    log = Log("INFO", console=BrokenConsole())
    log.open_file(str(path))
    log.info("first")
    log.dialogue("[a] <- NOOP")
    log.flush()
    log.close()
    assert lines(path.read_text()) == ["first", "[a] <- NOOP"]
