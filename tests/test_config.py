"""config.py as a user meets it: the shipped defaults, flags over the file, the one-line
message for every bad value, and where relative paths lead."""
import configparser
import ipaddress
import os
import subprocess
import sys

import pytest

import config
from config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "conf", "smtpd.conf")
CLI_TIMEOUT = 30


def build(**overrides):
    """from_sections over the built-in defaults; `overrides` are "section.key" = value."""
    sections = config.defaults()
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        sections[section][key] = value
    return config.from_sections(sections)


def message(call, *args, **kwargs):
    """The ConfigError text a call raises, checked to be one line."""
    with pytest.raises(ConfigError) as raised:
        call(*args, **kwargs)
    text = str(raised.value)
    assert "\n" not in text
    return text


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------
# The defaults


def shipped_file():
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    parser.read(SHIPPED, encoding="utf-8")
    return parser


def test_the_shipped_config_lists_every_key_and_only_known_keys():
    shipped = shipped_file()
    listed = {(section, key) for section in shipped.sections() for key in shipped[section]}
    known = {(section, key) for section, keys in config.DEFAULTS.items() for key in keys}
    assert listed == known


def test_the_shipped_config_repeats_the_built_in_defaults():
    shipped = shipped_file()
    for section, keys in config.DEFAULTS.items():
        for key, default in keys.items():
            if (section, key) in config.SHIPPED_ONE_LEVEL_UP:
                # conf/ -> the repository's top: ../mail, ../spool, ../logs
                assert shipped[section][key] == "../" + default, f"[{section}] {key}"
            elif (section, key) in config.SHIPPED_ON:
                assert default == "" and shipped[section][key] == \
                    config.SHIPPED_ON[section, key], f"[{section}] {key}"
            else:
                assert shipped[section][key] == default, f"[{section}] {key}"


def test_every_key_in_the_shipped_config_has_a_comment():
    with open(SHIPPED, encoding="utf-8") as shipped:
        lines = [line for line in shipped if "=" in line and not line.startswith(";")]
    assert len(lines) == sum(len(keys) for keys in config.DEFAULTS.values())
    for line in lines:
        assert " ; " in line, line


def test_the_built_in_defaults_are_a_valid_config():
    built = build()
    assert (built.hostname, built.port, built.timeout) == ("mail.test.ru", 25, 300)
    assert (built.data_timeout, built.session_timeout) == (600, 1200)
    assert (built.max_errors, built.max_rejected_recipients) == (10, 20)
    assert built.relay_data_timeout == 600
    assert built.retry == (60, 300, 900, 3600)


def test_the_shipped_config_keeps_the_data_at_the_top_of_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                     # started from somewhere else
    for argv in ([], ["--config", SHIPPED]):
        loaded, _ = config.load(argv)
        assert loaded.config_file == SHIPPED
        assert loaded.users_file == os.path.join(ROOT, "conf", "users")
        assert loaded.maildir == os.path.join(ROOT, "mail")
        assert loaded.spool == os.path.join(ROOT, "spool")
        assert loaded.log_dir == os.path.join(ROOT, "logs")
        assert (loaded.tls_cert, loaded.tls_key) == ("", "")


# ---------------------------------------------------------------------------------------
# Flags over the file


def test_flags_override_the_file(tmp_path, monkeypatch):
    config_file = write(tmp_path / "smtpd.conf", "[domains]\nlocal = file.test\n"
                        "[storage]\nmaildir = /srv/mail\nspool = /srv/spool\n"
                        "[log]\ntrace = no\n")
    monkeypatch.chdir(tmp_path)
    loaded, args = config.load(["::1", "--port", "2525", "--config", config_file,
                                "--domain", "One.test", "--domain", "two.test",
                                "--maildir", "/data/mail", "--spool", "/data/spool", "--trace"])
    assert (loaded.ip, loaded.port) == ("::1", 2525)
    assert loaded.local_domains == ("one.test", "two.test")
    assert (loaded.maildir, loaded.spool) == ("/data/mail", "/data/spool")
    assert loaded.trace is True
    assert not args.queue


