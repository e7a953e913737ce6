"""Test certificates, made at run time (no key or certificate is committed).

``make_pki(directory)`` writes a CA, a server certificate for localhost/127.0.0.1,
client certificates (with DNS SANs, with a CN only, and one issued by an intermediate
CA, its file holding the leaf and then the intermediate), and an unrelated CA with a
client certificate of its own, as PEM files; it returns their paths.
"""

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_ONE_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: str
    key: str


@dataclass(frozen=True)
class Pki:
    ca: str  # the CA certificate (PEM) that signed server, client, cn_only
    server: Issued  # DNS:localhost, IP:127.0.0.1
    client: Issued  # DNS:sensor-1, DNS:sensor-2
    cn_only: Issued  # CN=cn-client, no SAN
    chained_client: Issued  # DNS:sensor-3, signed by an intermediate of ca; file: leaf + intermediate
    other_ca: str  # an unrelated CA
    other_client: Issued  # DNS:sensor-1, signed by other_ca
    node: Issued  # DNS:localhost, IP:127.0.0.1, for server and client auth (cluster mTLS)


class _Authority:
    """A CA: a root, or an intermediate when ``parent`` (another _Authority) signs it."""

    def __init__(self, name, parent=None):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        signer = parent if parent is not None else self
        builder = _builder(self.name, signer.name, self.key.public_key())
        if parent is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
                critical=False,
            )
        self.cert = (
            builder
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(signer.key, hashes.SHA256())
        )

    def issue(self, common_name, dns=(), ips=(), server=False, client=None):
        """``server``: for server auth; ``client`` (default: not ``server``): client auth."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        client = not server if client is None else client
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        builder = (
            _builder(subject, self.name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return key, builder.sign(self.key, hashes.SHA256())


def _builder(subject, issuer, public_key):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _ONE_DAY)
        .not_valid_after(now + _ONE_DAY)
    )


def _write_cert(path, cert):
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _write_issued(directory, name, issued):
    key, cert = issued
    key_path = directory / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Issued(cert=_write_cert(directory / f"{name}.crt", cert), key=str(key_path))


def make_pki(directory):
    """Write a fresh set of test certificates into ``directory``; their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = _Authority("grpcmux test CA")
    intermediate = _Authority("grpcmux test intermediate CA", parent=ca)
    other = _Authority("unrelated CA")
    chained = _write_issued(directory, "chained-client", intermediate.issue("sensor", ["sensor-3"]))
    with open(chained.cert, "ab") as chain:
        chain.write(intermediate.cert.public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca=_write_cert(directory / "ca.crt", ca.cert),
        server=_write_issued(
            directory, "server", ca.issue("localhost", ["localhost"], ["127.0.0.1"], server=True)
        ),
        client=_write_issued(directory, "client", ca.issue("sensor", ["sensor-1", "sensor-2"])),
        cn_only=_write_issued(directory, "cn-only", ca.issue("cn-client")),
        chained_client=chained,
        other_ca=_write_cert(directory / "other-ca.crt", other.cert),
        other_client=_write_issued(directory, "other-client", other.issue("sensor", ["sensor-1"])),
        node=_write_issued(directory, "node", ca.issue(
            "node", ["localhost"], ["127.0.0.1"], server=True, client=True)),
    )
