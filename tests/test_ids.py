"""ids.py: session and queue ids, apart in every process of `[server] processes`."""
import os
import re

import ids


def test_ids_are_hex_of_a_fixed_length():
    assert re.fullmatch(r"[0-9a-f]{6}", ids.session_id())
    assert re.fullmatch(r"[0-9a-f]{16}", ids.queue_id())


def test_a_forked_child_does_not_give_the_names_its_parent_gives():
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:                                  # the child: its next names, then out
        try:
            os.write(writing, " ".join(ids.queue_id() for _ in range(20)).encode())
        finally:
            os._exit(0)
    os.close(writing)
    parents = {ids.queue_id() for _ in range(20)}
    with os.fdopen(reading, "rb") as pipe:
        childs = set(pipe.read().decode().split())
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(childs) == 20 and len(parents) == 20
    assert not parents & childs, parents & childs
