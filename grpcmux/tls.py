"""TLS for the multiplexer endpoint: contexts from PEM files, peer names, failure reasons.

The server wraps whatever listener it has (``tcp:``, ``unix:``, ``systemd:``) in
``TLSMemoryBIOFactory`` with :func:`server_options`; the client wraps its endpoint
with ``wrapClientTLS`` and :func:`client_creator`, which verifies the server's name
with service-identity (``optionsForClientTLS``).  Every problem with the files is a
``TLSConfigError`` whose text is one line naming the file.
"""

import re

from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.interfaces import ISSLTransport

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


class TLSConfigError(ValueError):
    """A certificate, key or CA file cannot be used; ``str()`` is one line."""


def _read(path, what):
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as error:
        raise TLSConfigError(f"{what} {path}: cannot be read: {error.strerror or error}") from None


def load_certificates(path, what="certificate file"):
    """Every PEM certificate in ``path``, in order; at least one."""
    blocks = _PEM_CERTIFICATE.findall(_read(path, what))
    if not blocks:
        raise TLSConfigError(f"{what} {path}: expected PEM certificates (BEGIN CERTIFICATE)")
    try:
        return [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception:  # pyOpenSSL raises its own crypto.Error for any bad body
        raise TLSConfigError(f"{what} {path}: a PEM certificate in it is not valid") from None


def _load_key(path):
    try:
        return ssl.KeyPair.load(_read(path, "key file"), crypto.FILETYPE_PEM)
    except TLSConfigError:
        raise
    except Exception:
        raise TLSConfigError(
            f"key file {path}: expected an unencrypted PEM private key"
        ) from None


def _trust_root(path, what):
    return ssl.trustRootFromCertificates(load_certificates(path, what))


def _identity(cert_file, key_file):
    """``(private key, leaf certificate, chain)`` for a certificate/key pair of files."""
    certificates = load_certificates(cert_file)
    key = _load_key(key_file)
    leaf = certificates[0]
    if leaf.getPublicKey().keyHash() != key.keyHash():
        raise TLSConfigError(
            f"key file {key_file} does not belong to the certificate in {cert_file}"
        )
    return key.original, leaf.original, [c.original for c in certificates[1:]]


def server_options(cert_file, key_file, client_ca_file=None):
    """TLS context options for the multiplexer listener.

    With ``client_ca_file`` every client must present a certificate signed by one
    of the CAs in that file (mTLS).
    """
    key, certificate, chain = _identity(cert_file, key_file)
    trust = None
    if client_ca_file:
        trust = _trust_root(client_ca_file, "client CA file")
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=certificate,
        extraCertChain=chain,
        trustRoot=trust,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def client_creator(server_name, ca_file=None, cert_file=None, key_file=None):
    """Client TLS options verifying ``server_name``; a client certificate if given.

    Without ``ca_file`` the server's certificate is checked against the system's
    trust store.
    """
    trust = _trust_root(ca_file, "CA file") if ca_file else None
    client_certificate = None
    if cert_file:
        key, certificate, _chain = _identity(cert_file, key_file)
        client_certificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate(certificate), ssl.KeyPair(key)
        )
    return ssl.optionsForClientTLS(
        server_name, trustRoot=trust, clientCertificate=client_certificate
    )


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
    from cryptography import x509
    from cryptography.x509.oid import NameOID

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
            return "TLS handshake failed: " + "; ".join(reasons)
        return f"TLS handshake failed: {error}"
    return None


def _mismatched_name(mismatch):
    identity = getattr(mismatch, "mismatched_id", mismatch)
    name = getattr(identity, "hostname", None) or getattr(identity, "ip", None) or identity
    return name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