def test_without_flags_the_file_decides(tmp_path):
    config_file = write(tmp_path / "smtpd.conf", "[domains]\nlocal = file.test\n"
                        "[storage]\nmaildir = /srv/mail\n[log]\ntrace = yes\n")
    loaded, _ = config.load(["--config", config_file])
    assert (loaded.ip, loaded.port) == ("127.0.0.1", 25)
    assert loaded.local_domains == ("file.test",)
    assert loaded.maildir == "/srv/mail"
    assert loaded.trace is True


# ---------------------------------------------------------------------------------------
# Typed values: good ones and the one line a bad one gives


GOOD = [
    # integer
    ("server.max_clients", "7", "max_clients", 7),
    ("relay.port", "65535", "relay_port", 65535),
    ("server.max_rejected_recipients", "1", "max_rejected_recipients", 1),
    ("relay.max_queue_age", "0", "max_queue_age", 0),
    # number
    ("server.timeout", "2.5", "timeout", 2.5),
    ("server.data_timeout", "30", "data_timeout", 30),
    ("server.session_timeout", "0.5", "session_timeout", 0.5),
    ("relay.data_timeout", "5", "relay_data_timeout", 5),
    ("auth.failure_delay", "0", "auth_failure_delay", 0),
    # boolean
    ("auth.allow_plaintext", "YES", "auth_allow_plaintext", True),
    ("log.trace", "off", "trace", False),
    # choice
    ("relay.tls", "Require", "relay_tls", "require"),
    ("log.level", "debug", "log_level", "DEBUG"),
    # hostname, domains
    ("server.hostname", "Mail.Example.ORG", "hostname", "mail.example.org"),
    ("domains.local", "Test.RU, example.org", "local_domains", ("test.ru", "example.org")),
    # networks
    ("relay.networks", "10.1.2.3/8, ::1", "relay_networks",
     (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))),
    ("relay.networks", "", "relay_networks", ()),
    # host_ports
    ("relay.nameservers", "[::1]:5353, 127.0.0.1:5353, ::1, [::1], ns.test", "nameservers",
     (("::1", 5353), ("127.0.0.1", 5353), ("::1", 53), ("::1", 53), ("ns.test", 53))),
    ("relay.nameservers", "", "nameservers", ()),
    # routes
    ("relay.routes", "Remote.Test=127.0.0.2:2526, v6.test=[::1]:2525, name.test=mx.name.test",
     "routes", {"remote.test": ("127.0.0.2", 2526), "v6.test": ("::1", 2525),
                "name.test": ("mx.name.test", 25)}),
    # retry
    ("relay.retry", "60, 0.5", "retry", (60, 0.5)),
]


@pytest.mark.parametrize("dotted, value, field, expected", GOOD)
def test_a_good_value_is_read(dotted, value, field, expected):
    assert getattr(build(**{dotted: value}), field) == expected


