"""What secures the proxy endpoint: TLS material and end-user tokens, read at startup.

PEM files are checked by :mod:`grpcmux.tls`: every problem is one line naming the
option and the file. The proxy endpoint serves TLS through Twisted (ALPN ``h2``);
callers' grpc channel credentials (``grpcmux list`` and friends) are made only when a
channel is built, and grpc itself is imported only then.
"""

from dataclasses import dataclass
from typing import Optional

from grpcmux.config import ConfigError
from grpcmux.tls import (
    KeyPair,
    TLSConfigError,
    options_for,
    read_certificates,
    read_key_pair,
    trust_root,
)
from grpcmux.tokens import PROXY_TOKEN_METADATA_KEY, ProxyTokens, TokenFileError

#: The status details of a call refused for want of a known proxy token.
UNAUTHENTICATED_DETAILS = (
    f"a valid proxy token is required in the metadata '{PROXY_TOKEN_METADATA_KEY}'")


@dataclass(frozen=True)
class ServerTLS:
    """The proxy endpoint's key pair; with ``client_ca``, mTLS."""

    pair: KeyPair
    client_ca: Optional[tuple] = None  # cryptography CA certificates

    @classmethod
    def load(cls, cert_path, key_path, client_ca_path=None):
        """Read and check the files of ``--proxy-tls-*``; TLSConfigError if bad."""
        pair = read_key_pair(cert_path, key_path, "--proxy-tls-cert", "--proxy-tls-key")
        client_ca = None
        if client_ca_path is not None:
            client_ca = tuple(read_certificates(client_ca_path, "--proxy-tls-client-ca")[1])
        return cls(pair, client_ca)

    @property
    def requires_client_certificates(self):
        return self.client_ca is not None

    def options(self):
        """Twisted TLS options offering ALPN h2; client certificates required with a CA."""
        trust = trust_root(self.client_ca) if self.client_ca is not None else None
        return options_for(self.pair, trust, protocols=[b"h2"])


def channel_credentials(ca_path=None, cert_path=None, key_path=None, labels=None):
    """grpc channel credentials for a caller of a TLS proxy endpoint.

    ``ca_path``: the CA to trust (default: the system's trust store); ``cert_path``
    and ``key_path``: a client certificate for mTLS. ``labels`` maps ``"ca"``,
    ``"cert"``, ``"key"`` to the option names used in errors.
    """
    import grpc

    labels = {"ca": "--tls-ca", "cert": "--tls-cert", "key": "--tls-key", **(labels or {})}
    root = read_certificates(ca_path, labels["ca"])[0] if ca_path is not None else None
    chain = key = None
    if cert_path is not None or key_path is not None:
        if cert_path is None or key_path is None:
            raise TLSConfigError(f"{labels['cert']} and {labels['key']} go together")
        pair = read_key_pair(cert_path, key_path, labels["cert"], labels["key"])
        chain, key = pair.chain_pem, pair.key_pem
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key,
                                        certificate_chain=chain)


@dataclass(frozen=True)
class ProxySecurity:
    """TLS material (or None: plaintext) and end-user tokens (or None: open)."""

    tls: Optional[ServerTLS] = None
    tokens: Optional[ProxyTokens] = None


def load_proxy_security(settings):
    """Read the files a ServerSettings names for the proxy; ConfigError if one is bad."""
    try:
        tls = tokens = None
        if settings.proxy_tls_cert is not None:
            tls = ServerTLS.load(settings.proxy_tls_cert, settings.proxy_tls_key,
                                 settings.proxy_tls_client_ca)
        if settings.proxy_auth_tokens is not None:
            tokens = ProxyTokens.load(settings.proxy_auth_tokens)
    except TLSConfigError as error:
        raise ConfigError(str(error)) from None
    except TokenFileError as error:
        raise ConfigError(f"--proxy-auth-tokens {error}") from None
    return ProxySecurity(tls, tokens)
