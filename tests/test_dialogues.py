"""Issue 7: RFC 5321 Appendix D played against the server, and the docs checked against the code."""
import os
import re

import pytest

import explain
import state
from tests import dialogues
from tests.conftest import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIALOGUES = dialogues.all_dialogues()


@pytest.mark.parametrize("dialogue", DIALOGUES, ids=[d.name for d in DIALOGUES])
def test_appendix_d_dialogue(dialogue, tmp_path, start_server):
    server = start_server(make_config(tmp_path, users=dialogue.users, **dialogue.overrides))
    transcript, mismatches = dialogues.run(server.address, dialogue)
    assert mismatches == []
    with open(dialogues.WALKTHROUGH, encoding="utf-8") as walkthrough:
        documented = dialogues.walkthrough_blocks(walkthrough.read())
    assert documented.get(dialogue.name) == transcript, \
        "docs/walkthrough.md is out of date: run python -m tests.dialogues"


def test_every_dialogue_is_in_the_walkthrough():
    with open(dialogues.WALKTHROUGH, encoding="utf-8") as walkthrough:
        documented = dialogues.walkthrough_blocks(walkthrough.read())
    assert sorted(documented) == sorted(d.name for d in DIALOGUES)


def test_relayed_dialogue_leaves_the_transaction_in_the_spool(tmp_path, start_server):
    dialogue = [d for d in DIALOGUES if d.name.startswith("D3")][0]
    server = start_server(make_config(tmp_path, users=dialogue.users, **dialogue.overrides))
    dialogues.run(server.address, dialogue)
    spooled = [n for n in os.listdir(tmp_path / "spool") if n.endswith(".smtp")]
    assert len(spooled) == 1
    text = (tmp_path / "spool" / spooled[0]).read_bytes()
    assert b"MAIL FROM:<JQP@bar.com>\r\nRCPT TO:<Jones@xyz.com>\r\nDATA\r\n" in text


def test_readme_state_diagram_is_generated_from_the_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        text = readme.read()
    found = re.search(r"<!-- fsm -->\n```mermaid\n(.*?)```\n", text, re.S)
    assert found, "README.md has no generated state diagram"
    assert found.group(1).rstrip("\n") == explain.draw("mermaid"), \
        "README.md's diagram is out of date: paste python smtpd.py --fsm"


def test_the_diagram_has_every_state_and_every_allowed_verb():
    mermaid, dot = explain.draw("mermaid"), explain.draw("dot")
    for source, rules in state.TRANSITIONS.items():
        for verb in rules:
            name = explain.EDGE_NAMES.get(verb, verb)
            edges = [line for line in mermaid.splitlines()
                     if line.strip().startswith(f"{source} -->") and name in line]
            assert edges, f"{source} {verb} missing from the Mermaid diagram"
            assert f"{source} -> " in dot and name in dot
    assert f"[*] --> {state.START} : connect / 220" in mermaid


def test_fsm_flag_prints_the_diagram(capsys):
    import smtpd
    assert smtpd.main(["--fsm", "dot"]) == 0
    assert capsys.readouterr().out.strip() == explain.draw("dot")


def test_help_comes_from_the_table(client):
    code, lines = client.command("HELP")
    assert code == 214
    assert all(verb in lines[0] for verb in state.VERBS)
    code, lines = client.command("HELP mail")
    assert lines == [f"214-2.0.0 MAIL: {state.VERBS['MAIL'].summary}",
                     f"214-2.0.0 Syntax: {state.VERBS['MAIL'].syntax}",
                     "214-2.0.0 Allowed in: GREETED",
                     "214 2.0.0 See RFC 5321 4.1.1.2"]


def test_trace_shows_state_changes_rfc_sections_and_data_framing(tmp_path, start_server):
    server = start_server(make_config(tmp_path, **{"log.trace": "yes"}))
    from tests.wire import Client
    with Client(server.address) as client:
        client.send_message("bob@test.ru", ["alice@test.ru"],
                            b"Subject: t\r\n\r\n..dotted\r\n.\r\n")
        client.command("QUIT")
    log = (tmp_path / "logs" / "smtpd.log").read_text()
    assert "[START -> GREETED] EHLO accepted: 250 (RFC 5321 4.1.1.1)" in log
    assert "[GREETED -> MAIL] MAIL accepted: 250 2.1.0 (RFC 5321 4.1.1.2)" in log
    assert "[RCPT -> DATA] DATA waiting for more: 354 (RFC 5321 4.1.1.4)" in log
    assert "dot-stuffing removed from 1 line(s) (RFC 5321 4.5.2)" in log
    assert "end of data: <CRLF>.<CRLF> after" in log
    assert "[DATA -> GREETED] CRLF.CRLF accepted: 250 2.0.0 (RFC 5321 4.1.1.4)" in log


def test_readme_usage_is_what_help_prints():
    import config as configuration
    usage = configuration.build_parser().format_usage().rstrip("\n")
    indented = "\n".join("    " + line for line in usage.splitlines())
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        assert indented in readme.read(), "README.md's usage is out of date: python smtpd.py -h"


def test_readme_ehlo_reply_is_what_the_server_says(server):
    from tests.wire import Client
    with Client(server.address) as client:
        _, lines = client.command("EHLO client.example")
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        text = readme.read()
    block = "\n".join(f"    {line}" for line in lines)
    assert block in text, f"README.md's EHLO transcript is out of date:\n{block}"