BAD = [
    # integer
    ("server.max_clients", "ten", "[server] max_clients = 'ten': not an integer"),
    ("server.max_recipients", "0", "[server] max_recipients = '0': must be at least 1"),
    ("server.max_rejected_recipients", "0",
     "[server] max_rejected_recipients = '0': must be at least 1"),
    ("relay.port", "65536", "[relay] port = '65536': must be at most 65535"),
    ("tls.submission_port", "", "[tls] submission_port = '': not an integer"),
    # number
    ("server.timeout", "soon", "[server] timeout = 'soon': not a number"),
    ("server.data_timeout", "0", "[server] data_timeout = '0': must be more than 0"),
    ("server.session_timeout", "-5", "[server] session_timeout = '-5': must be more than 0"),
    ("server.session_timeout", "20 min", "[server] session_timeout = '20 min': not a number"),
    ("auth.failure_delay", "-1", "[auth] failure_delay = '-1': must be at least 0"),
    # boolean
    ("auth.allow_plaintext", "maybe", "[auth] allow_plaintext = 'maybe': must be yes or no"),
    # choice
    ("relay.tls", "sometimes", "[relay] tls = 'sometimes': must be one of yes, no, require"),
    ("log.level", "verbose",
     "[log] level = 'verbose': must be one of DEBUG, INFO, WARNING, ERROR"),
    # text and paths
    ("server.user", "", "[server] user = '': must not be empty"),
    ("users.file", "", "[users] file = '': must not be empty"),
    ("storage.maildir", " ", "[storage] maildir = '': must not be empty"),
    # hostname
    ("server.hostname", "mail_server", "[server] hostname = 'mail_server': not a domain name"),
    ("server.hostname", "", "[server] hostname = '': must not be empty"),
    # domains
    ("domains.local", "", "[domains] local = '': name at least one local domain"),
    ("domains.local", "test.ru, -bad.test",
     "[domains] local = 'test.ru, -bad.test': '-bad.test' is not a domain name"),
    # networks
    ("relay.networks", "10.0.0.0/33",
     "[relay] networks = '10.0.0.0/33': '10.0.0.0/33' is not a network like 127.0.0.0/8"),
    # host_ports
    ("relay.nameservers", "127.0.0.1:dns",
     "[relay] nameservers = '127.0.0.1:dns': '127.0.0.1:dns': the port is not a number"),
    ("relay.nameservers", "127.0.0.1:0",
     "[relay] nameservers = '127.0.0.1:0': '127.0.0.1:0' is not host[:port]"),
    ("relay.nameservers", "[::1]:70000",
     "[relay] nameservers = '[::1]:70000': '[::1]:70000' is not host[:port]"),
    ("relay.nameservers", "[::1]5353",
     "[relay] nameservers = '[::1]5353': '[::1]5353' is not host[:port]"),
    ("relay.nameservers", "[::1:5353",
     "[relay] nameservers = '[::1:5353': '[::1:5353' is not host[:port]"),
    ("relay.nameservers", ":53", "[relay] nameservers = ':53': ':53' is not host[:port]"),
    # routes
    ("relay.routes", "remote.test",
     "[relay] routes = 'remote.test': 'remote.test' is not domain=host:port"),
    ("relay.routes", "bad_domain=127.0.0.1:25",
     "[relay] routes = 'bad_domain=127.0.0.1:25': 'bad_domain=127.0.0.1:25' "
     "is not domain=host:port"),
    ("relay.routes", "remote.test=127.0.0.2:smtp",
     "[relay] routes = 'remote.test=127.0.0.2:smtp': '127.0.0.2:smtp': "
     "the port is not a number"),
    # retry
    ("relay.retry", "soon", "[relay] retry = 'soon': not a list of seconds"),
    ("relay.retry", "", "[relay] retry = '': give at least one delay, each more than 0"),
    ("relay.retry", "60, 0", "[relay] retry = '60, 0': give at least one delay, each more than 0"),
]


@pytest.mark.parametrize("dotted, value, expected", BAD)
def test_a_bad_value_stops_with_one_line_naming_the_key(dotted, value, expected):
    assert message(build, **{dotted: value}) == expected


def test_a_bad_value_in_a_file_gives_the_same_line(tmp_path):
    config_file = write(tmp_path / "smtpd.conf", "[server]\ntimeout = soon ; a typo\n")
    assert message(config.load, ["--config", config_file]) == \
        "[server] timeout = 'soon': not a number"


# ---------------------------------------------------------------------------------------
# The file itself, and the flags


def test_an_unknown_section_is_refused(tmp_path):
    config_file = write(tmp_path / "smtpd.conf", "[srever]\nhostname = mail.test.ru\n")
    assert message(config.load, ["--config", config_file]) == \
        f"{config_file}: unknown section [srever]"


def test_an_unknown_key_is_refused(tmp_path):
    config_file = write(tmp_path / "smtpd.conf", "[server]\nhost_name = mail.test.ru\n")
    assert message(config.load, ["--config", config_file]) == \
        f"{config_file}: unknown key [server] host_name"


def test_a_file_that_is_not_ini_gives_one_line(tmp_path):
    config_file = write(tmp_path / "smtpd.conf", "hostname = mail.test.ru\n")
    assert message(config.load, ["--config", config_file]).startswith(
        f"{config_file}: File contains no section headers.")


def test_a_missing_config_file_is_refused(tmp_path):
    missing = str(tmp_path / "nowhere.conf")
    assert message(config.load, ["--config", missing]) == f"--config {missing!r}: no such file"


