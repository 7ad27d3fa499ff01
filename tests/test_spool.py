"""spool.py: spool files written as commands and read back, records, corrupt/, the lock."""
import json
import os
import time

import pytest

from address import NULL_ADDRESS
from spool import (END_OF_FILE, SpoolError, command_head, format_parameters, mail_command,
                   rcpt_command)
from tests.queue_world import TEXT, dot_stuff, envelope_of, make_spool, write_spool


@pytest.fixture
def spool(tmp_path):
    return make_spool(tmp_path)


def raw_spool_file(spool, name, content):
    with open(spool.path(name), "wb") as spool_file:
        spool_file.write(content)
    return name


def test_the_command_head_is_what_a_client_sends():
    envelope = envelope_of("alice@test.ru",
                           [("bob@remote.test", {"NOTIFY": "FAILURE", "ORCPT": "rfc822;bob@x"}),
                            "carol@remote.test"],
                           parameters={"BODY": "8BITMIME", "SIZE": "99", "AUTH": "<>"})
    assert command_head(envelope) == (b"EHLO client.example\r\n"
                                      b"MAIL FROM:<alice@test.ru> BODY=8BITMIME\r\n"
                                      b"RCPT TO:<bob@remote.test> NOTIFY=FAILURE"
                                      b" ORCPT=rfc822;bob@x\r\n"
                                      b"RCPT TO:<carol@remote.test>\r\n"
                                      b"DATA\r\n")


def test_parameters_are_formatted_as_rfc_5321_writes_them():
    assert format_parameters({"BODY": "8BITMIME", "SMTPUTF8": None}) == " BODY=8BITMIME SMTPUTF8"
    assert mail_command(NULL_ADDRESS, {}) == "MAIL FROM:<>"


def test_a_spool_file_reads_back_as_its_envelope_and_text(spool):
    text = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nend\r\n"
    name = write_spool(spool, [("bob@remote.test", {"NOTIFY": "SUCCESS,FAILURE"}),
                               "carol@remote.test"],
                       text=text, parameters={"BODY": "8BITMIME"})
    message = spool.read(name)
    assert message.name == name and message.queue_id == name.partition("-")[2]
    assert message.envelope.reverse_path.text == "alice@test.ru"
    assert message.envelope.parameters == {"BODY": "8BITMIME"}
    assert [(r.address.text, r.parameters) for r in message.recipients] == [
        ("bob@remote.test", {"NOTIFY": "SUCCESS,FAILURE"}), ("carol@remote.test", {})]
    assert rcpt_command(message.recipients[0]) == "RCPT TO:<bob@remote.test> NOTIFY=SUCCESS,FAILURE"
    assert message.read_text() == dot_stuff(text)
    assert message.text_size == len(dot_stuff(text))
    assert message.read_text(limit=7) == b"Subject"


def test_the_null_sender_reads_back(spool):
    message = spool.read(write_spool(spool, ["bob@remote.test"], sender=""))
    assert message.envelope.reverse_path == NULL_ADDRESS


def test_text_chunks_stream_the_whole_text_in_pieces(spool):
    text = b"Subject: big\r\n\r\n" + b"".join(b"line %06d\r\n" % n for n in range(20000))
    message = spool.read(write_spool(spool, ["bob@remote.test"], text=text))
    chunks = list(message.text_chunks(chunk_size=4096))
    assert b"".join(chunks) == text
    assert max(len(chunk) for chunk in chunks) == 4096 and len(chunks) > 50


def test_an_smtputf8_address_round_trips(spool):
    head = command_head(envelope_of("jöhn@bücher.test", ["zoë@remote.test"],
                                    parameters={"SMTPUTF8": None}))
    message = spool.read(raw_spool_file(spool, "1-utf8", head + END_OF_FILE))
    assert message.envelope.reverse_path.text == "jöhn@xn--bcher-kva.test"
    assert message.envelope.parameters == {"SMTPUTF8": None}
    assert [r.address.text for r in message.recipients] == ["zoë@remote.test"]


def test_an_empty_text_is_a_whole_spool_file(spool):
    head = command_head(envelope_of("alice@test.ru", ["bob@remote.test"]))
    message = spool.read(raw_spool_file(spool, "1-empty", head + END_OF_FILE))
    assert message.text_size == 0 and message.read_text() == b""


HEAD = command_head(envelope_of("alice@test.ru", ["bob@remote.test"]))


