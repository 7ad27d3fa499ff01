"""The TLS memory per domain (<spool>/tls-domains.json) and the rules the relay draws from
it and from an MTA-STS policy (tlspolicy.py); the relay's use of them is in test_relay.py."""
import json

import pytest

import mtasts
import tlsmemory
import tlspolicy
from resolver import Hop, IMPLICIT_MX, MX, ROUTE
from tests.conftest import make_config
from tests.queue_world import log_text, make_log
from tlsmemory import PLAIN, TLS, VERIFIED, TlsMemory


@pytest.fixture
def memory(tmp_path):
    (tmp_path / "spool").mkdir()
    return TlsMemory(str(tmp_path / "spool"))


def stored(tmp_path):
    return json.loads((tmp_path / "spool" / "tls-domains.json").read_text())


def test_a_domain_never_seen_is_plain_and_nothing_is_written(memory, tmp_path):
    assert memory.level("remote.test") == PLAIN
    assert memory.entries() == []
    assert not (tmp_path / "spool" / "tls-domains.json").exists()


def test_the_level_only_rises(memory, tmp_path):
    assert memory.record("Remote.Test", TLS, now=100.0)
    assert memory.record("remote.test", VERIFIED, now=200.0)
    assert not memory.record("remote.test", TLS, now=300.0)
    assert not memory.record("remote.test", PLAIN, now=300.0)
    assert memory.level("remote.test") == VERIFIED
    assert stored(tmp_path) == {"remote.test": {"level": "verified", "since": 200.0}}


def test_plain_is_remembered_too_and_survives_a_new_reader(memory, tmp_path):
    memory.record("plain.test", PLAIN, now=1.0)
    memory.record("remote.test", VERIFIED, now=2.0)
    again = TlsMemory(str(tmp_path / "spool"))
    assert again.entries() == [tlsmemory.Entry("plain.test", PLAIN, 1.0),
                               tlsmemory.Entry("remote.test", VERIFIED, 2.0)]


DAMAGED = ["not json", '{"remote.test": {"level": "best", "since": 1}}', '["a list"]',
           '{"remote.test": {"level": "tls"}}', '{"remote.test": "tls"}', "\udcff"]


def memory_file(tmp_path):
    return tmp_path / "spool" / "tls-domains.json"


def set_aside(tmp_path):
    return sorted((tmp_path / "spool").glob("tls-domains.json.damaged-*"))


@pytest.fixture
def logged_memory(tmp_path):
    """A TlsMemory with the log, and a clock the test moves (`clock.now`)."""
    (tmp_path / "spool").mkdir()

    class Clock:
        now = 1000.0

        def __call__(self):
            return self.now

    clock = Clock()
    memory = TlsMemory(str(tmp_path / "spool"), make_log(tmp_path), clock=clock)
    memory.clock = clock
    return memory


@pytest.mark.parametrize("content", DAMAGED)
def test_a_damaged_file_is_moved_aside_and_a_fresh_memory_starts(logged_memory, tmp_path,
                                                                 content):
    damaged = content.encode("utf-8", "surrogateescape")
    memory_file(tmp_path).write_bytes(damaged)
    assert logged_memory.level("remote.test") == PLAIN
    [aside] = set_aside(tmp_path)
    assert aside.read_bytes() == damaged
    assert not memory_file(tmp_path).exists()
    assert f"moved aside to {aside}" in logged_memory.problem
    log = log_text(tmp_path)
    assert f"TLS memory {memory_file(tmp_path)} is damaged" in log
    assert f"moved aside to {aside}; a fresh memory starts" in log


def test_a_damaged_file_is_never_overwritten_by_the_next_rise(tmp_path):
    """The review's case: a truncated file, then any delivery over TLS to any domain."""
    (tmp_path / "spool").mkdir()
    memory = TlsMemory(str(tmp_path / "spool"))             # no log: `problem` says it
    memory.record("bank.test", VERIFIED, now=1.0)
    memory.record("shop.test", VERIFIED, now=2.0)
    truncated = memory_file(tmp_path).read_bytes()[:-3]
    memory_file(tmp_path).write_bytes(truncated)
    assert memory.record("other.test", TLS, now=3.0)
    [aside] = set_aside(tmp_path)
    assert aside.read_bytes() == truncated                  # bank.test and shop.test are in it
    assert stored(tmp_path) == {"other.test": {"level": "tls", "since": 3.0}}


def test_a_second_damage_does_not_replace_the_first_copy(memory, tmp_path):
    memory_file(tmp_path).write_text("first")
    memory.entries()
    memory_file(tmp_path).write_text("second")
    memory.entries()
    assert sorted(path.read_text() for path in set_aside(tmp_path)) == ["first", "second"]


def test_an_unreadable_file_is_kept_and_every_decision_without_it_is_an_error(logged_memory,
                                                                            tmp_path):
    memory_file(tmp_path).mkdir()           # open() fails as for a file root cannot read
    assert logged_memory.level("remote.test") == PLAIN
    assert not logged_memory.record("remote.test", VERIFIED)
    assert logged_memory.entries() == []
    assert memory_file(tmp_path).is_dir() and set_aside(tmp_path) == []
    assert "tls-domains.json" in logged_memory.problem

    def errors():
        return log_text(tmp_path).count("TLS memory cannot be read")

    assert errors() == 1                    # three decisions within the minute: one ERROR
    logged_memory.clock.now += tlsmemory.REPORT_INTERVAL
    logged_memory.level("remote.test")
    assert errors() == 2
    assert f"({memory_file(tmp_path)}: [Errno 21] Is a directory: " in log_text(tmp_path)


