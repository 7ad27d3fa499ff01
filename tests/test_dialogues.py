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
    offered = [verb for verb in state.VERBS if verb != "STARTTLS"]
    assert lines[0] == "214-2.0.0 Commands: " + " ".join(offered)   # no certificate here
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


def test_help_lists_starttls_only_with_a_certificate(tmp_path, start_server, certificate):
    from tests.wire import Client
    cert, key = certificate
    server = start_server(make_config(tmp_path, **{"tls.cert": cert, "tls.key": key}))
    with Client(server.address) as client:
        assert "STARTTLS" in client.command("HELP")[1][0]
    (tmp_path / "plain").mkdir()                    # a spool of its own
    plain = start_server(make_config(tmp_path / "plain"))
    with Client(plain.address) as client:
        assert "STARTTLS" not in client.command("HELP")[1][0]
        lines = client.command("HELP STARTTLS")[1]
    assert "214-2.0.0 Not offered here: no certificate is configured ([tls] cert, key)" in lines


# ---------------------------------------------------------------------------------------
# Issue 16: the written lessons tell the truth


def walkthrough_text():
    with open(dialogues.WALKTHROUGH, encoding="utf-8") as walkthrough:
        return walkthrough.read()


def test_the_walkthrough_start_command_greets_as_its_transcripts(tmp_path, start_server):
    import config as configuration
    import shlex
    from tests.wire import Client
    command = re.search(r"^    (python smtpd\.py .*)$", walkthrough_text(), re.M).group(1)
    arguments = shlex.split(command)[2:]
    config, _ = configuration.load(arguments)
    dialogue = DIALOGUES[0]
    for dotted, value in dialogue.overrides.items():    # what the dialogue files set
        section, key = dotted.split(".")
        if (section, key) == ("server", "hostname"):
            assert config.hostname == value
        if (section, key) == ("domains", "local"):
            assert config.local_domains == (value,)
    (tmp_path / "users").write_text("jones\n")
    sections = {"server.hostname": config.hostname, "domains.local": ",".join(
        config.local_domains)}
    server = start_server(make_config(tmp_path, **sections))
    with Client(server.address) as client:
        greeting = client.greeting[1][0]
    documented = dialogues.walkthrough_blocks(walkthrough_text())[dialogue.name][0]
    assert f"S: {greeting}" == documented == "S: 220 foo.com ESMTP smtpd ready"


def test_the_walkthrough_names_every_user_its_dialogues_need():
    stated = re.search(r"list them in `conf/users`.*?\n\n", walkthrough_text(), re.S).group(0)
    named = set(re.findall(r"`([^`]+)`", stated))
    needed = {user for dialogue in DIALOGUES for user in dialogue.users}
    assert needed <= named, f"the walkthrough does not name {needed - named}"


def test_the_readme_telnet_transcript_is_what_the_server_says(server):
    """README's "Talking to it": every server line, replayed (queue ids aside)."""
    from tests.wire import Client
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        block = re.search(r"    \$ telnet localhost 2525\n((?:    .*\n|\n)+?)\n\S",
                          readme.read()).group(1)
    lines = [line[4:] for line in block.splitlines()]
    reply = re.compile(r"^\d{3}[ -]")
    transcript = []
    with Client(server.address, greet=False) as client:
        for line in lines:
            if reply.match(line):
                continue
            if not transcript:
                transcript += client.reply()[1]
            client.send(line + "\r\n")
            if line in (".",) or not _inside_data(lines, line, transcript):
                transcript += client.reply()[1]
    documented = [line for line in lines if reply.match(line)]
    assert len(documented) > 15 and documented[-1].startswith("221")
    assert [dialogues.QUEUE_ID.sub("QUEUE-ID", line) for line in transcript] == \
        [dialogues.QUEUE_ID.sub("QUEUE-ID", line) for line in documented]


def _inside_data(lines, line, transcript):
    """Whether `line` is message text: after a 354 and before the final dot."""
    return bool(transcript) and transcript[-1].startswith("354")


CITATION = re.compile(r"RFC 5321 ((?:[A-F]\b|\d+)(?:\.\d+)*)((?:, (?:\d+(?:\.\d+)+))*)")
CITED_FILES = [os.path.join(ROOT, name) for name in sorted(os.listdir(ROOT))
               if name.endswith(".py")] + \
    [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "conf", "smtpd.conf")] + \
    [os.path.join(ROOT, "docs", name) for name in sorted(os.listdir(os.path.join(ROOT, "docs")))
     if name.endswith(".md")] + \
    [os.path.join(ROOT, "tests", name) for name in sorted(os.listdir(os.path.join(ROOT,
                                                                                   "tests")))
     if name.endswith(".py") and name != "rfc5321_sections.py"]


def cited_sections():
    """{section: [file:line, ...]} of every "RFC 5321 x.y[, z.w]" in the code and docs, and
    of the walkthrough's bare "(x.y)" (it names RFC 5321 once, at the top)."""
    found = {}
    for path in CITED_FILES:
        with open(path, encoding="utf-8") as cited:
            for number, line in enumerate(cited, 1):
                where = f"{os.path.relpath(path, ROOT)}:{number}"
                for match in CITATION.finditer(line):
                    sections = [match.group(1)] + re.findall(r"\d+(?:\.\d+)+", match.group(2))
                    for section in sections:
                        found.setdefault(section.rstrip("."), []).append(where)
                if path == dialogues.WALKTHROUGH:
                    for group in re.findall(r"\(([\d.,; ]+)[;:)]", line):
                        for section in re.findall(r"\b\d+\.\d+(?:\.\d+)*", group):
                            found.setdefault(section, []).append(where)
    return found


def test_every_cited_rfc5321_section_is_in_its_table_of_contents():
    from tests.rfc5321_sections import SECTIONS
    found = cited_sections()
    assert len(found) > 40                  # the search finds the citations at all
    missing = {section: places for section, places in found.items() if section not in SECTIONS}
    assert missing == {}


def test_the_replies_cite_the_sections_that_define_them():
    import replies
    from tests.rfc5321_sections import SECTIONS
    for name in dir(replies):
        reply = getattr(replies, name)
        if isinstance(reply, replies.Reply) and reply.rfc.startswith("RFC 5321 "):
            for section in reply.rfc[len("RFC 5321 "):].split(", "):
                assert section in SECTIONS, (name, reply.rfc)
    # unknown users are 3.3 and 4.2.2; 3.6.2 is about relaying
    assert replies.NO_SUCH_USER.rfc == "RFC 5321 3.3, 4.2.2"
    assert replies.RELAY_DENIED.rfc == "RFC 5321 3.6.2"
    assert "(3.6.2)" not in walkthrough_text().split("## D.3")[0]


def test_interop_doc_lists_no_xfail_that_the_tests_do_not_have():
    with open(os.path.join(ROOT, "docs", "interop.md"), encoding="utf-8") as doc:
        documented = doc.read()
    with open(os.path.join(ROOT, "tests", "test_interop.py"), encoding="utf-8") as tests:
        code = tests.read()
    for row in re.findall(r"^\| `(test_\w+)[^|]*\|[^|]*\|(.*)\|$", documented, re.M):
        name, claim = row
        marked = re.search(rf"@pytest\.mark\.xfail[^\n]*\n(?:@[^\n]*\n)*def {name}\b", code)
        assert bool(marked) == ("xfail" in claim), name

