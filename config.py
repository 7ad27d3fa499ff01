"""The outside of the server: command-line flags and conf/smtpd.conf, checked once at start-up.

Everything the rest of the code needs from the user arrives here as one frozen `Config`.
A bad value stops the server with one line naming the key (`ConfigError`), never a traceback.

Paths (as chasquid and nginx do): a relative path in a config file, or a built-in default the
file does not set, is relative to that file's directory; a relative path given as a flag
(`--config`, `--maildir`, `--spool`) is relative to the working directory, and so are the
defaults when there is no config file at all. The Config holds absolute paths only.
"""
import argparse
import configparser
import ipaddress
import os
from dataclasses import dataclass

from address import AddressError, domain_name

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG_FILE = os.path.join(HERE, "conf", "smtpd.conf")

# The built-in defaults. Every key the server knows is listed here; a key in the file that is
# not here is an error (a typo should not pass silently). The shipped conf/smtpd.conf repeats
# each of them, except that it puts the data directories one level above conf/, at the top of
# the repository.
DEFAULTS = {
    "server": {
        "hostname": "mail.test.ru",
        "max_clients": "1000",
        "max_clients_per_ip": "50",
        "timeout": "300",
        "data_timeout": "600",
        "session_timeout": "1200",
        "max_message_size": "10485760",
        "max_recipients": "100",
        "max_errors": "10",
        "max_rejected_recipients": "20",
        "user": "nobody",
        "processes": "1",
    },
    "domains": {"local": "test.ru"},
    "users": {"file": "users", "aliases": "", "suffix_separators": "+"},
    "storage": {"maildir": "mail", "spool": "spool"},
    "relay": {
        "networks": "127.0.0.0/8, ::1/128",
        "nameservers": "",
        "routes": "",
        "port": "25",
        "retry": "60, 300, 900, 3600",
        "max_queue_age": "432000",
        "workers": "8",
        "connect_timeout": "30",
        "command_timeout": "300",
        "data_timeout": "600",
        "tls": "yes",
        "chunking": "yes",
        "ca_file": "",
        "mta_sts": "yes",
        "delay_warning": "14400",
    },
    "tls": {"cert": "", "key": "", "submission_port": "0", "submissions_port": "0"},
    "auth": {"allow_plaintext": "no", "failure_delay": "1", "max_failures": "3",
             "sender_login_match": "yes"},
    "log": {"dir": "logs", "level": "INFO", "trace": "no"},
    "web": {"listen": "", "password": ""},
    "dkim": {"keys": "", "selector": "s1"},
    "checks": {"spf": "tag", "dkim": "tag", "dmarc": "tag", "dns_timeout": "5"},
}

# The path keys whose value in the shipped conf/smtpd.conf is "../" + the built-in default.
SHIPPED_ONE_LEVEL_UP = (("storage", "maildir"), ("storage", "spool"), ("log", "dir"))
# Where the shipped file turns on what the built-in defaults leave off
SHIPPED_ON = {("users", "aliases"): "aliases",              # conf/aliases, all commented out
              ("web", "listen"): "127.0.0.1:8025"}          # the live view, loopback only


# [checks]: what a failed check does (issue 15)
CHECK_MODES = ("off", "tag", "enforce")


class ConfigError(Exception):
    """A bad flag or config value; the message is the one line the user sees."""


