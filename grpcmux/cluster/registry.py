"""ClusterRegistry: the ClientRegistry of a node whose clients are listed in etcd.

Keys (under ``prefix``, default ``/grpcmux/``), all attached to the node's lease:
``clients/<id>`` (JSON: node, connected_at, remote_address, wire_protocol, labels;
only ``node`` while the handshake is pending) and ``nodes/<name>`` (JSON: address,
started_at). A node that dies loses its lease and, with it, all its keys.

The view (``snapshot``, ``get``, observers) is the whole cluster: this node's own
clients as the server registers them, and every other node's as the prefix watch
delivers them, in etcd's revision order. Events are the changes of that view, so
each is told exactly once whatever etcd does underneath (a resumed watch, a
re-read after compaction, a re-registration under a new lease).

Claims: an id is claimed with a create-if-absent transaction. If another node
holds it, a live holder (its lease has time left) keeps it and the newcomer is
refused; a dead holder's key is taken over. Without etcd, clients are admitted
here and claimed once etcd is back; an id that another node claimed meanwhile is
given up: its session here is closed (``evict``), so an id never has two owners.

Reactor thread only, like :class:`grpcmux.registry.ClientRegistry`.
"""

import dataclasses
import json
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Optional

from prometheus_client import Counter, Gauge
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger

from grpcmux._proto.grpcmux.v1 import tunnel_pb2
from grpcmux.cluster.etcd import DELETE, StoreUnavailable
from grpcmux.cluster.store import Backoff, LeaseKeeper, PrefixWatch
from grpcmux.handshake import HandshakeRejected
from grpcmux.registry import (CONNECTED, DISCONNECTED, HEALTH_VALUES, UNKNOWN, UPDATED,
                              ClientInfo, Observers, RegistryEvent)

DEFAULT_PREFIX = "/grpcmux/"
DEFAULT_TTL = 5
_LEASE_GONE = "requested lease not found"


@dataclass(frozen=True)
class NodeInfo:
    """A node of the cluster: ``address`` is what other nodes dial (HOST:PORT)."""

    name: str
    address: str
    started_at: float


class IdTaken(Exception):
    def __init__(self, node):
        super().__init__(node)
        self.node = node


def _refusal(client_id, node):
    return HandshakeRejected(
        tunnel_pb2.Reject.CODE_ALREADY_EXISTS,
        f"client id {client_id!r} is already connected (to node {node}); pick another "
        "id or stop the other client",
    )


def _encode(info: Optional[ClientInfo], node):
    fields = {"node": node}
    if info is not None:
        fields.update(connected_at=info.connected_at, remote_address=info.remote_address,
                      wire_protocol=info.wire_protocol, labels=[list(p) for p in info.labels],
                      health=info.health)
    return json.dumps(fields, sort_keys=True).encode()


def _decode(client_id, value):
    """(node, ClientInfo or None while pending); (None, None) if unreadable."""
    try:
        fields = json.loads(value)
        node = str(fields["node"])
        if "connected_at" not in fields:
            return node, None
        values = dict(
            client_id=client_id, node=node, connected_at=float(fields["connected_at"]),
            remote_address=str(fields["remote_address"]),
            wire_protocol=str(fields["wire_protocol"]),
            labels=tuple((str(k), str(v)) for k, v in fields["labels"]),
            health=fields.get("health", UNKNOWN),
        )
        if values["health"] not in HEALTH_VALUES:
            values["health"] = UNKNOWN
    except (ValueError, KeyError, TypeError):
        return None, None
    return node, ClientInfo(**values)


