"""resolver.py: next hops from routes, literals and MX records on a loopback DNS server; a DNS
problem is temporary; preload() leaves nothing to import after a privilege drop."""
import json
import os
import subprocess
import sys
import textwrap

import dns.resolver
import pytest

from resolver import DeliveryError, Hop, Resolver
from tests.conftest import make_config
from tests.dns_responder import DNSResponder
from tests.queue_world import a_record, make_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = 2526


@pytest.fixture
def make_resolver(tmp_path):
    """make_resolver(records, **config) -> a Resolver asking a loopback server of `records`."""
    servers = []

    def make(records, **overrides):
        server = DNSResponder(records)
        servers.append(server)
        values = {"relay.nameservers": server.nameserver, "relay.port": PORT,
                  "relay.connect_timeout": "0.5"}
        values.update(overrides)
        return Resolver(make_config(tmp_path, **values), make_log(tmp_path))

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def lookup(make_resolver):
    """lookup(records, domain, **config) -> next hops, or the DeliveryError raised."""
    def run(records, domain, **overrides):
        try:
            return make_resolver(records, **overrides).next_hops(domain)
        except DeliveryError as error:
            return error
    return run


def test_mx_records_by_preference(lookup):
    hops = lookup({"remote.test": [("MX", "20 backup.remote.test."),
                                   ("MX", "10 primary.remote.test.")],
                   "primary.remote.test": a_record("127.0.0.3"),
                   "backup.remote.test": [("A", "127.0.0.4"), ("AAAA", "::1")]},
                  "remote.test")
    assert hops == [Hop("127.0.0.3", PORT), Hop("127.0.0.4", PORT), Hop("::1", PORT)]


def test_equal_preferences_come_in_random_order(make_resolver):
    resolver = make_resolver({"remote.test": [("MX", "10 a.remote.test."),
                                              ("MX", "10 b.remote.test.")],
                              "a.remote.test": a_record("127.0.0.5"),
                              "b.remote.test": a_record("127.0.0.6")})
    orders = {tuple(hop.ip for hop in resolver.next_hops("remote.test")) for _ in range(40)}
    assert orders == {("127.0.0.5", "127.0.0.6"), ("127.0.0.6", "127.0.0.5")}


def test_the_implicit_mx_is_the_domain_itself(lookup):
    assert lookup({"remote.test": a_record("127.0.0.7")}, "remote.test") == [
        Hop("127.0.0.7", PORT)]


def test_a_null_mx_is_permanent_5_1_10(lookup):
    error = lookup({"remote.test": [("MX", "0 .")]}, "remote.test")
    assert isinstance(error, DeliveryError) and error.permanent
    assert error.reply.startswith("556 5.1.10")


def test_nxdomain_is_permanent(lookup):
    error = lookup({}, "nowhere.test")
    assert error.permanent and error.reply.startswith("550 5.1.2")


def test_no_mx_and_no_address_is_permanent(lookup):
    error = lookup({"remote.test": [("TXT", '"hello"')]}, "remote.test")
    assert error.permanent and error.reply.startswith("550 5.4.4")


@pytest.mark.parametrize("records", [
    {"remote.test": "SERVFAIL"},
    {"remote.test": "TIMEOUT"},
    {"remote.test": [("A", "TIMEOUT")]},                # empty MX answer, then no A answer
    {"remote.test": [("A", "SERVFAIL")]},
    {"remote.test": [("MX", "10 mx.remote.test.")], "mx.remote.test": [("A", "TIMEOUT")]},
    {"remote.test": [("MX", "10 mx.remote.test.")], "mx.remote.test": "SERVFAIL"},
], ids=["servfail", "timeout", "empty-mx-then-a-timeout", "empty-mx-then-a-servfail",
        "mx-host-a-timeout", "mx-host-servfail"])
def test_a_dns_problem_is_temporary(lookup, records):
    error = lookup(records, "remote.test")
    assert isinstance(error, DeliveryError)
    assert not error.permanent
    assert error.reply.startswith("451 4.4.3")


def test_an_mx_host_that_fails_is_skipped_when_another_answers(lookup):
    hops = lookup({"remote.test": [("MX", "10 a.remote.test."), ("MX", "20 b.remote.test.")],
                   "a.remote.test": [("A", "TIMEOUT")], "b.remote.test": a_record("127.0.0.8")},
                  "remote.test")
    assert hops == [Hop("127.0.0.8", PORT)]


def test_mx_hosts_without_addresses_are_temporary(lookup):
    error = lookup({"remote.test": [("MX", "10 gone.remote.test.")]}, "remote.test")
    assert not error.permanent and error.reply.startswith("451 4.4.4")