@pytest.mark.parametrize("argv, expected", [
    (["--port", "70000"], "--port 70000: not a port number (0-65535)"),
    (["--port", "smtp"], "argument --port: invalid int value: 'smtp' (see --help)"),
    (["--port"], "argument --port: expected one argument (see --help)"),
    (["--bogus"], "unrecognized arguments: --bogus (see --help)"),
])
def test_a_bad_flag_is_refused(argv, expected):
    assert message(config.load, argv) == expected


@pytest.mark.parametrize("ip", ["localhost", "127.0.0.256", "::g"])
def test_a_bad_ip_is_refused(ip):
    assert message(config.load, [ip, "--config", SHIPPED]) == \
        f"IP {ip!r}: not an IPv4 or IPv6 address"


@pytest.mark.parametrize("ip", ["0.0.0.0", "::1", "::"])
def test_an_ipv4_or_ipv6_address_is_accepted(ip):
    assert config.load([ip, "--config", SHIPPED])[0].ip == ip


# ---------------------------------------------------------------------------------------
# Relative paths: a file's are relative to its directory, a flag's to the working directory


def test_paths_in_a_file_are_relative_to_its_directory(tmp_path, monkeypatch):
    etc = tmp_path / "etc"
    config_file = write(etc / "smtpd.conf", "[users]\nfile = users\n"
                        "[storage]\nmaildir = ../data/mail\nspool = queue\n"
                        "[log]\ndir = ./logs/\n"
                        "[tls]\ncert = tls/cert.pem\nkey = tls/key.pem\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded, _ = config.load(["--config", config_file])
    assert loaded.users_file == str(etc / "users")
    assert loaded.maildir == str(tmp_path / "data" / "mail")
    assert loaded.spool == str(etc / "queue")
    assert loaded.log_dir == str(etc / "logs")
    assert (loaded.tls_cert, loaded.tls_key) == (str(etc / "tls" / "cert.pem"),
                                                  str(etc / "tls" / "key.pem"))


def test_defaults_the_file_leaves_out_are_relative_to_its_directory(tmp_path, monkeypatch):
    config_file = write(tmp_path / "x" / "smtpd.conf", "[server]\nhostname = mx.test\n")
    monkeypatch.chdir("/")
    loaded, _ = config.load(["--config", config_file])
    assert loaded.users_file == str(tmp_path / "x" / "users")
    assert loaded.maildir == str(tmp_path / "x" / "mail")
    assert loaded.spool == str(tmp_path / "x" / "spool")
    assert loaded.log_dir == str(tmp_path / "x" / "logs")
    assert (loaded.tls_cert, loaded.tls_key) == ("", "")        # empty stays empty


def test_flag_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path / "etc" / "smtpd.conf", "[storage]\nmaildir = m\nspool = s\n")
    monkeypatch.chdir(tmp_path)
    loaded, _ = config.load(["--config", "etc/smtpd.conf", "--maildir", "here/mail",
                             "--spool", "./here/spool"])
    assert loaded.config_file == str(tmp_path / "etc" / "smtpd.conf")
    assert loaded.maildir == str(tmp_path / "here" / "mail")
    assert loaded.spool == str(tmp_path / "here" / "spool")
    assert loaded.users_file == str(tmp_path / "etc" / "users")   # the file's rule still


def test_absolute_paths_are_kept(tmp_path, monkeypatch):
    config_file = write(tmp_path / "etc" / "smtpd.conf",
                        "[users]\nfile = /srv/smtpd/users\n[log]\ndir = /var/log/smtpd\n")
    monkeypatch.chdir(tmp_path)
    loaded, _ = config.load(["--config", config_file, "--maildir", "/srv/mail"])
    assert (loaded.users_file, loaded.log_dir, loaded.maildir) == \
        ("/srv/smtpd/users", "/var/log/smtpd", "/srv/mail")