class ClusterRegistry(Service):
    """The cluster-wide client registry of node ``node_name``; see the module doc.

    ``client``: an :class:`~grpcmux.cluster.etcd.EtcdClient` (started and stopped
    with this service). ``advertise``: HOST:PORT other nodes dial to reach this one.
    ``evict(client_id, reason)`` (set by the server) closes this node's session of a
    client whose id another node now owns. ``metrics_registry``: a prometheus
    CollectorRegistry for the cluster metrics, or None.
    """

    _log = Logger()

    def __init__(self, clock, client, node_name, advertise, ttl=DEFAULT_TTL,
                 prefix=DEFAULT_PREFIX, metrics_registry=None, check_interval=2.0):
        self._clock = clock
        self._client = client
        self.node_name = node_name
        self.advertise = advertise
        self.ttl = ttl
        self._prefix = prefix
        self._clients_prefix = prefix + "clients/"
        self._nodes_prefix = prefix + "nodes/"
        self.evict: Optional[Callable[[str, str], None]] = None
        # the view
        self.snapshot: Mapping[str, ClientInfo] = MappingProxyType({})
        self.nodes: Mapping[str, NodeInfo] = MappingProxyType({})
        self.revision = 0  # etcd revision the remote part of the view is at
        self._visible = {}
        self._observers = Observers()
        self._local = {}  # id -> ClientInfo: this node's clients
        self._remote = {}  # id -> (node, ClientInfo or None): every key in etcd
        # our keys in etcd
        self._pending = set()  # ids claimed for a handshake, not yet added
        self._owned = {}  # id -> (mod_revision, value) of our key
        self._busy = set()
        self._dirty = set()
        self._claim_waiters = {}  # id -> Deferred of claim()
        # lease and health
        self.serving = False
        self._lease = None
        self._old_leases = set()
        self._keeper = None
        self._registering = None
        self._retry_call = None
        self._register_failing = False
        self._retries = {}  # client id -> delayed call of its next settle
        self._backoff = Backoff(cap=self.ttl)
        self._health_observers = []
        self._watch = PrefixWatch(clock, client, prefix, self._events, self._compacted,
                                  check_interval)
        self._watching = False
        self._metrics(metrics_registry)

    def _metrics(self, registry):
        self._up = self._lost = self._evicted = None
        if registry is None:
            return
        self._up = Gauge("grpcmux_cluster_registered",
                         "1 while this node holds a live etcd lease with its clients "
                         "registered, else 0", registry=registry)
        self._lost = Counter("grpcmux_cluster_lease_lost",
                             "Times this node lost its etcd lease (etcd unreachable)",
                             registry=registry)
        self._evicted = Counter("grpcmux_cluster_evicted_sessions",
                                "Sessions closed here because another node owns their id",
                                registry=registry)

    # -- ClientRegistry interface ------------------------------------------------------

    def add(self, info: ClientInfo) -> None:
        """Register one of this node's clients; KeyError if it is connected here."""
        client_id = info.client_id
        if client_id in self._local:
            raise KeyError(client_id)
        self._pending.discard(client_id)
        self._local[client_id] = dataclasses.replace(info, node=self.node_name)
        self._update(client_id)
        self._settle(client_id)

    def remove(self, client_id: str, graceful: bool = False) -> Optional[ClientInfo]:
        info = self._local.pop(client_id, None)
        if info is not None:
            self._update(client_id, graceful)
            self._settle(client_id)
        return info

    def update(self, client_id: str, **fields) -> Optional[ClientInfo]:
        """Change fields of one of this node's clients (``health=...``); written to
        etcd, so every node sees it. The entry as it is now, or None."""
        info = self._local.get(client_id)
        if info is None:
            return None
        updated = dataclasses.replace(info, **fields)
        if updated != info:
            self._local[client_id] = updated
            self._update(client_id)
            self._settle(client_id)
        return updated

    def get(self, client_id: str) -> Optional[ClientInfo]:
        return self._visible.get(client_id)

    def subscribe(self, observer: Callable[[RegistryEvent], None],
                  updates: bool = False) -> Callable[[], None]:
        """As ClientRegistry.subscribe: UPDATED events only with ``updates``."""
        return self._observers.subscribe(observer, updates)

    def node_address(self, node: str) -> Optional[str]:
        """HOST:PORT to dial for ``node``, or None if it is not registered."""
        entry = self.nodes.get(node)
        return entry.address if entry is not None else None

    # -- claims (MultiplexerServer.admit/forget) ---------------------------------------

    @property
    def pending_claims(self):
        """The ids claimed here for a handshake and not yet added (a frozenset)."""
        return frozenset(self._pending)

    def claim(self, client_id):
        """Claim ``client_id`` for a handshake here; fails with HandshakeRejected if a
        live node holds it. Without etcd the claim is provisional (made later)."""
        self._pending.add(client_id)
        if not self.serving:
            return succeed(client_id)
        d = Deferred()
        self._claim_waiters[client_id] = d
        self._settle(client_id)
        return d

    def release(self, client_id):
        """The handshake that claimed ``client_id`` ended before it was added."""
        if client_id in self._pending:
            self._pending.discard(client_id)
            self._settle(client_id)

    # -- health -----------------------------------------------------------------------

    def add_health_observer(self, observer):
        """``observer(serving)`` now and on every change: True while registered in
        etcd (health of ``grpcmux.cluster`` SERVING), False without etcd. Returns
        the callable that removes the observer."""
        self._health_observers.append(observer)
        observer(self.serving)
        return lambda: self._health_observers.remove(observer)

    def _set_serving(self, serving):
        if serving == self.serving:
            return
        self.serving = serving
        if self._up is not None:
            self._up.set(1 if serving else 0)
        for observer in list(self._health_observers):
            observer(serving)

    # -- service ------------------------------------------------------------------------

    def startService(self):
        super().startService()
        self._client.start()
        self._log.info("cluster node {node} ({address}) registering in etcd {targets}",
                       node=self.node_name, address=self.advertise,
                       targets=",".join(self._client.targets))
        self._register()

    def stopService(self):
        """Revoke the lease (every key of this node goes at once), then close."""
        super().stopService()
        self._watch.stop()
        for call in (self._retry_call, *self._retries.values()):
            if call is not None and call.active():
                call.cancel()
        self._retry_call = None
        self._retries.clear()
        if self._keeper is not None:
            self._keeper.stop()
        lease, self._lease = self._lease, None
        self._set_serving(False)
        done = self._client.revoke(lease) if lease is not None else succeed(None)
        done.addErrback(lambda f: f.trap(StoreUnavailable))
        return done.addCallback(lambda _: self._client.stop())

    # -- registration -------------------------------------------------------------------

    def _register(self):
        self._retry_call = None
        self._registering = self._register_once()
        self._registering.addErrback(self._register_failed)

    @inlineCallbacks
    def _register_once(self):
        lease = yield self._client.grant(self.ttl)
        try:
            yield self._claim_node(lease)
            if not self._watching:
                yield self._resync()
        except BaseException:
            self._client.revoke(lease).addErrback(lambda f: None)
            raise
        if not self.running:
            self._client.revoke(lease).addErrback(lambda f: None)
            return
        self._lease = lease
        self._keeper = LeaseKeeper(self._clock, self._client, lease, self.ttl,
                                   self._lease_lost)
        self._keeper.start()
        self._backoff.reset()
        self._register_failing = False
        self._owned.clear()  # keys of an older lease are taken over by _settle
        self._log.info("cluster node {node} registered in etcd (lease {lease:x}, "
                       "{count} client(s) here)", node=self.node_name, lease=lease,
                       count=len(self._local))
        self._set_serving(True)
        for client_id in set(self._local) | self._pending:
            self._settle(client_id)

    @inlineCallbacks
    def _claim_node(self, lease):
        key = self._nodes_prefix + self.node_name
        value = json.dumps({"address": self.advertise, "started_at": time.time()},
                           sort_keys=True).encode()
        created = yield self._client.create(key, value, lease)
        if created.created:
            return
        holder = created.holder
        if holder is not None and holder.lease not in self._old_leases and holder.lease:
            ttl = yield self._client.time_to_live(holder.lease)
            if ttl > 0:
                raise StoreUnavailable(
                    f"node name {self.node_name!r} is held by another live process "
                    f"(lease {holder.lease:x}, {ttl} s left)")
        revision = holder.mod_revision if holder is not None else 0
        replaced = yield self._client.replace(key, value, lease, revision)
        if replaced is None:
            raise StoreUnavailable(f"node key {key} changed while it was taken over")

    def _register_failed(self, failure):
        failure.trap(StoreUnavailable)
        self._registering = None
        if not self.running:
            return
        delay = self._backoff.next()
        # Once per outage at warning level; the retries after it at debug level.
        log = self._log.debug if self._register_failing else self._log.warn
        self._register_failing = True
        log("cluster node {node} cannot register in etcd ({error}); serving this "
            "node's clients only; retrying in {delay:g} s",
            node=self.node_name, error=failure.value, delay=delay)
        self._retry_call = self._clock.callLater(delay, self._register)

    def _lease_lost(self, reason):
        self._log.warn("cluster node {node} lost its etcd lease ({reason}): serving "
                       "this node's clients only until etcd is back",
                       node=self.node_name, reason=reason)
        if self._lost is not None:
            self._lost.inc()
        if self._lease is not None:
            self._old_leases.add(self._lease)
        self._lease = None
        self._keeper = None
        self._set_serving(False)
        self._owned.clear()
        for client_id, d in list(self._claim_waiters.items()):
            del self._claim_waiters[client_id]
            d.callback(client_id)  # provisional: claimed once etcd is back
        if self.running and (self._registering is None or self._registering.called):
            self._register()

    # -- the remote view ------------------------------------------------------------------

    @inlineCallbacks
    def _resync(self):
        """Read every key at one revision, make the view match it, watch from there."""
        self._watching = False
        revision, kvs = yield self._client.read_prefix(self._prefix)
        clients = {kv.key[len(self._clients_prefix):]: kv for kv in kvs
                   if kv.key.startswith(self._clients_prefix)}
        nodes = {}
        for kv in kvs:
            node = self._node_entry(kv) if kv.key.startswith(self._nodes_prefix) else None
            if node is not None:
                nodes[node.name] = node
        # Nodes first: an observer told of a client may look up its node's address.
        self.nodes = MappingProxyType(nodes)
        for client_id in sorted(set(self._remote) - set(clients)):  # gone first
            self._set_remote(client_id, None)
        for client_id, kv in sorted(clients.items()):
            self._set_remote(client_id, kv)
        self.revision = revision
        if self.running:  # an observer may have stopped the service just now
            self._watch.start(revision)
            self._watching = True

    def _compacted(self):
        def failed(failure):
            failure.trap(StoreUnavailable)
            delay = self._backoff.next()
            self._log.warn("cluster: cannot read etcd again ({error}); retrying in "
                           "{delay:g} s", error=failure.value, delay=delay)
            self._retry_call = self._clock.callLater(delay, self._compacted)

        if self.running:
            self._resync().addErrback(failed)

    def _node_entry(self, kv):
        name = kv.key[len(self._nodes_prefix):]
        try:
            fields = json.loads(kv.value)
            return NodeInfo(name, str(fields["address"]), float(fields["started_at"]))
        except (ValueError, KeyError, TypeError):
            return None

    def _events(self, events):
        for event in events:
            kv = event.kv
            if kv.key.startswith(self._clients_prefix):
                self._set_remote(kv.key[len(self._clients_prefix):],
                                 None if event.kind == DELETE else kv)
            elif kv.key.startswith(self._nodes_prefix):
                nodes = dict(self.nodes)
                name = kv.key[len(self._nodes_prefix):]
                node = self._node_entry(kv) if event.kind != DELETE else None
                if node is None:
                    nodes.pop(name, None)
                else:
                    nodes[name] = node
                self.nodes = MappingProxyType(nodes)
            self.revision = kv.mod_revision

    def _set_remote(self, client_id, kv):
        if kv is None:
            self._remote.pop(client_id, None)
            owned = self._owned.get(client_id)
            if owned is not None:  # our key went (our lease expired): claim it again
                del self._owned[client_id]
                self._settle(client_id)
        else:
            node, info = _decode(client_id, kv.value)
            if node is None:
                self._log.warn("etcd key {key} holds no readable client entry; ignored",
                               key=kv.key)
                self._remote.pop(client_id, None)
            else:
                self._remote[client_id] = (node, info)
                if kv.lease != self._lease and client_id in self._owned:
                    del self._owned[client_id]  # another node took it over
                    self._taken(client_id, node)
        self._update(client_id)

    # -- our keys -----------------------------------------------------------------------

    def _desired(self, client_id):
        if client_id in self._local:
            return _encode(self._local[client_id], self.node_name)
        if client_id in self._pending:
            return _encode(None, self.node_name)
        return None

    def _settle(self, client_id):
        """Bring our key for ``client_id`` in line with what this node holds; one
        write per id at a time (a change meanwhile is settled right after)."""
        if client_id in self._busy:
            self._dirty.add(client_id)
            return
        if not self.serving:
            return  # settled on registration
        desired = self._desired(client_id)
        owned = self._owned.get(client_id)
        if desired is None and owned is None:
            return
        if owned is not None and owned[1] == desired:
            self._claimed(client_id)
            return
        self._busy.add(client_id)
        key = self._clients_prefix + client_id
        if desired is None:
            d = self._client.delete(key, owned[0])
            d.addCallback(lambda _: self._owned.pop(client_id, None))
        elif owned is not None:
            d = self._client.replace(key, desired, self._lease, owned[0])
            d.addCallback(self._wrote, client_id, desired)
        else:
            d = self._acquire(key, desired)
            d.addCallback(self._wrote, client_id, desired)
        d.addErrback(self._write_failed, client_id)
        d.addBoth(self._settled, client_id)

    @inlineCallbacks
    def _acquire(self, key, value):
        """Create ``key``, or take it over from a dead holder; its mod revision.
        IdTaken if a live holder (another node, or another process) has it."""
        lease = self._lease
        created = yield self._client.create(key, value, lease)
        if created.created:
            return created.revision
        holder = created.holder
        if holder is None:
            return None  # deleted meanwhile: try again
        if holder.lease != lease and holder.lease not in self._old_leases and holder.lease:
            ttl = yield self._client.time_to_live(holder.lease)
            if ttl > 0:
                node, _ = _decode(key, holder.value)
                raise IdTaken(node or "unknown")
            self._log.info("taking over client id {key} from a dead holder (lease {lease:x})",
                           key=key, lease=holder.lease)
        revision = yield self._client.replace(key, value, lease, holder.mod_revision)
        return revision

    def _wrote(self, revision, client_id, value):
        if revision is None:
            self._owned.pop(client_id, None)
            self._dirty.add(client_id)  # changed under us: look again
        else:
            self._owned[client_id] = (revision, value)
            self._claimed(client_id)

    def _claimed(self, client_id):
        d = self._claim_waiters.pop(client_id, None)
        if d is not None:
            d.callback(client_id)

    def _write_failed(self, failure, client_id):
        if failure.check(IdTaken):
            self._taken(client_id, failure.value.node)
            return
        failure.trap(StoreUnavailable)
        if _LEASE_GONE in str(failure.value) and self._keeper is not None:
            self._keeper.stop()
            self._lease_lost("etcd no longer knows the lease")
            return
        self._log.warn("cluster: cannot write client {client_id} to etcd ({error}); "
                       "retrying", client_id=client_id, error=failure.value)
        waiter = self._claim_waiters.pop(client_id, None)
        if waiter is not None:
            waiter.callback(client_id)  # provisional: admitted, claimed on a retry
        if client_id not in self._retries:
            self._retries[client_id] = self._clock.callLater(
                self._backoff.next(), self._settle_later, client_id)

    def _settle_later(self, client_id):
        del self._retries[client_id]
        if self.running:
            self._settle(client_id)

    def _settled(self, _, client_id):
        self._busy.discard(client_id)
        if client_id in self._dirty:
            self._dirty.discard(client_id)
            self._settle(client_id)

    def _taken(self, client_id, node):
        """Another live node owns ``client_id``: refuse its handshake here, or close
        this node's session of it."""
        self._owned.pop(client_id, None)
        waiter = self._claim_waiters.pop(client_id, None)
        if waiter is not None:
            self._pending.discard(client_id)
            waiter.errback(_refusal(client_id, node))
            return
        self._pending.discard(client_id)
        if self._local.pop(client_id, None) is None:
            return
        self._log.warn("client id {client_id} is owned by node {owner} now: closing "
                       "its stale session on this node", client_id=client_id, owner=node)
        if self._evicted is not None:
            self._evicted.inc()
        if self.evict is not None:
            self.evict(client_id, f"client id owned by node {node}")
        self._update(client_id)

    # -- the view -----------------------------------------------------------------------

    def _view(self, client_id):
        local = self._local.get(client_id)
        if local is not None:
            return local
        node, info = self._remote.get(client_id, (None, None))
        return info if node != self.node_name else None

    def _update(self, client_id, graceful=False):
        new = self._view(client_id)
        old = self._visible.get(client_id)
        if new == old:
            return
        if (old is not None and new is not None and old.node == new.node
                and old.connected_at == new.connected_at):
            self._visible[client_id] = new  # the same session, changed in place
            self._publish(RegistryEvent(UPDATED, new))
            return
        if old is not None:
            del self._visible[client_id]
            self._publish(RegistryEvent(DISCONNECTED, old, graceful))
        if new is not None:
            self._visible[client_id] = new
            self._publish(RegistryEvent(CONNECTED, new))

    def _publish(self, event):
        self.snapshot = MappingProxyType(dict(self._visible))
        self._observers.publish(event)