@pytest.mark.parametrize("content, reason", [
    (HEAD[:-len(b"DATA\r\n")] + b"Subject: x\r\n", "no DATA command"),
    (b"EHLO x\r\nMAIL FROM:<alice@test.ru>\r\nDATA\r\nx\r\n" + END_OF_FILE, "not EHLO, MAIL, RCPT"),
    (b"EHLO x\r\nMAIL FROM:<\xff@test.ru>\r\nRCPT TO:<b@c.d>\r\nDATA\r\n" + END_OF_FILE,
     "not UTF-8"),
    (b"EHLO x\r\nMAIL FROM:<alice>\r\nRCPT TO:<b@c.d>\r\nDATA\r\n" + END_OF_FILE, "no @domain"),
    (b"EHLO x\r\nRCPT TO:<b@c.d>\r\nMAIL FROM:<a@b.c>\r\nDATA\r\n" + END_OF_FILE,
     "expected MAIL FROM:"),
    (b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<b@c.d> =bad\r\nDATA\r\n" + END_OF_FILE,
     "bad parameter"),
    (HEAD + b"Subject: x\r\n\r\nbody\r\n", "cut short"),
    (HEAD + b"Subject: x\r\n\r\nbody" + END_OF_FILE, "cut short"),     # "body." is no dot line
    (HEAD + b"x" + END_OF_FILE, "cut short"),
    (HEAD + b".\r\nQUIT", "cut short"),
])
def test_a_damaged_spool_file_is_a_spool_error_saying_why(spool, content, reason):
    with pytest.raises(SpoolError, match=reason):
        spool.read(raw_spool_file(spool, "1-damaged", content))


def test_a_missing_spool_file_is_file_not_found(spool):
    with pytest.raises(FileNotFoundError):
        spool.read("1-nothing")


def test_names_are_spool_files_oldest_first(spool):
    newer = write_spool(spool, ["bob@remote.test"], created=time.time() - 10)
    older = write_spool(spool, ["bob@remote.test"], created=time.time() - 100)
    for other in (".smtp", ".hidden.smtp", "notes.txt"):
        (open(os.path.join(spool.directory, other), "w")).close()
    os.mkdir(spool.path("a-directory"))
    spool.write_state(newer, {"any": "thing"})
    assert spool.names() == [older, newer]


def test_names_of_a_missing_spool_directory(tmp_path):
    from spool import Spool
    assert Spool(str(tmp_path / "nowhere")).names() == []


def test_state_round_trip_and_damage(spool):
    name = write_spool(spool, ["bob@remote.test"])
    assert spool.read_state(name) is None
    spool.write_state(name, {"recipients": {"bob@remote.test": {"status": "done"}}})
    assert spool.read_state(name) == {"recipients": {"bob@remote.test": {"status": "done"}}}
    assert not [n for n in os.listdir(spool.directory) if ".tmp" in n]
    with open(spool.state_path(name), "w") as state_file:
        state_file.write('{"recipients": ')
    with pytest.raises(SpoolError, match=rf"state file {name}.state"):
        spool.read_state(name)
    with open(spool.state_path(name), "wb") as state_file:
        state_file.write(b'{"a": "\xff"}')
    with pytest.raises(SpoolError):
        spool.read_state(name)


def test_remove_takes_both_files(spool):
    name = write_spool(spool, ["bob@remote.test"])
    spool.write_state(name, {})
    spool.remove(name)
    assert not os.path.exists(spool.path(name)) and not os.path.exists(spool.state_path(name))
    spool.remove(name)                      # already gone: not an error


def test_move_to_corrupt_moves_the_pair_and_lists_it(spool):
    name = write_spool(spool, ["bob@remote.test"])
    spool.write_state(name, {"broken": True})
    orphan = "3-orphan"
    spool.write_state(orphan, {})
    assert spool.corrupt() == []
    assert spool.move_to_corrupt(name) == [f"{name}.smtp", f"{name}.state"]
    assert spool.move_to_corrupt(orphan) == [f"{orphan}.state"]
    assert spool.corrupt() == sorted([f"{name}.smtp", f"{name}.state", f"{orphan}.state"])
    assert spool.names() == []
    with open(os.path.join(spool.corrupt_directory, f"{name}.state")) as moved:
        assert json.load(moved) == {"broken": True}


def test_remove_leftovers_takes_what_a_crash_leaves(spool):
    old = time.time() - 3600
    kept = write_spool(spool, ["bob@remote.test"])
    spool.write_state(kept, {})
    stray_tmp = spool.temporary_path("9-half")
    half_state = spool.state_path(kept) + ".tmp1.2"
    orphan_state = spool.state_path("9-orphan")
    fresh_tmp = spool.temporary_path("9-being-written")
    for path in (stray_tmp, half_state, orphan_state, fresh_tmp):
        open(path, "w").close()
    for path in (stray_tmp, half_state, orphan_state):
        os.utime(path, (old, old))
    removed = spool.remove_leftovers(before=time.time() - 60)
    assert sorted(removed) == sorted([stray_tmp, half_state, orphan_state])
    assert os.path.exists(spool.state_path(kept)) and os.path.exists(fresh_tmp)


def test_one_lock_per_spool(spool):
    held = spool.lock()
    assert held is not None
    try:
        assert spool.lock() is None
        assert spool.owner() == os.getpid()
    finally:
        held.close()
    again = spool.lock()
    assert again is not None
    again.close()


def test_write_spool_matches_the_documented_layout(spool):
    name = write_spool(spool, ["bob@remote.test"])
    with open(spool.path(name), "rb") as spool_file:
        content = spool_file.read()
    assert content.startswith(b"EHLO client.example\r\nMAIL FROM:<alice@test.ru>\r\n")
    assert content.endswith(TEXT + b".\r\nQUIT\r\n")