@dataclass(frozen=True)
class Config:
    ip: str
    port: int
    hostname: str
    max_clients: int
    max_clients_per_ip: int
    timeout: float              # idle seconds, per line
    data_timeout: float         # seconds for the whole message text after 354
    session_timeout: float      # seconds for the whole session
    max_message_size: int
    max_recipients: int
    max_errors: int             # bad commands (syntax, sequence, unknown verbs) before 421
    max_rejected_recipients: int    # RCPTs refused with 550/554 before 421
    user: str
    processes: int              # accepting processes (processes.py); 1: this process only
    local_domains: tuple
    users_file: str
    aliases_file: str           # "" for none
    suffix_separators: str      # characters after which a local part's suffix is ignored
    maildir: str
    spool: str
    relay_networks: tuple
    nameservers: tuple          # ((host, port), ...); empty: the system resolver
    routes: dict                # domain -> (host, port)
    relay_port: int             # the port of a remote MX (25; tests use their own)
    retry: tuple                # seconds between attempts; the last one repeats
    max_queue_age: int
    relay_workers: int
    connect_timeout: float
    command_timeout: float
    relay_data_timeout: float   # [relay] data_timeout: waiting for the reply to the final dot
    relay_tls: str              # yes (opportunistic), no, require
    relay_chunking: bool        # BDAT to a next hop that offers CHUNKING (RFC 3030)
    relay_ca_file: str          # CA certificates for MTA-STS checks; "": the system's
    mta_sts: bool               # honour MTA-STS policies (RFC 8461)
    delay_warning: float        # seconds in the queue before a "delayed" DSN; 0: never
    tls_cert: str
    tls_key: str
    submission_port: int        # 0: no submission listener (RFC 6409)
    submissions_port: int       # 0: no implicit-TLS submission listener (RFC 8314)
    auth_allow_plaintext: bool
    auth_failure_delay: float
    auth_max_failures: int
    sender_login_match: bool    # an authenticated client sends only as itself or its aliases
    log_dir: str
    log_level: str
    trace: bool
    web_listen: tuple           # (host, port) of the live web view, or () when it is off
    web_password: str           # HTTP basic auth; "" allows loopback clients only
    dkim_keys: dict             # local domain -> (selector, path of its PEM private key)
    dkim_selector: str          # the selector of a key given without one, and of --dkim-keygen
    check_spf: str              # off, tag (headers only) or enforce (RFC 7208)
    check_dkim: str             # off, tag or enforce (RFC 6376)
    check_dmarc: str            # off, tag or enforce (RFC 7489)
    check_dns_timeout: float    # seconds for one DNS lookup of the checks (the client waits)
    config_file: str            # the file read (absolute), or "" when there was none


def build_parser():
    parser = _OneLineParser(
        prog="smtpd.py",
        description="A small, readable SMTP server (RFC 5321): local Maildir delivery and relay.",
    )
    parser.add_argument("ip", nargs="?", default="127.0.0.1", metavar="IP",
                        help="address to listen on (default 127.0.0.1; ::1 for IPv6)")
    parser.add_argument("--port", type=int, metavar="N", help="port to listen on (default 25)")
    parser.add_argument("--config", metavar="FILE",
                        help="config file (default conf/smtpd.conf next to smtpd.py); relative "
                             "paths in it are relative to its directory")
    parser.add_argument("--domain", action="append", metavar="D",
                        help="a local domain; repeat for several (replaces [domains] local)")
    parser.add_argument("--maildir", metavar="DIR",
                        help="root of the Maildir tree (replaces [storage] maildir; "
                             "relative to the working directory)")
    parser.add_argument("--spool", metavar="DIR",
                        help="directory of the relay queue (replaces [storage] spool; "
                             "relative to the working directory)")
    parser.add_argument("--hostname", metavar="NAME",
                        help="this server's name in the greeting and Received: lines "
                             "(replaces [server] hostname)")
    parser.add_argument("--web", metavar="ADDR:PORT",
                        help="serve the live web view there (replaces [web] listen; "
                             "'' turns it off)")
    parser.add_argument("--trace", action="store_true",
                        help="show state changes and the RFC section behind each reply")
    parser.add_argument("--queue", action="store_true",
                        help="list the relay queue (like Postfix's mailq) and exit")
    parser.add_argument("--flush", action="store_true",
                        help="make every queued message due now (like postqueue -f) and exit")
    parser.add_argument("--add-user", metavar="USER@DOMAIN",
                        help="add a mailbox, prompting for its password, and exit")
    parser.add_argument("--dkim-keygen", metavar="DOMAIN",
                        help="make a DKIM key for DOMAIN, print the DNS record to publish, "
                             "and exit")
    parser.add_argument("--selector", metavar="S",
                        help="the DKIM selector for --dkim-keygen (default [dkim] selector)")
    parser.add_argument("--tls-domains", action="store_true",
                        help="list the domains known to take mail over valid TLS, and exit")
    parser.add_argument("--fsm", nargs="?", const="mermaid", choices=("mermaid", "dot"),
                        help="print the state machine (Mermaid, or Graphviz with 'dot') and exit")
    return parser


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"{message} (see --help)")


