"""What the demo shows being refused: a plaintext client on the protected port, and a TLS
client whose certificate comes from another CA (while claiming an allowed SPIFFE ID)."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import tempfile
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def plaintext_client(port: int) -> str:
    """Speak plain HTTP to an inbound (mTLS) listener; say what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:
            return "connection reset, no answer"
    if answer.startswith(b"HTTP/"):
        return "ANSWERED: " + answer.split(b"\r\n", 1)[0].decode()
    return "closed without an answer" if not answer else f"a TLS alert ({len(answer)} bytes)"


def _foreign_identity(directory: Path, spiffe_id: str) -> tuple[Path, Path]:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "some other CA")])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "foreign.pem", directory / "foreign_key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def foreign_ca_client(port: int, spiffe_id: str) -> str:
    """Connect with a certificate for `spiffe_id` that another CA signed."""
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = _foreign_identity(Path(tmp), spiffe_id)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # this probe only wants to see the server's verdict
        context.load_cert_chain(cert, key)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            try:
                with context.wrap_socket(raw) as tls:
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
                    answer = tls.recv(4096)
            except (ssl.SSLError, ConnectionError) as exc:
                return f"refused by the sidecar: {getattr(exc, 'reason', None) or exc}"
    if answer.startswith(b"HTTP/"):
        return "ANSWERED: " + answer.split(b"\r\n", 1)[0].decode()
    return "closed without an answer"


def refusals(status_port: int) -> dict[str, float]:
    """The sidecar's refused-connection counters by reason (from its /metrics)."""
    url = f"http://127.0.0.1:{status_port}/metrics"
    with urllib.request.urlopen(url, timeout=2) as answer:
        text = answer.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("meshtls_proxy_refused_total{"):
            labels, value = line.rsplit(" ", 1)
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            found[reason] = found.get(reason, 0) + float(value)
    return found
