"""A loopback test CA made with openssl, and certificates it signs, for the TLS tests.

    ca = TestCA(directory)                                  # CA key and certificate
    ca.cert_file                                            # for [relay] ca_file
    cert, key = ca.leaf("mx1.remote.test", "mta-sts.remote.test")   # signed by the CA
    cert, key = self_signed(directory, "mx1.remote.test")   # valid name, unknown issuer
    context = server_context(cert, key)                     # for FakeMX / PolicyServer

The `pki` fixture (session-scoped; a test module takes it with
`pki_ca = tests.pki.pki_fixture`) makes one CA per test session in a temporary directory. EC P-256 keys: quick to make.
"""
import shutil
import ssl
import subprocess

import pytest

OPENSSL_TIMEOUT = 60
DAYS = "2"
KEY_OPTIONS = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(*arguments):
    subprocess.run(["openssl", *arguments], check=True, capture_output=True,
                   timeout=OPENSSL_TIMEOUT)


def _names_extension(names):
    return "subjectAltName=" + ",".join(f"DNS:{name}" for name in names)


class TestCA:
    __test__ = False                # not a pytest test class

    def __init__(self, directory, name="smtpd test CA"):
        self.directory = directory
        self.cert_file = str(directory / "ca.pem")
        self.key_file = str(directory / "ca.key")
        self._serial = 0
        openssl("req", "-x509", *KEY_OPTIONS, "-days", DAYS, "-subj", f"/CN={name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout", self.key_file, "-out", self.cert_file)

    def leaf(self, *names):
        """(certificate path, key path) for `names` (subjectAltName DNS entries)."""
        self._serial += 1
        stem = self.directory / f"leaf{self._serial}"
        key, request, cert, extensions = (f"{stem}.key", f"{stem}.csr", f"{stem}.pem",
                                          f"{stem}.ext")
        openssl("req", "-new", *KEY_OPTIONS, "-subj", f"/CN={names[0]}", "-keyout", key,
                "-out", request)
        with open(extensions, "w") as extension_file:
            extension_file.write(_names_extension(names) + "\n"
                                 "basicConstraints=CA:FALSE\n"
                                 "extendedKeyUsage=serverAuth\n")
        openssl("x509", "-req", "-in", request, "-CA", self.cert_file, "-CAkey", self.key_file,
                "-set_serial", str(1000 + self._serial), "-days", DAYS, "-extfile", extensions,
                "-out", cert)
        return cert, key


def self_signed(directory, *names):
    """A certificate for `names` that no CA vouches for."""
    cert, key = str(directory / f"self-{names[0]}.pem"), str(directory / f"self-{names[0]}.key")
    openssl("req", "-x509", *KEY_OPTIONS, "-days", DAYS, "-subj", f"/CN={names[0]}",
            "-addext", _names_extension(names), "-keyout", key, "-out", cert)
    return cert, key


def server_context(cert, key):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture(scope="session", name="pki")
def pki_fixture(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    return TestCA(tmp_path_factory.mktemp("pki"))