def load(argv):
    """Parse the command line and the config file into (Config, the parsed flags)."""
    args = build_parser().parse_args(argv)
    if args.port is not None and not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: not a port number (0-65535)")
    if args.selector is not None and not args.dkim_keygen:
        raise ConfigError("--selector: only with --dkim-keygen (see --help)")
    if args.config is not None:
        if not args.config or not os.path.exists(args.config):
            raise ConfigError(f"--config {args.config!r}: no such file")
        config_file = os.path.abspath(args.config)
    elif os.path.exists(DEFAULT_CONFIG_FILE):
        config_file = DEFAULT_CONFIG_FILE
    else:
        config_file = ""                        # built-in defaults, relative to the cwd
    sections = read_file(config_file) if config_file else defaults()
    if args.domain:
        sections["domains"]["local"] = ",".join(args.domain)
    if args.maildir:
        sections["storage"]["maildir"] = os.path.abspath(args.maildir)
    if args.spool:
        sections["storage"]["spool"] = os.path.abspath(args.spool)
    if args.trace:
        sections["log"]["trace"] = "yes"
    if args.hostname is not None:
        sections["server"]["hostname"] = args.hostname
    if args.web is not None:
        sections["web"]["listen"] = args.web
    config = from_sections(sections, ip=args.ip, port=args.port, config_file=config_file)
    return config, args


def defaults():
    """A fresh copy of DEFAULTS, {section: {key: value}}."""
    return {name: dict(keys) for name, keys in DEFAULTS.items()}


def read_file(path):
    """Read an INI file over the defaults; return {section: {key: value}} (paths as written)."""
    sections = defaults()
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    try:
        with open(path, encoding="utf-8") as config_text:
            parser.read_file(config_text)
    except (OSError, UnicodeDecodeError, configparser.Error) as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"{path}: {first_line}") from None
    for section in parser.sections():
        if section not in sections:
            raise ConfigError(f"{path}: unknown section [{section}]")
        for key, value in parser.items(section):
            if key not in sections[section]:
                raise ConfigError(f"{path}: unknown key [{section}] {key}")
            sections[section][key] = value.strip()
    return sections


def from_sections(sections, ip="127.0.0.1", port=None, config_file=""):
    """Check every value and build the Config. Used by load() and by tests. A relative path
    in `sections` is taken relative to the directory of `config_file`, or to the working
    directory when `config_file` is empty."""
    if config_file:
        config_file = os.path.abspath(config_file)
        # The directory as the kernel sees it, so that "../mail" means what `ls ../mail` there
        # means even when the directory is reached through a symlink.
        base = os.path.realpath(os.path.dirname(config_file))
    else:
        base = os.getcwd()
    value = _Reader(sections, base)
    _check_ip(ip)
    return Config(
        ip=ip,
        port=port if port is not None else 25,
        hostname=value.hostname("server", "hostname"),
        max_clients=value.integer("server", "max_clients", minimum=1),
        max_clients_per_ip=value.integer("server", "max_clients_per_ip", minimum=1),
        timeout=value.number("server", "timeout"),
        data_timeout=value.number("server", "data_timeout"),
        session_timeout=value.number("server", "session_timeout"),
        max_message_size=value.integer("server", "max_message_size", minimum=1),
        max_recipients=value.integer("server", "max_recipients", minimum=1),
        max_errors=value.integer("server", "max_errors", minimum=1),
        max_rejected_recipients=value.integer("server", "max_rejected_recipients", minimum=1),
        user=value.text("server", "user"),
        processes=value.processes("server", "processes"),
        local_domains=value.domains("domains", "local"),
        users_file=value.path("users", "file"),
        aliases_file=value.path("users", "aliases", required=False),
        suffix_separators=value.separators("users", "suffix_separators"),
        maildir=value.path("storage", "maildir"),
        spool=value.path("storage", "spool"),
        relay_networks=value.networks("relay", "networks"),
        nameservers=value.host_ports("relay", "nameservers", default_port=53),
        routes=value.routes("relay", "routes"),
        relay_port=value.integer("relay", "port", minimum=1, maximum=65535),
        retry=value.retry("relay", "retry"),
        max_queue_age=value.integer("relay", "max_queue_age", minimum=0),
        relay_workers=value.integer("relay", "workers", minimum=1),
        connect_timeout=value.number("relay", "connect_timeout"),
        command_timeout=value.number("relay", "command_timeout"),
        relay_data_timeout=value.number("relay", "data_timeout"),
        relay_tls=value.choice("relay", "tls", ("yes", "no", "require")),
        relay_chunking=value.boolean("relay", "chunking"),
        relay_ca_file=value.path("relay", "ca_file", required=False),
        mta_sts=value.boolean("relay", "mta_sts"),
        delay_warning=value.number("relay", "delay_warning", minimum=0),
        tls_cert=value.path("tls", "cert", required=False),
        tls_key=value.path("tls", "key", required=False),
        submission_port=value.integer("tls", "submission_port", minimum=0, maximum=65535),
        submissions_port=value.integer("tls", "submissions_port", minimum=0, maximum=65535),
        auth_allow_plaintext=value.boolean("auth", "allow_plaintext"),
        auth_failure_delay=value.number("auth", "failure_delay", minimum=0),
        auth_max_failures=value.integer("auth", "max_failures", minimum=1),
        sender_login_match=value.boolean("auth", "sender_login_match"),
        log_dir=value.path("log", "dir"),
        log_level=value.choice("log", "level", ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True),
        trace=value.boolean("log", "trace"),
        web_listen=value.listen("web", "listen"),
        web_password=value.text("web", "password", required=False),
        dkim_keys=value.dkim_keys("dkim", "keys", "selector"),
        dkim_selector=value.text("dkim", "selector"),
        check_spf=value.choice("checks", "spf", CHECK_MODES),
        check_dkim=value.choice("checks", "dkim", CHECK_MODES),
        check_dmarc=value.choice("checks", "dmarc", CHECK_MODES),
        check_dns_timeout=value.number("checks", "dns_timeout", minimum=0.1),
        config_file=config_file,
    )


