"""TLS on the DICOM listener, against DCMTK storescu: the TLS port stores like the plain one,
refuses plain DICOM, and with ``listener.tls_ca_file`` refuses clients without a certificate
from that CA. Certificates are made here (a CA, a server and a client certificate)."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dicom_listener.server import Listener
from pipeline.errors import ConfigError
from pipeline.intake import IntakeLog
from pipeline.settings import Settings
from tests import factory
from tests.conftest import free_port
from tests.daemon import echo, storescu, successes
from tests.test_listener_slots import make_listener, starting


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from another CA
    stranger_key: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _certificate(
    name: str,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        alt = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".crt")
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA; a server certificate for 127.0.0.1 and a client certificate, both from it; and a
    client certificate from another CA."""
    out = tmp_path_factory.mktemp("pki")
    ca_key, other_ca_key = _key(), _key()
    ca = _certificate("pacs-embed test CA", ca_key, None, ca=True)
    other_ca = _certificate("someone else's CA", other_ca_key, None, ca=True)
    ca_path, _ = _write(out / "ca", ca_key, ca)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    server = _write(
        out / "server",
        server_key,
        _certificate(
            "pacs-embed", server_key, (ca.subject, ca_key), usage=ExtendedKeyUsageOID.SERVER_AUTH
        ),
    )
    client = _write(
        out / "client",
        client_key,
        _certificate(
            "STORESCU", client_key, (ca.subject, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
        ),
    )
    stranger = _write(
        out / "stranger",
        stranger_key,
        _certificate(
            "STRANGER",
            stranger_key,
            (other_ca.subject, other_ca_key),
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
    )
    return Pki(ca_path, *server, *client, *stranger)


@pytest.fixture
def start(
    tmp_path: Path, redis_server: str, redis_conn: redis.Redis, pki: Pki
) -> Iterator[Callable[..., Listener]]:
    """Starts a listener with a TLS port (and these [listener] settings); stopped at the end."""

    def make(**listener: object) -> Listener:
        return make_listener(tmp_path, redis_server, **{**_tls_settings(pki), **listener})

    yield from starting(make)


def _tls_settings(pki: Pki, key: Path | None = None) -> dict[str, object]:
    """[listener] settings of a TLS port on a free port, with the server's key unless ``key``."""
    return {
        "tls_port": free_port(),
        "tls_cert_file": str(pki.server_cert),
        "tls_key_file": str(key or pki.server_key),
    }


@pytest.fixture
def ct_file(tmp_path: Path) -> tuple[Path, str]:
    ds = factory.ct_slice(study_uid="1.2.9", series_uid="1.2.9.1", instance_number=1, rows=8)
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def _tls(key: Path, cert: Path, ca: Path) -> tuple[str, ...]:
    return ("+tls", str(key), str(cert), "-pw", "+cf", str(ca))


def _handshake_failures(connection: redis.Redis, events: int = 1) -> dict[str, int]:
    """Failed handshakes in /status input, once ``events`` are (at most 5 s): the listener
    records one in its own thread, after the client saw the handshake fail."""
    deadline = time.monotonic() + 5.0
    while True:
        rejected = IntakeLog(connection).summary()["associations_rejected"]
        failed = {reason: n for reason, n in rejected.items() if reason.startswith("TLS")}
        if sum(failed.values()) >= events or time.monotonic() > deadline:
            return failed
        time.sleep(0.05)


def test_storescu_with_a_client_certificate_is_stored(
    start: Callable[..., Listener], pki: Pki, ct_file: tuple[Path, str]
) -> None:
    """storescu +tls with a certificate from tls_ca_file: acknowledged, and durable in the spool;
    the plain port keeps working beside the TLS one."""
    scp = start(tls_ca_file=str(pki.ca))
    path, sop_uid = ct_file
    lsn = scp.settings.listener
    assert lsn.tls_port is not None
    result = storescu(lsn.tls_port, [path], *_tls(pki.client_key, pki.client_cert, pki.ca))
    assert successes(result) == 1, result.stdout + result.stderr
    assert scp.spool.contains(sop_uid)
    assert echo(lsn.port) == 0


def test_plain_dicom_to_the_tls_port_is_refused(
    start: Callable[..., Listener], ct_file: tuple[Path, str], redis_conn: redis.Redis
) -> None:
    """An association without TLS to the TLS port fails, nothing is stored, and the failed
    handshake is shown in /status input."""
    scp = start()
    path, sop_uid = ct_file
    assert scp.settings.listener.tls_port is not None
    result = storescu(scp.settings.listener.tls_port, [path])
    assert result.returncode != 0 and successes(result) == 0, result.stdout + result.stderr
    assert not scp.spool.contains(sop_uid)
    failures = _handshake_failures(redis_conn)
    assert sum(failures.values()) == 1, failures


@pytest.mark.parametrize("client", ["none", "other CA"])
def test_client_verification_refuses_unknown_clients(
    start: Callable[..., Listener],
    pki: Pki,
    ct_file: tuple[Path, str],
    redis_conn: redis.Redis,
    client: str,
) -> None:
    """With tls_ca_file, a client without a certificate (storescu +tla) or with one from another
    CA is refused during the handshake, and it shows in /status input with OpenSSL's reason."""
    scp = start(tls_ca_file=str(pki.ca))
    path, sop_uid = ct_file
    port = scp.settings.listener.tls_port
    assert port is not None
    if client == "none":
        extra: tuple[str, ...] = ("+tla", "+cf", str(pki.ca))
    else:
        extra = _tls(pki.stranger_key, pki.stranger_cert, pki.ca)
    result = storescu(port, [path], *extra)
    assert successes(result) == 0, result.stdout + result.stderr
    assert not scp.spool.contains(sop_uid)
    failures = _handshake_failures(redis_conn)
    assert sum(failures.values()) == 1, failures
    [reason] = failures
    expected = "CERTIFICATE" if client == "none" else "CERTIFICATE_VERIFY_FAILED"
    assert expected in reason, reason


def test_without_a_ca_file_clients_need_no_certificate(
    start: Callable[..., Listener], pki: Pki, ct_file: tuple[Path, str]
) -> None:
    """Without tls_ca_file the channel is encrypted and the server authenticated, and a client
    without a certificate is served."""
    scp = start()
    path, sop_uid = ct_file
    assert scp.settings.listener.tls_port is not None
    result = storescu(scp.settings.listener.tls_port, [path], "+tla", "+cf", str(pki.ca))
    assert successes(result) == 1, result.stdout + result.stderr
    assert scp.spool.contains(sop_uid)


def test_a_silent_client_does_not_stall_the_tls_port(
    start: Callable[..., Listener], pki: Pki, ct_file: tuple[Path, str], redis_conn: redis.Redis
) -> None:
    """A connection that never starts its TLS handshake holds up no one (pynetdicom does the
    handshake in its accept loop, where it would stall every later client) and is closed after
    association_request_timeout_seconds, counted."""
    scp = start(association_request_timeout_seconds=2.0)
    path, _ = ct_file
    port = scp.settings.listener.tls_port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port)) as silent:
        began = time.monotonic()
        timeouts = ("-to", "10", "-ta", "10")
        result = storescu(port, [path], "+tla", "+cf", str(pki.ca), *timeouts)
        assert successes(result) == 1, result.stdout + result.stderr
        assert time.monotonic() - began < 2.0  # served before the silent one was closed
        silent.settimeout(4.0)
        assert silent.recv(1) == b""  # closed by the listener
        assert time.monotonic() - began < 4.0
    assert _handshake_failures(redis_conn) == {"TLS handshake not completed within 2 s": 1}


def test_tls_settings_are_checked(tmp_path: Path, redis_server: str, pki: Pki) -> None:
    """tls_port needs a certificate and a key; a file that cannot be loaded stops the start with
    a ConfigError naming its setting, before anything listens."""
    with pytest.raises(ConfigError, match=r"listener: .*tls_cert_file and tls_key_file"):
        Settings.load(listener={"tls_port": free_port()})
    with pytest.raises(ConfigError, match=r"listener: .*tls_port must differ from port"):
        Settings.load(
            listener={"port": 2000, "tls_port": 2000, "tls_cert_file": "c", "tls_key_file": "k"}
        )
    with pytest.raises(ConfigError, match=r"listener\.tls_cert_file"):
        # not the certificate's key
        make_listener(tmp_path, redis_server, **_tls_settings(pki, pki.client_key)).start()
