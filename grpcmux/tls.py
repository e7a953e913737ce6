"""TLS: certificate and key files checked once; Twisted options for the multiplexer endpoint.

Every PEM certificate or key file, for either endpoint, is read and checked here with
``cryptography`` (:func:`read_certificates`, :func:`read_key_pair`): a problem is a
``TLSConfigError`` whose text is one line naming the option and the file.  The proxy
endpoint (:mod:`grpcmux.rpc.security`) uses the same options, offering ALPN ``h2``.

The multiplexer server wraps whatever listener it has (``tcp:``, ``unix:``,
``systemd:``) in ``TLSMemoryBIOFactory`` with :func:`server_options`; the client wraps
its endpoint with ``wrapClientTLS`` and :func:`client_creator`, which verifies the
server's name with service-identity (``optionsForClientTLS``).  Both give Twisted the
``cryptography`` objects, as pyOpenSSL deprecates its own.
"""

from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.interfaces import ISSLTransport


class TLSConfigError(ValueError):
    """A certificate, key or CA file cannot be used; ``str()`` is one line."""


class KeyPair(NamedTuple):
    """A certificate chain and the private key of its first certificate, checked."""

    chain_pem: bytes
    certificates: list  # cryptography certificates, leaf first
    key_pem: bytes
    key: object  # a cryptography private key


def _read(path, label):
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as error:
        raise TLSConfigError(f"{label} {path}: cannot be read: {error.strerror or error}") from None


def read_certificates(path, label):
    """``(PEM bytes, certificates)`` of ``path``, at least one; ``label`` names the option."""
    data = _read(path, label)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TLSConfigError(
            f"{label} {path}: expected one or more PEM certificates "
            "(-----BEGIN CERTIFICATE-----)")
    return data, certificates


def read_key_pair(cert_path, key_path, cert_label, key_label):
    """The :class:`KeyPair` of these files, checked to belong together."""
    chain, certificates = read_certificates(cert_path, cert_label)
    key_data = _read(key_path, key_label)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise TLSConfigError(
            f"{key_label} {key_path}: the private key is encrypted; expected an "
            "unencrypted PEM key (e.g. `openssl pkey -in KEY -out PLAIN`)") from None
    except (ValueError, UnicodeError):
        raise TLSConfigError(
            f"{key_label} {key_path}: expected a PEM private key "
            "(-----BEGIN PRIVATE KEY-----)") from None
    if _public(key) != _public(certificates[0]):
        raise TLSConfigError(
            f"{key_label} {key_path}: does not match the certificate in {cert_label} "
            f"{cert_path} (the first certificate must be the one the key signs for)")
    return KeyPair(chain, certificates, key_data, key)


def _public(key_or_certificate):
    return key_or_certificate.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _trust_root(path, label):
    _, certificates = read_certificates(path, label)
    return trust_root(certificates)


def trust_root(certificates):
    """A Twisted trust root of these (cryptography) CA certificates."""
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certificates])


def server_options(cert_file, key_file, client_ca_file=None):
    """TLS context options for the multiplexer listener.

    With ``client_ca_file`` every client must present a certificate signed by one
    of the CAs in that file (mTLS).
    """
    pair = read_key_pair(cert_file, key_file, "--tls-cert", "--tls-key")
    trust = None
    if client_ca_file:
        trust = _trust_root(client_ca_file, "--tls-client-ca")
    return options_for(pair, trust)


def options_for(pair, trust=None, protocols=None):
    """Server TLS options for a checked :class:`KeyPair`; ``trust``: require client
    certificates it signed; ``protocols``: the ALPN protocols offered (e.g. ``[b"h2"]``)."""
    return ssl.CertificateOptions(
        privateKey=pair.key,
        certificate=pair.certificates[0],
        extraCertChain=pair.certificates[1:],
        trustRoot=trust,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableProtocols=protocols,
    )


def client_creator(server_name, ca_file=None, cert_file=None, key_file=None):
    """Client TLS options verifying ``server_name``; a client certificate if given.

    Without ``ca_file`` the server's certificate is checked against the system's
    trust store.
    """
    trust = _trust_root(ca_file, "--tls-ca") if ca_file else None
    identity = {}
    if cert_file:
        pair = read_key_pair(cert_file, key_file, "--tls-cert", "--tls-key")
        # Not clientCertificate=: Twisted would hand pyOpenSSL's deprecated objects on.
        # The chain goes too: a server trusting only the root needs the intermediates.
        identity = {"privateKey": pair.key, "certificate": pair.certificates[0],
                    "extraCertChain": pair.certificates[1:]}
    return ssl.optionsForClientTLS(
        server_name, trustRoot=trust, extraCertificateOptions=identity)


def peer_names(transport):
    """The names a TLS peer's certificate proves, or ``None`` without a certificate.

    The certificate's DNS subject alternative names; only when it has none, its
    common name(s).
    """
    if not ISSLTransport.providedBy(transport):
        return None
    peer = transport.getPeerCertificate()
    if peer is None:
        return None
    certificate = peer.to_cryptography()
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        dns = []
    else:
        dns = san.value.get_values_for_type(x509.DNSName)
    if dns:
        return tuple(dns)
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return tuple(str(name.value) for name in names)


# OpenSSL's words for a peer that answered a ClientHello with something not TLS.
_NOT_TLS = ("wrong version number", "packet length too long", "record layer failure")


def failure_reason(reason):
    """One line saying why TLS failed, or ``None`` when ``reason`` is no TLS error.

    ``reason`` is what a connection was lost with: a ``Failure`` or an exception.
    """
    error = getattr(reason, "value", reason)
    if isinstance(error, VerificationError):
        wanted = ", ".join(_mismatched_name(e) for e in error.errors)
        return f"the server's certificate is not valid for {wanted}"
    if isinstance(error, SSL.Error):
        details = error.args[0] if error.args else None
        if isinstance(details, list) and details:
            reasons = [str(entry[-1]) for entry in details if entry]
            hint = ""
            if any(reason in _NOT_TLS for reason in reasons):
                hint = " (the server does not speak TLS there: drop --tls, or check the address)"
            return "TLS handshake failed: " + "; ".join(reasons) + hint
        return f"TLS handshake failed: {error}"
    return None


def _mismatched_name(mismatch):
    identity = getattr(mismatch, "mismatched_id", mismatch)
    name = getattr(identity, "hostname", None) or getattr(identity, "ip", None) or identity
    return name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
