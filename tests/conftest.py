"""Shared fixtures: a server started in-process on port 0 with temporary directories."""
import os
import shutil
import smtplib
import subprocess

import pytest

import config as configuration
import smtpd
from tests.wire import Client


def make_config(tmp_path, users=("alice", "bob"), **overrides):
    """A Config for a test: temporary maildir/spool/logs, port 0, short timeouts.
    `overrides` are "section.key" = value pairs, e.g. **{"server.timeout": "2"}."""
    ip = overrides.pop("ip", "127.0.0.1")
    sections = config_sections(tmp_path, users, **overrides)
    return configuration.from_sections(sections, ip=ip, port=0)


def config_sections(tmp_path, users=("alice", "bob"), **overrides):
    """The {section: {key: value}} behind make_config (write_config_file saves it)."""
    users_file = tmp_path / "users"
    if not users_file.exists():
        users_file.write_text("".join(f"{user}\n" for user in users))
    sections = {name: dict(keys) for name, keys in configuration.DEFAULTS.items()}
    sections["users"]["file"] = str(users_file)
    sections["storage"]["maildir"] = str(tmp_path / "mail")
    sections["storage"]["spool"] = str(tmp_path / "spool")
    sections["log"]["dir"] = str(tmp_path / "logs")
    sections["server"]["timeout"] = "5"
    # In-process servers and tools run inside pytest, which must stay root: the privilege
    # drop is proved by the daemon tier (tests/daemon.py), on a real process.
    sections["server"]["user"] = "root"
    sections["server"]["data_timeout"] = "10"
    sections["server"]["session_timeout"] = "60"
    # No test reaches the system resolver: unless a test starts its own, DNS is a dead
    # loopback port (refused at once), so spooled mail just waits in the spool.
    sections["relay"]["nameservers"] = "127.0.0.1:9"
    sections["relay"]["retry"] = "1"
    sections["relay"]["connect_timeout"] = "2"
    sections["checks"]["dns_timeout"] = "0.5"
    sections["relay"]["command_timeout"] = "5"
    sections["relay"]["data_timeout"] = "5"
    sections["auth"]["failure_delay"] = "0"
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        sections[section][key] = str(value)
    return sections


def write_config_file(path, sections):
    """Save sections as an INI file for a server started as a process."""
    with open(path, "w") as config_file:
        for section, keys in sections.items():
            config_file.write(f"[{section}]\n")
            config_file.writelines(f"{key} = {value}\n" for key, value in keys.items())
    return str(path)


@pytest.fixture
def config(tmp_path):
    return make_config(tmp_path)


@pytest.fixture
def start_server():
    """start_server(config) -> a running server; every one is stopped after the test."""
    servers = []

    def start(config):
        server = smtpd.start(config, console=False)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=2)


@pytest.fixture
def server(config, start_server):
    return start_server(config)


@pytest.fixture
def client(server):
    """A raw line-level client: bytes on the wire, replies parsed."""
    with Client(server.address) as wire_client:
        yield wire_client


@pytest.fixture
def smtp(server):
    """Python's smtplib as a real client, greeted with EHLO."""
    connection = smtplib.SMTP(*server.address, timeout=10)
    connection.ehlo("client.example")
    yield connection
    try:
        connection.quit()
    except (smtplib.SMTPException, OSError):
        connection.close()


def maildir_messages(maildir_root, address):
    """The messages in `new/` of a local mailbox, as bytes, oldest name first."""
    local_part, domain = address.split("@")
    folder = os.path.join(maildir_root, domain, local_part, "new")
    if not os.path.isdir(folder):
        return []
    messages = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as message_file:
            messages.append(message_file.read())
    return messages


def stored_files(root):
    """Every regular file under `root` (for 'nothing was stored' checks)."""
    found = []
    for directory, _, names in os.walk(root):
        found += [os.path.join(directory, name) for name in names]
    return found


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    """A self-signed pair made with openssl, as the README shows."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mail.test.ru", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)
