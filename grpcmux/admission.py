"""Who may connect under which id: tokens, certificate names, legacy clients.

The multiplexer server asks :meth:`Admission.refusal` about every Hello once the id
itself is well formed.  The rules, in order:

1. A legacy (Go v0.2.1) handshake carries no credentials.  When the server
   authenticates clients (``--auth-tokens`` or ``--tls-client-ca``) it is refused
   unless ``--allow-legacy-clients``; even then it may not take an id that a token
   entry covers, so the ids tokens protect stay protected.
2. With ``--auth-tokens`` a native client must send a token listed for its id.
3. With ``--client-id-from-cert`` the id must be one of the names its TLS
   certificate proves (DNS SANs, else the CN).

Reasons never say which ids exist or are connected, and never contain a token.
"""

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.handshake import WIRE_LEGACY, HandshakeRejected


class Admission:
    """The server's admission policy; ``Admission()`` admits every well-formed id."""

    def __init__(self, tokens=None, client_ca=False, client_id_from_cert=False,
                 allow_legacy_clients=False):
        self.tokens = tokens
        self.client_ca = client_ca
        self.client_id_from_cert = client_id_from_cert
        self.allow_legacy_clients = allow_legacy_clients

    @classmethod
    def from_settings(cls, settings):
        """The policy of the server settings (whose token file they read and
        checked when they were made)."""
        return cls(
            tokens=settings.client_tokens,
            client_ca=bool(settings.tls_client_ca),
            client_id_from_cert=settings.client_id_from_cert,
            allow_legacy_clients=settings.allow_legacy_clients,
        )

    @property
    def authenticates(self):
        """Whether clients must prove who they are (tokens or client certificates)."""
        return self.tokens is not None or self.client_ca

    def refusal(self, hello, certificate_names):
        """``HandshakeRejected`` saying why ``hello`` is refused, or ``None``.

        ``certificate_names`` are the names of the client's TLS certificate (see
        ``grpcmux.tls.peer_names``), ``None`` when it presented none.
        """
        client_id = hello.client_id
        if hello.wire_protocol == WIRE_LEGACY:
            problem = self._legacy_problem(client_id)
        elif self.tokens is not None:
            problem = self._token_problem(client_id, hello.token)
        else:
            problem = None
        if problem is None and self.client_id_from_cert:
            problem = self._certificate_problem(client_id, certificate_names)
        return problem

    def _legacy_problem(self, client_id):
        if not self.authenticates:
            return None
        if not self.allow_legacy_clients:
            return HandshakeRejected(
                tunnel_pb2.Reject.CODE_UNAUTHENTICATED,
                "legacy clients carry no credentials and this server requires them "
                "(--allow-legacy-clients admits them)",
            )
        if self.tokens is not None and self.tokens.covers(client_id):
            return HandshakeRejected(
                tunnel_pb2.Reject.CODE_UNAUTHENTICATED,
                f"client id {client_id!r} needs a token, which a legacy client cannot send",
            )
        return None

    def _token_problem(self, client_id, token):
        if not token:
            return HandshakeRejected(
                tunnel_pb2.Reject.CODE_UNAUTHENTICATED,
                "this server requires a token (client --token-file or GRPCMUX_TOKEN)",
            )
        if not self.tokens.admits(client_id, token):
            return HandshakeRejected(
                tunnel_pb2.Reject.CODE_UNAUTHENTICATED,
                f"the token is not valid for client id {client_id!r}",
            )
        return None

    @staticmethod
    def _certificate_problem(client_id, names):
        if not names:
            return HandshakeRejected(
                tunnel_pb2.Reject.CODE_PERMISSION_DENIED,
                "the client id must be a name in the client certificate, and the "
                "client presented a certificate without names",
            )
        if client_id not in names:
            return HandshakeRejected(
                tunnel_pb2.Reject.CODE_PERMISSION_DENIED,
                f"client id {client_id!r} is not a name in the client certificate "
                f"({', '.join(names)})",
            )
        return None

    def describe(self):
        """One line for the startup log: what clients must present."""
        parts = []
        if self.client_ca:
            parts.append("client certificates required")
        if self.client_id_from_cert:
            parts.append("client id bound to the certificate")
        if self.tokens is not None:
            parts.append("tokens required")
        return ", ".join(parts) or "no client authentication"