def _check_ip(ip):
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise ConfigError(f"IP {ip!r}: not an IPv4 or IPv6 address") from None


class _Reader:
    """Typed access to the raw strings, each failure naming its [section] key."""

    def __init__(self, sections, base):
        self.sections = sections
        self.base = base                # what a relative path is relative to

    def raw(self, section, key):
        return self.sections[section][key].strip()

    def fail(self, section, key, problem):
        raise ConfigError(f"[{section}] {key} = {self.raw(section, key)!r}: {problem}")

    def text(self, section, key, required=True):
        text = self.raw(section, key)
        if required and not text:
            self.fail(section, key, "must not be empty")
        return text

    def path(self, section, key, required=True):
        """An absolute path: a relative one is joined to the base directory ("" stays "")."""
        path = self.text(section, key, required)
        if not path or os.path.isabs(path):
            return path
        return os.path.normpath(os.path.join(self.base, path))

    def integer(self, section, key, minimum=None, maximum=None):
        try:
            number = int(self.raw(section, key))
        except ValueError:
            self.fail(section, key, "not an integer")
        if minimum is not None and number < minimum:
            self.fail(section, key, f"must be at least {minimum}")
        if maximum is not None and number > maximum:
            self.fail(section, key, f"must be at most {maximum}")
        return number

    def processes(self, section, key):
        """A number of processes, or `auto`: one per core."""
        word = self.raw(section, key).strip().lower()
        if word == "auto":
            return len(os.sched_getaffinity(0))         # the cores this process may use
        if not word.isdigit():
            self.fail(section, key, "not a number of processes (1 to 256) or auto")
        return self.integer(section, key, minimum=1, maximum=256)

    def number(self, section, key, minimum=None):
        try:
            number = float(self.raw(section, key))
        except ValueError:
            self.fail(section, key, "not a number")
        if minimum is None and number <= 0:
            self.fail(section, key, "must be more than 0")
        if minimum is not None and number < minimum:
            self.fail(section, key, f"must be at least {minimum}")
        return number

    def boolean(self, section, key):
        word = self.raw(section, key).lower()
        if word in ("yes", "true", "on", "1"):
            return True
        if word in ("no", "false", "off", "0"):
            return False
        self.fail(section, key, "must be yes or no")

    def choice(self, section, key, choices, upper=False):
        word = self.raw(section, key)
        word = word.upper() if upper else word.lower()
        if word not in choices:
            self.fail(section, key, "must be one of " + ", ".join(choices))
        return word

    def items(self, section, key):
        return [item.strip() for item in self.raw(section, key).split(",") if item.strip()]

    def hostname(self, section, key):
        name = self.text(section, key)
        if not _is_domain(name):
            self.fail(section, key, "not a domain name")
        return name.lower()

    def domains(self, section, key):
        """Domain names, U-labels or A-labels alike, kept as A-labels (address.domain_name)."""
        names = self.items(section, key)
        if not names:
            self.fail(section, key, "name at least one local domain")
        kept = []
        for name in names:
            try:
                kept.append(domain_name(name))
            except AddressError:
                self.fail(section, key, f"{name!r} is not a domain name")
        return tuple(dict.fromkeys(kept))

    def networks(self, section, key):
        networks = []
        for item in self.items(section, key):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.fail(section, key, f"{item!r} is not a network like 127.0.0.0/8")
        return tuple(networks)

    def host_ports(self, section, key, default_port):
        return tuple(self._host_port(section, key, item, default_port)
                     for item in self.items(section, key))

    def _host_port(self, section, key, item, default_port):
        host, port = item, default_port
        if item.startswith("["):                        # [::1]:5353, or [::1]
            host, bracket, rest = item[1:].partition("]")
            if not bracket or rest and not rest.startswith(":"):
                self.fail(section, key, f"{item!r} is not host[:port]")
            if rest:
                port = rest[1:]
        elif item.count(":") == 1:                      # 127.0.0.1:5353, not a bare IPv6
            host, port = item.split(":")
        try:
            port = int(port)
        except ValueError:
            self.fail(section, key, f"{item!r}: the port is not a number")
        if not host or not 0 < port < 65536:
            self.fail(section, key, f"{item!r} is not host[:port]")
        return host, port

    def dkim_keys(self, section, key, selector_key):
        """`test.ru=conf/dkim/test.ru.pem, ...` (a `selector:` before the path overrides
        [dkim] selector) -> {domain: (selector, absolute path)}."""
        default_selector = self.text(section, selector_key)
        keys = {}
        for item in self.items(section, key):
            domain, equals, path = item.partition("=")
            selector, colon, path = path.strip().rpartition(":") if ":" in path else \
                ("", "", path.strip())
            try:
                domain = domain_name(domain.strip())
            except AddressError:
                equals = ""
            if not equals or not path:
                self.fail(section, key, f"{item!r} is not domain=[selector:]path")
            path = path if os.path.isabs(path) else os.path.normpath(os.path.join(self.base,
                                                                                  path))
            keys[domain] = (selector or default_selector, path)
        return keys

    def separators(self, section, key):
        """Characters that start a local part's suffix (alice+lists): no letter or digit,
        no @, quote or space."""
        text = self.raw(section, key)
        for char in text:
            if char.isalnum() or char in "@\"\\ ,.":
                self.fail(section, key, f"{char!r} cannot separate a suffix")
        return text

    def listen(self, section, key):
        """host:port, or () when empty (the feature is off)."""
        if not self.raw(section, key):
            return ()
        host, port = self._host_port(section, key, self.raw(section, key), 0)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            self.fail(section, key, f"{host!r} is not an IP address")
        return host, port

    def routes(self, section, key):
        routes = {}
        for item in self.items(section, key):
            domain, equals, next_hop = item.partition("=")
            try:
                domain = domain_name(domain.strip())
            except AddressError:
                equals = ""
            if not equals:
                self.fail(section, key, f"{item!r} is not domain=host:port")
            routes[domain] = self._host_port(section, key, next_hop.strip(), 25)
        return routes

    def retry(self, section, key):
        try:
            delays = tuple(float(item) for item in self.items(section, key))
        except ValueError:
            self.fail(section, key, "not a list of seconds")
        if not delays or min(delays) <= 0:
            self.fail(section, key, "give at least one delay, each more than 0")
        return delays


def _is_domain(name):
    labels = name.rstrip(".").split(".")
    if not name or len(name) > 255:
        return False
    return all(label and len(label) <= 63 and label[0] != "-" and label[-1] != "-"
               and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
               for label in labels)
