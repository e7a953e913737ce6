"""The table of connected multiplexer clients.

It lives on the reactor thread: only the reactor adds and removes entries and calls
observers. Other threads (the grpc threads) read :attr:`ClientRegistry.snapshot`, an
immutable mapping that is replaced, never changed, so one attribute read gives them a
consistent view without locks.
"""

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Tuple

from twisted.logger import Logger

CONNECTED = "connected"
DISCONNECTED = "disconnected"
# Told only to observers subscribed with ``updates=True``: an entry changed in place.
UPDATED = "updated"

# A client's report on its own gRPC server (``ClientInfo.health``).
UNKNOWN = "unknown"
SERVING = "serving"
NOT_SERVING = "not_serving"
HEALTH_VALUES = (UNKNOWN, SERVING, NOT_SERVING)


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
    # The client's gRPC server as it last reported it; legacy clients stay UNKNOWN.
    health: str = UNKNOWN
    # Cluster mode: the node holding the client's session (None: no cluster).
    node: Optional[str] = None

    def __post_init__(self):
        if self.health not in HEALTH_VALUES:
            raise ValueError(f"health must be one of {HEALTH_VALUES}, not {self.health!r}")


@dataclass(frozen=True)
class RegistryEvent:
    """One change of the registry, as told to observers."""

    kind: str  # CONNECTED, DISCONNECTED or (to observers of updates) UPDATED
    info: ClientInfo  # for UPDATED, the entry as it is now
    # DISCONNECTED only: the client is leaving on its own (it sent GoAway), so calls
    # in flight may finish; otherwise it is gone and they cannot.
    graceful: bool = False


class ClientRegistry:
    """Connected clients by id, with change observers. Reactor thread only."""

    _log = Logger()

    def __init__(self):
        self._clients = {}
        self.snapshot: Mapping[str, ClientInfo] = MappingProxyType({})
        self._observers = Observers()

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

    def update(self, client_id: str, **fields) -> Optional[ClientInfo]:
        """Change fields of a connected client's entry (``health=SERVING``).

        Returns the entry as it is now, or None if the client is not connected.
        A real change publishes UPDATED to the observers of updates; the same
        values again publish nothing.
        """
        info = self._clients.get(client_id)
        if info is None:
            return None
        updated = replace(info, **fields)
        if updated != info:
            self._clients[client_id] = updated
            self._publish(RegistryEvent(UPDATED, updated))
        return updated

    def get(self, client_id: str) -> Optional[ClientInfo]:
        return self._clients.get(client_id)

    def subscribe(
        self, observer: Callable[[RegistryEvent], None], updates: bool = False
    ) -> Callable[[], None]:
        """Call ``observer(event)`` after every change; returns the unsubscribe callable.

        Observers see CONNECTED and DISCONNECTED; with ``updates`` also UPDATED
        (an entry changed in place), which observers written for two kinds
        never get. The snapshot already reflects the change when an observer
        runs, so "snapshot + later events" is a consistent view for anyone
        subscribing on the reactor thread.
        """
        return self._observers.subscribe(observer, updates)

    def _publish(self, event: RegistryEvent) -> None:
        self.snapshot = MappingProxyType(dict(self._clients))
        self._observers.publish(event)


class Observers:
    """A registry's change observers, in subscription order (any registry's)."""

    _log = Logger()

    def __init__(self):
        self._observers = {}  # token -> (observer, wants UPDATED)

    def subscribe(self, observer, updates=False):
        """Add ``observer``; returns the callable that removes it."""
        token = object()  # the same observer may subscribe twice
        self._observers[token] = (observer, updates)
        return lambda: self._observers.pop(token, None)

    def publish(self, event):
        """Tell every observer (UPDATED only those that asked); one failing is logged."""
        for observer, updates in list(self._observers.values()):
            if event.kind == UPDATED and not updates:
                continue
            try:
                observer(event)
            except Exception:
                self._log.failure(
                    "registry observer {observer!r} failed on {kind} of {client_id}",
                    observer=observer,
                    kind=event.kind,
                    client_id=event.info.client_id,
                )
