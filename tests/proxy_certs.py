"""Test certificates made at run time: a CA, and certificates it issues, as PEM files.

    ca = make_ca(tmp_path)
    server = issue(ca, "server", dns_names=["localhost"], ip=["127.0.0.1"])
    server.cert_path, server.key_path, ca.cert_path   # files in tmp_path

EC P-256 keys (quick to make); valid from a day ago for a day.
"""

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class CA:
    name: str
    directory: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path


@dataclass
class Issued:
    certificate: x509.Certificate
    cert_path: Path
    key_path: Path


def _write_key(key, path):
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _builder(subject, issuer, public_key):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)))


def make_ca(directory, name="test-ca"):
    """A self-signed CA; its certificate is written to ``<directory>/<name>.pem``."""
    directory = Path(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (_builder(subject, subject, key.public_key())
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False,
                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                       encipher_only=False, decipher_only=False), True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  False)
                   .sign(key, hashes.SHA256()))
    cert_path = directory / f"{name}.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return CA(name, directory, certificate, key, cert_path)


def issue(ca, name="server", dns_names=(), ip=()):
    """A certificate for server and client use, signed by ``ca``, with these SANs.

    Written to ``<ca directory>/<name>.pem`` and ``<name>.key``; the common name is
    ``name``.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    sans = [x509.DNSName(d) for d in dns_names] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in ip]
    builder = (_builder(subject, ca.certificate.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
    certificate = builder.sign(ca.key, hashes.SHA256())
    cert_path = ca.directory / f"{name}.pem"
    key_path = ca.directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return Issued(certificate, cert_path, key_path)