def test_the_memory_is_written_again_once_the_file_can_be_read(logged_memory, tmp_path):
    memory_file(tmp_path).mkdir()
    assert not logged_memory.record("remote.test", TLS)
    memory_file(tmp_path).rmdir()
    assert logged_memory.record("remote.test", TLS, now=5.0)
    assert stored(tmp_path) == {"remote.test": {"level": "tls", "since": 5.0}}
    assert logged_memory.problem == ""


# ---------------------------------------------------------------------------------------
# The rules of one transaction


def policy(mode, mx=("mx1.remote.test",)):
    return mtasts.Policy("remote.test", "id1", mode, tuple(mx), 86400, 0.0)


def rules(tmp_path, memory=None, sts_policy=None, **overrides):
    config = make_config(tmp_path, **overrides)
    owner = tlspolicy.TlsPolicy(config, make_log(tmp_path), memory=memory)
    remembered = memory.level("remote.test") if memory else PLAIN
    return tlspolicy.DomainTls(owner, "remote.test", sts_policy, remembered, "[q]")


MX1 = Hop("127.0.0.2", 25, "mx1.remote.test", MX)
ROGUE = Hop("127.0.0.3", 25, "rogue.remote.test", MX)


def test_enforce_refuses_an_mx_it_does_not_name_and_anything_but_verified(tmp_path):
    enforce = rules(tmp_path, sts_policy=policy("enforce"))
    assert enforce.refusal(ROGUE).startswith("451 4.7.5 rogue.remote.test (127.0.0.3:25) is "
                                             "not an MX host")
    assert enforce.refusal(MX1) is None
    assert enforce.first_attempt() == VERIFIED
    assert enforce.accepts(MX1, VERIFIED) and not enforce.accepts(MX1, TLS)
    assert enforce.shortfall(MX1, PLAIN).startswith("451 4.7.5 MTA-STS policy of remote.test")
    assert "MTA-STS enforce: skipping rogue.remote.test" in log_text(tmp_path)


def test_enforce_covers_the_implicit_mx_but_not_a_route(tmp_path):
    enforce = rules(tmp_path, sts_policy=policy("enforce", ["remote.test"]))
    assert not enforce.accepts(Hop("127.0.0.2", 25, "remote.test", IMPLICIT_MX), TLS)
    route = Hop("127.0.0.9", 25, "smarthost.test", ROUTE)
    assert enforce.refusal(route) is None and enforce.accepts(route, PLAIN)


def test_testing_mode_refuses_nothing_and_logs_what_it_would_have(tmp_path):
    testing = rules(tmp_path, sts_policy=policy("testing"))
    assert testing.refusal(ROGUE) is None
    assert testing.accepts(MX1, PLAIN) and testing.shortfall(MX1, PLAIN) is None
    log = log_text(tmp_path)
    assert "MTA-STS testing: would have skipped rogue.remote.test" in log
    assert "MTA-STS testing: mx1.remote.test (127.0.0.2:25) would have failed: clear text" in log


def test_mode_none_is_no_policy(tmp_path):
    none = rules(tmp_path, sts_policy=policy("none", []))
    assert none.refusal(ROGUE) is None and none.accepts(ROGUE, PLAIN)


@pytest.mark.parametrize("remembered, refused", [(VERIFIED, (TLS, PLAIN)), (TLS, (PLAIN,)),
                                                 (PLAIN, ())])
def test_the_memory_refuses_less_than_it_has_seen(tmp_path, memory, remembered, refused):
    memory.record("remote.test", remembered)
    domain = rules(tmp_path, memory=memory)
    for level in tlsmemory.LEVELS:
        assert domain.accepts(ROGUE, level) == (level not in refused)
    if refused:
        assert domain.shortfall(ROGUE, refused[-1]) == \
            f"451 4.7.5 remote.test has taken mail over " \
            f"{tlsmemory.WHAT_LEVEL_MEANS[remembered]} before; refusing to downgrade"


def test_delivered_records_the_level(tmp_path, memory):
    domain = rules(tmp_path, memory=memory)
    domain.delivered(MX1, VERIFIED)
    assert memory.level("remote.test") == VERIFIED
    assert "TLS memory: remote.test now takes mail over verified TLS" in log_text(tmp_path)


def test_clear_text_is_not_written_down(tmp_path, memory):
    rules(tmp_path, memory=memory).delivered(MX1, PLAIN)
    assert memory.entries() == []


def test_the_first_attempt(tmp_path, memory):
    assert rules(tmp_path).first_attempt() == TLS           # nothing asks for more
    assert rules(tmp_path, memory=memory).first_attempt() == VERIFIED
    assert rules(tmp_path, memory=memory, **{"relay.tls": "no"}).first_attempt() == PLAIN