def test_without_a_config_file_the_defaults_are_relative_to_the_working_directory(
        tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent" / "smtpd.conf"))
    monkeypatch.chdir(tmp_path)
    loaded, _ = config.load([])
    assert loaded.config_file == ""
    assert loaded.users_file == str(tmp_path / "users")
    assert loaded.maildir == str(tmp_path / "mail")
    assert loaded.spool == str(tmp_path / "spool")
    assert loaded.log_dir == str(tmp_path / "logs")


def test_dot_dot_is_taken_from_the_real_directory_of_the_file(tmp_path, monkeypatch):
    real = tmp_path / "real" / "conf"
    write(real / "smtpd.conf", "[storage]\nmaildir = ../mail\n")
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    loaded, _ = config.load(["--config", "link/smtpd.conf"])
    assert loaded.maildir == str(tmp_path / "real" / "mail")     # where `ls link/../mail` looks


def test_from_sections_resolves_against_the_config_file_or_the_working_directory(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sections = config.defaults()
    sections["users"]["file"] = "list"
    in_cwd = config.from_sections(sections, port=0)
    beside = config.from_sections(sections, port=0, config_file=str(tmp_path / "x" / "a.conf"))
    assert in_cwd.users_file == str(tmp_path / "list")
    assert beside.users_file == str(tmp_path / "x" / "list")
    assert beside.config_file == str(tmp_path / "x" / "a.conf")


# ---------------------------------------------------------------------------------------
# The command line as a process: --help, and a bad flag


def run_smtpd(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "smtpd.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def test_help_lists_every_flag():
    result = run_smtpd("--help")
    assert result.returncode == 0, result.stderr
    for action in config.build_parser()._actions:
        names = action.option_strings or [action.metavar or action.dest]
        for name in names:
            assert name in result.stdout, name
        if action.help:
            assert action.help.split()[0] in result.stdout


@pytest.mark.parametrize("argv, expected", [
    (["--bogus"], "smtpd: unrecognized arguments: --bogus (see --help)"),
    (["--port", "smtp"], "smtpd: argument --port: invalid int value: 'smtp' (see --help)"),
    (["--config", "/nonexistent/smtpd.conf"],
     "smtpd: --config '/nonexistent/smtpd.conf': no such file"),
])
def test_a_bad_flag_exits_with_one_line_and_no_traceback(argv, expected):
    result = run_smtpd(*argv)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [expected]
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------
# Keys of the routing and web issues (14, 16)


def test_aliases_suffixes_sender_match_and_the_web_view(tmp_path):
    config_file = write(tmp_path / "smtpd.conf", "[users]\naliases = aliases\n"
                        "suffix_separators = +-\n[auth]\nsender_login_match = no\n"
                        "[web]\nlisten = 127.0.0.1:8025\npassword = s3cret\n")
    loaded, _ = config.load(["--config", config_file])
    assert loaded.aliases_file == str(tmp_path / "aliases")       # beside the config file
    assert loaded.suffix_separators == "+-"
    assert loaded.sender_login_match is False
    assert loaded.web_listen == ("127.0.0.1", 8025) and loaded.web_password == "s3cret"
    off = build()
    assert (off.aliases_file, off.web_listen, off.suffix_separators) == ("", (), "+")


def test_hostname_and_web_flags(tmp_path):
    config_file = write(tmp_path / "smtpd.conf", "[web]\nlisten = 127.0.0.1:8025\n")
    loaded, _ = config.load(["--config", config_file, "--hostname", "Foo.COM",
                             "--web", "[::1]:9025"])
    assert loaded.hostname == "foo.com" and loaded.web_listen == ("::1", 9025)
    assert config.load(["--config", config_file, "--web", ""])[0].web_listen == ()


@pytest.mark.parametrize("dotted, value, problem", [
    ("users.suffix_separators", "+a", "'a' cannot separate a suffix"),
    ("users.suffix_separators", "@", "'@' cannot separate a suffix"),
    ("web.listen", "localhost:8025", "'localhost' is not an IP address"),
    ("web.listen", "127.0.0.1", "'127.0.0.1' is not host[:port]"),
    ("server.hostname", "not a name", "not a domain name"),
])
def test_bad_values_of_the_new_keys(dotted, value, problem):
    section, key = dotted.split(".")
    assert message(build, **{dotted: value}) == f"[{section}] {key} = {value!r}: {problem}"