def test_no_nameservers_at_all_is_temporary(tmp_path, monkeypatch):
    def no_configuration(self, *args, **kwargs):
        raise dns.resolver.NoResolverConfiguration("no /etc/resolv.conf")
    monkeypatch.setattr(dns.resolver.Resolver, "read_resolv_conf", no_configuration)
    config = make_config(tmp_path, **{"relay.nameservers": ""})     # the system's, if any
    resolver = Resolver(config, make_log(tmp_path))                 # does not raise
    with pytest.raises(DeliveryError) as raised:
        resolver.next_hops("remote.test")
    assert not raised.value.permanent and raised.value.reply.startswith("451 4.4.3 no DNS server")


def test_routes_by_address_and_by_host_name(lookup):
    routes = "remote.test=127.0.0.9:2600, other.test=localhost:2601"
    assert lookup({}, "remote.test", **{"relay.routes": routes}) == [Hop("127.0.0.9", 2600)]
    by_name = lookup({}, "other.test", **{"relay.routes": routes})
    assert Hop("127.0.0.1", 2601) in by_name


def test_a_route_host_that_does_not_resolve_is_temporary(lookup):
    error = lookup({}, "remote.test", **{"relay.routes": "remote.test=no-such-host.invalid:25"})
    assert not error.permanent and error.reply.startswith("451 4.4.3")


def test_address_literals_need_no_dns(lookup):
    assert lookup({}, "[127.0.0.2]") == [Hop("127.0.0.2", PORT)]
    assert lookup({}, "[IPv6:::1]") == [Hop("::1", PORT)]
    assert str(Hop("::1", PORT)) == f"[::1]:{PORT}"


# What a server that dropped its privileges can no longer do: import. The lookups and a DSN
# run in a fresh interpreter after preload(), with every further import refused.
PRELOADED = textwrap.dedent("""
    import json, sys
    import bounce, config, resolver
    from address import Address
    from envelope import Envelope, Recipient
    resolver.preload()
    bounce.preload()
    refused = []
    class RefuseImports:
        def find_spec(self, name, path=None, target=None):
            refused.append(name)
            raise ImportError("imports are off: " + name)
    sys.meta_path.insert(0, RefuseImports())
    class Log:
        def info(self, *args): pass
    sections = {name: dict(keys) for name, keys in config.DEFAULTS.items()}
    sections["relay"].update(nameservers=sys.argv[1], connect_timeout="0.5")
    lookups = {}
    the_resolver = resolver.Resolver(config.from_sections(sections), Log())
    for domain in ("remote.test", "implicit.test", "nowhere.test", "nullmx.test", "slow.test",
                   "broken.test"):
        try:
            lookups[domain] = [list(hop) for hop in the_resolver.next_hops(domain)]
        except resolver.DeliveryError as error:
            lookups[domain] = error.reply
    sizes = []
    for sender in (Address("alice", "test.ru"), Address("j\\u00f6rg", "test.ru")):
        bob = Recipient(Address("bob", "remote.test"), {"ORCPT": "rfc822;bob@remote.test"})
        envelope = Envelope(sender, "client.example", None, {"RET": "FULL", "ENVID": "x"},
                            [bob], "id")
        notices = [bounce.Notice.from_reply(bob, action, "550 5.1.1 no", "127.0.0.2:25",
                                            1.0, 2.0) for action in bounce.SEVERITY]
        text = b"Subject: \\xd0\\xbf\\r\\n\\r\\nbody \\xd0\\xbf\\r\\n"
        for whole in (None, text):
            sizes.append(len(bounce.build_dsn("mail.test.ru", envelope, notices, text, whole,
                                              0.0, 0.0)))
    print(json.dumps({"refused": refused, "lookups": lookups, "dsn": min(sizes)}))
""")


def test_after_preload_lookups_and_bounces_import_nothing(tmp_path):
    records = {"remote.test": [("MX", "10 mx.remote.test."), ("MX", "20 mx2.remote.test.")],
               "mx.remote.test": [("A", "127.0.0.2"), ("AAAA", "::1")],
               "mx2.remote.test": [("CNAME", "mx.remote.test.")],
               "implicit.test": a_record("127.0.0.3"), "nullmx.test": [("MX", "0 .")],
               "slow.test": "TIMEOUT", "broken.test": "SERVFAIL"}
    script = tmp_path / "preloaded.py"
    script.write_text(PRELOADED)
    with DNSResponder(records) as server:
        finished = subprocess.run([sys.executable, str(script), server.nameserver],
                                  capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "PYTHONPATH": ROOT})
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout)
    assert result["refused"] == []
    assert result["lookups"]["remote.test"][0] in (["127.0.0.2", 25], ["::1", 25])
    assert result["lookups"]["implicit.test"] == [["127.0.0.3", 25]]
    assert result["lookups"]["nowhere.test"].startswith("550 5.1.2")
    assert result["lookups"]["nullmx.test"].startswith("556 5.1.10")
    assert result["lookups"]["slow.test"].startswith("451 4.4.3")
    assert result["lookups"]["broken.test"].startswith("451 4.4.3")
    assert result["dsn"] > 500
