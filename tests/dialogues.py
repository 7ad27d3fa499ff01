"""Dialogue files: RFC 5321 Appendix D scenarios as `client ->` / `server <-` lines.

    # config: domains.local=foo.com server.hostname=foo.com     (section.key=value ...)
    # users: jones brown
    server <- 220                 expect a reply whose code (and enhanced code) starts so
    client -> EHLO bar.com        send this line, CRLF added

`run()` plays a dialogue against a server and returns the transcript (`C:` / `S:` lines,
queue ids replaced by QUEUE-ID so it is the same every run). The walkthrough in
docs/walkthrough.md embeds these transcripts; tests/test_dialogues.py checks that it still
matches, and `python -m tests.dialogues` rewrites it after a deliberate change.
"""
import os
import re
import sys
from typing import NamedTuple

from tests.wire import Client

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDER = os.path.join(HERE, "dialogues")
WALKTHROUGH = os.path.join(os.path.dirname(HERE), "docs", "walkthrough.md")
QUEUE_ID = re.compile(r"\b[0-9a-f]{16}\b")


class Dialogue(NamedTuple):
    name: str
    title: str
    overrides: dict         # {"section.key": value} for make_config
    users: tuple
    steps: list             # [("client", line) or ("server", expected)]


def load(path):
    name = os.path.splitext(os.path.basename(path))[0]
    title, overrides, users, steps = "", {}, (), []
    with open(path, encoding="utf-8") as dialogue_file:
        for line in dialogue_file.read().splitlines():
            if line.startswith("# config:"):
                overrides.update(item.split("=", 1) for item in line[9:].split())
            elif line.startswith("# users:"):
                users = tuple(line[8:].split())
            elif line.startswith("#"):
                title = title or line[1:].strip()
            elif line.startswith("client ->"):
                steps.append(("client", line[10:]))
            elif line.startswith("server <-"):
                steps.append(("server", line[10:].strip()))
    return Dialogue(name, title, overrides, users, steps)


def all_dialogues():
    return [load(os.path.join(FOLDER, name)) for name in sorted(os.listdir(FOLDER))
            if name.endswith(".txt")]


def run(address, dialogue):
    """Play the dialogue; return (transcript lines, [mismatches])."""
    transcript, mismatches = [], []
    with Client(address, greet=False) as client:
        for kind, text in dialogue.steps:
            if kind == "client":
                client.send(text + "\r\n")
                transcript.append(f"C: {text}")
                continue
            code, lines = client.reply()
            transcript += [f"S: {QUEUE_ID.sub('QUEUE-ID', line)}" for line in lines]
            last = lines[-1] if lines else "(connection closed)"
            expected_code, _, expected_enhanced = text.partition(" ")
            if not last.startswith(expected_code) or \
                    (expected_enhanced and last[4:].split(" ")[0] != expected_enhanced):
                mismatches.append(f"expected {text!r}, got {last!r}")
    return transcript, mismatches


def walkthrough_blocks(text):
    """{dialogue name: transcript lines} from the walkthrough's generated blocks."""
    pattern = re.compile(r"<!-- transcript: (\S+) -->\n```\n(.*?)```\n", re.S)
    return {name: block.splitlines() for name, block in pattern.findall(text)}


def replace_blocks(text, transcripts):
    def block(match):
        lines = transcripts[match.group(1)]
        return f"<!-- transcript: {match.group(1)} -->\n```\n" + "\n".join(lines) + "\n```\n"
    return re.sub(r"<!-- transcript: (\S+) -->\n```\n.*?```\n", block, text, flags=re.S)


def main():
    """Rewrite the walkthrough's transcripts from a real run of every dialogue."""
    import tempfile
    from pathlib import Path

    import smtpd
    from tests.conftest import make_config

    transcripts = {}
    for dialogue in all_dialogues():
        with tempfile.TemporaryDirectory() as folder:
            config = make_config(Path(folder), users=dialogue.users, **dialogue.overrides)
            server = smtpd.start(config, console=False)
            try:
                transcripts[dialogue.name], mismatches = run(server.address, dialogue)
            finally:
                server.stop(grace=1)
        if mismatches:
            sys.exit(f"{dialogue.name}: {'; '.join(mismatches)}")
    with open(WALKTHROUGH, encoding="utf-8") as walkthrough:
        text = walkthrough.read()
    with open(WALKTHROUGH, "w", encoding="utf-8") as walkthrough:
        walkthrough.write(replace_blocks(text, transcripts))
    print(f"updated {len(transcripts)} transcripts in {WALKTHROUGH}")


if __name__ == "__main__":
    main()
