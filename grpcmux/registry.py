"""The table of connected multiplexer clients.

It lives on the reactor thread: only the reactor adds and removes entries and calls
observers. Other threads (the grpc threads) read :attr:`ClientRegistry.snapshot`, an
immutable mapping that is replaced, never changed, so one attribute read gives them a
consistent view without locks.
"""

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Tuple

from twisted.logger import Logger

CONNECTED = "connected"
DISCONNECTED = "disconnected"


@dataclass(frozen=True)
class ClientInfo:
    """What the multiplexer knows about one connected client."""

    client_id: str
    # POSIX timestamp of the moment the client was registered.
    connected_at: float
    remote_address: str
    # "legacy" (grpc-multiplexer handshake) or "native" (grpcmux handshake).
    wire_protocol: str
    labels: Tuple[Tuple[str, str], ...] = ()
    # Cluster mode: the node holding the client's session (None: no cluster).
    node: Optional[str] = None


@dataclass(frozen=True)
class RegistryEvent:
    """One change of the registry, as told to observers."""

    kind: str  # CONNECTED or DISCONNECTED
    info: ClientInfo
    # DISCONNECTED only: the client is leaving on its own (it sent GoAway), so calls
    # in flight may finish; otherwise it is gone and they cannot.
    graceful: bool = False


class ClientRegistry:
    """Connected clients by id, with change observers. Reactor thread only."""

    _log = Logger()

    def __init__(self):
        self._clients = {}
        self.snapshot: Mapping[str, ClientInfo] = MappingProxyType({})
        self._observers = {}  # token -> observer, in subscription order

    def add(self, info: ClientInfo) -> None:
        """Register a client; KeyError if its id is taken."""
        if info.client_id in self._clients:
            raise KeyError(info.client_id)
        self._clients[info.client_id] = info
        self._publish(RegistryEvent(CONNECTED, info))

    def remove(self, client_id: str, graceful: bool = False) -> Optional[ClientInfo]:
        """Unregister a client; returns its entry, or None if it was not there.

        ``graceful``: the client is leaving but its calls in flight may finish.
        """
        info = self._clients.pop(client_id, None)
        if info is not None:
            self._publish(RegistryEvent(DISCONNECTED, info, graceful))
        return info

    def get(self, client_id: str) -> Optional[ClientInfo]:
        return self._clients.get(client_id)

    def subscribe(self, observer: Callable[[RegistryEvent], None]) -> Callable[[], None]:
        """Call ``observer(event)`` after every change; returns the unsubscribe callable.

        The snapshot already reflects the change when an observer runs, so
        "snapshot + later events" is a consistent view for anyone subscribing on
        the reactor thread.
        """
        token = object()  # the same observer may subscribe twice
        self._observers[token] = observer

        def unsubscribe():
            self._observers.pop(token, None)

        return unsubscribe

    def _publish(self, event: RegistryEvent) -> None:
        self.snapshot = MappingProxyType(dict(self._clients))
        for observer in list(self._observers.values()):
            try:
                observer(event)
            except Exception:
                self._log.failure(
                    "registry observer {observer!r} failed on {kind} of {client_id}",
                    observer=observer,
                    kind=event.kind,
                    client_id=event.info.client_id,
                )
