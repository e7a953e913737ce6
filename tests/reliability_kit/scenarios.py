"""The fault and load scenarios: each runs real processes and returns its figures.

A scenario is ``async def name(reactor, workdir, **counts) -> dict``; the tests
assert bounds on the figures, ``benchmarks/reliability.py`` prints them.  Times
are seconds measured with ``time.monotonic`` in this process; memory is the
resident set size (RSS) of the child process, read from ``/proc``.
"""

import time

import grpc
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall, deferLater

from reliability_kit import callers
from reliability_kit.discovery import CONNECTED, DISCONNECTED, Watcher, list_servers
from reliability_kit.pattern import CHUNK, expected_digest
from reliability_kit.processes import MuxServer, client_admitted, kit_script, mux_client
from reliability_kit.relay import Relay
from rpc_backend import in_thread

# Short keepalive for the fault scenarios: (interval, timeout) in seconds.
KEEPALIVE = (1.0, 1.0)
MIB = 1024 * 1024
GIB = 1024 * MIB
# The counts for the load scenarios (keyword arguments of each).
LOAD_COUNTS = {
    "many_clients": {"count": 1000},
    "many_streams": {"count": 1000},
    "backpressure": {},
    "churn_connections": {"cycles": 5000},
    "churn_calls": {"calls": 100000},
}


class Scene:
    """The processes and helpers of one scenario, all stopped at the end."""

    def __init__(self, reactor, workdir):
        self.reactor = reactor
        self.workdir = workdir
        self.children = []
        self.closers = []

    async def backend(self, port=0):
        child = self.track(kit_script(self.reactor, "echo backend", "echo_backend",
                                      "--port", port))
        event = await child.wait_for(lambda e: e.get("event") == "listening")
        child.port = event["port"]
        child.address = f"127.0.0.1:{event['port']}"
        return child

    async def server(self, keepalive=KEEPALIVE, extra=()):
        server = MuxServer(self.reactor, self.workdir, keepalive, extra)
        await server.start()
        self.track(server.child)
        return server

    async def client(self, client_id, multiplexer_address, backend, keepalive=KEEPALIVE):
        child = self.track(mux_client(self.reactor, client_id, multiplexer_address,
                                      backend.address, keepalive))
        await client_admitted(child)
        return child

    def watcher(self, server):
        watcher = Watcher(self.reactor, server.proxy_address)
        self.closers.append(watcher.close)
        return watcher

    def track(self, child):
        self.children.append(child)
        return child

    async def close(self):
        for close in reversed(self.closers):
            close()
        await DeferredList([child.stop() for child in reversed(self.children)])

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.close()


def _failures(outcomes, killed_at, client_id):
    delays = [outcome.ended - killed_at for outcome in outcomes]
    return {
        "calls": len(outcomes),
        "codes": sorted({outcome.code.name for outcome in outcomes}),
        "details_name_client": all(f"'{client_id}'" in (outcome.details or "")
                                   for outcome in outcomes),
        "failed_within_s": max(delays),
        "echo_errors": [outcome.error for outcome in outcomes if outcome.error],
        "bytes_checked": sum(outcome.checked for outcome in outcomes),
    }


# -- faults ------------------------------------------------------------------------


async def client_killed(reactor, workdir, streams=8):
    """SIGKILL a client with streaming calls in flight."""
    async with Scene(reactor, workdir) as scene:
        backend = await scene.backend()
        server = await scene.server()
        watch = scene.watcher(server)
        client = await scene.client("edge-kill", server.multiplexer_address, backend)
        await watch.next("edge-kill", CONNECTED)
        held = callers.HeldStreams(reactor, server.proxy_address, "edge-kill", streams)
        scene.closers.append(held.close)
        await held.when_established()
        killed_at = client.signal("KILL")
        outcomes = await held.when_ended()
        gone, _, _ = await watch.next("edge-kill", DISCONNECTED, after=killed_at)
        listed = await in_thread(reactor, list_servers, server.proxy_address)
        figures = _failures(outcomes, killed_at, "edge-kill")
        figures.update(watch_disconnected_s=gone - killed_at, listed_after=listed)
        return figures


async def _frozen_or_blackholed(reactor, workdir, streams, freeze):
    interval, timeout = KEEPALIVE
    async with Scene(reactor, workdir) as scene:
        backend = await scene.backend()
        server = await scene.server()
        watch = scene.watcher(server)
        dial = server.multiplexer_address
        relay = None
        if not freeze:
            relay = Relay(reactor, "127.0.0.1", server.multiplexer_port)
            scene.closers.append(relay.close)
            dial = relay.address
        client = await scene.client("edge-fault", dial, backend)
        await watch.next("edge-fault", CONNECTED)
        held = callers.HeldStreams(reactor, server.proxy_address, "edge-fault", streams)
        scene.closers.append(held.close)
        await held.when_established()
        since = len(client.events)
        if freeze:
            fault_at = client.signal("STOP")
        else:
            relay.hold()
            fault_at = time.monotonic()
        gone, _, _ = await watch.next("edge-fault", DISCONNECTED, after=fault_at)
        outcomes = await held.when_ended()
        figures = _failures(outcomes, fault_at, "edge-fault")
        figures.update(detected_s=gone - fault_at, bound_s=interval + timeout)
        if not freeze:
            lost = await client.wait_for_message("lost its session", since=since)
            figures["client_detected_s"] = lost["_seen"] - fault_at
        if freeze:
            recovered_at = client.signal("CONT")
        else:
            relay.release()
            recovered_at = time.monotonic()
        back, _, _ = await watch.next("edge-fault", CONNECTED, after=recovered_at)
        figures["reconnected_s"] = back - recovered_at
        figures["probe_after"] = await _probe_until_ok(reactor, server, "edge-fault")
        return figures


async def client_frozen(reactor, workdir, streams=4):
    """SIGSTOP a client with calls in flight, then SIGCONT."""
    return await _frozen_or_blackholed(reactor, workdir, streams, freeze=True)


async def link_blackholed(reactor, workdir, streams=4):
    """Black-hole the client's link with calls in flight, then let it through."""
    return await _frozen_or_blackholed(reactor, workdir, streams, freeze=False)


async def _probe_until_ok(reactor, server, client_id, limit=10.0, pause=0.05):
    """Unary calls, ``pause`` apart, until one succeeds: seconds until then and calls
    failed meanwhile."""
    started = time.monotonic()
    failed = 0
    while True:
        if failed:
            await deferLater(reactor, pause)
        code, details, _ = await in_thread(reactor, callers.probe, server.proxy_address,
                                           client_id)
        if code == grpc.StatusCode.OK:
            return {"ok_after_s": time.monotonic() - started, "failed_first": failed}
        failed += 1
        if time.monotonic() - started > limit:
            raise AssertionError(f"{client_id} not callable after {limit}s: {code} {details}")


def backoff_bound(downtime, initial=0.5, factor=1.5, maximum=30.0, jitter=1.0):
    """The longest wait, after a server came back, that the client's default backoff
    (grpcmux.client.default_retry_policy) allows: its attempt in progress began once the
    delays before it (each at least their jitter-free value) fitted in ``downtime``."""
    elapsed, attempt = 0.0, 0
    while elapsed + initial * factor ** attempt <= downtime:
        elapsed += initial * factor ** attempt
        attempt += 1
    return min(initial * factor ** attempt, maximum) + jitter


async def server_restarted(reactor, workdir, clients=3):
    """SIGKILL the server, start it again on the same ports; the clients come back."""
    async with Scene(reactor, workdir) as scene:
        backend = await scene.backend()
        server = await scene.server()
        ids = [f"edge-{n}" for n in range(clients)]
        children = [await scene.client(i, server.multiplexer_address, backend) for i in ids]
        marks = [len(child.events) for child in children]
        killed_at = server.child.signal("KILL")
        await server.child.when_ended()
        await server.start()
        scene.track(server.child)
        ready_at = time.monotonic()
        watch = scene.watcher(server)
        back = []
        for client_id, child, mark in zip(ids, children, marks):
            event = await client_admitted(child, since=mark)
            back.append(event["_seen"] - ready_at)
        for client_id in ids:
            await watch.next(client_id, CONNECTED)
        probes = [await _probe_until_ok(reactor, server, client_id) for client_id in ids]
        return {
            "clients": clients,
            "server_down_s": ready_at - killed_at,
            "reconnected_max_s": max(back),
            "backoff_bound_s": backoff_bound(ready_at - killed_at),
            "callable_after_s": max(back) + max(p["ok_after_s"] for p in probes),
            "listed_after": await in_thread(reactor, list_servers, server.proxy_address),
        }


async def backend_restarted(reactor, workdir, calls_while_down=5):
    """Stop the client's gRPC backend, call, start it again on the same port, call."""
    async with Scene(reactor, workdir) as scene:
        backend = await scene.backend()
        server = await scene.server()
        await scene.client("edge-backend", server.multiplexer_address, backend)
        before = await _probe_until_ok(reactor, server, "edge-backend")
        backend.signal("KILL")
        await backend.when_ended()
        down = [await in_thread(reactor, callers.probe, server.proxy_address, "edge-backend")
                for _ in range(calls_while_down)]
        await scene.backend(port=backend.port)
        after = await _probe_until_ok(reactor, server, "edge-backend")
        return {
            "ok_before": before["failed_first"] == 0,
            "down_codes": sorted({code.name for code, _, _ in down}),
            "down_details_name_client": all("'edge-backend'" in details
                                            for _, details, _ in down),
            "down_detail": down[-1][1],
            "down_slowest_s": max(seconds for _, _, seconds in down),
            "up_ok_after_s": after["ok_after_s"],
            "up_failed_first": after["failed_first"],
        }


async def duplicate_takeover(reactor, workdir, ping_timeout=0.5):
    """A second client with the id of a frozen (undetected) one takes over.

    The newcomer dials through a relay that holds its connection until it is
    made, so its handshake starts at a known moment, not after its start-up."""
    async with Scene(reactor, workdir) as scene:
        backend = await scene.backend()
        server = await scene.server(keepalive=(30.0, 10.0),
                                    extra=("--duplicate-ping-timeout", ping_timeout))
        watch = scene.watcher(server)
        first = await scene.client("edge-dup", server.multiplexer_address, backend,
                                   keepalive=(30.0, 10.0))
        await watch.next("edge-dup", CONNECTED)
        frozen_at = first.signal("STOP")
        relay = Relay(reactor, "127.0.0.1", server.multiplexer_port)
        scene.closers.append(relay.close)
        relay.hold()
        accepted = relay.when_accepted()
        second = scene.track(mux_client(reactor, "edge-dup", relay.address,
                                        backend.address, (30.0, 10.0)))
        await accepted
        relay.release()
        started = time.monotonic()
        admitted = await client_admitted(second)
        replaced, _, _ = await watch.next("edge-dup", DISCONNECTED, after=frozen_at)
        connected, _, _ = await watch.next("edge-dup", CONNECTED, after=replaced)
        probe = await _probe_until_ok(reactor, server, "edge-dup")
        first.signal("KILL")
        return {
            "took_over_s": admitted["_seen"] - started,
            "old_dropped_s": replaced - started,
            "new_listed_s": connected - started,
            "ping_timeout_s": ping_timeout,
            "probe": probe,
        }


# -- load and resource bounds ------------------------------------------------------


async def many_clients(reactor, workdir, count=1000):
    """``count`` clients in one swarm process, one checked call to each."""
    async with Scene(reactor, workdir) as scene:
        backend = await scene.backend()
        server = await scene.server(keepalive=(30.0, 10.0))
        swarm = scene.track(kit_script(reactor, "swarm", "swarm", "hold", "--count", count,
                                       "--multiplexer", server.multiplexer_address,
                                       "--backend", backend.address, "--prefix", "many"))
        admitted = await swarm.wait_for(lambda e: e.get("event") == "admitted", timeout=300)
        listed = await in_thread(reactor, list_servers, server.proxy_address)
        ids = [f"many-{n}" for n in range(count)]
        result = await callers.run_load(reactor, server.proxy_address,
                                        callers.unary_calls(ids), concurrency=100)
        return {
            "clients": count,
            "connect_s": admitted["seconds"],
            "listed": len(listed),
            "listed_exactly": sorted(listed) == sorted(ids),
            "calls_ok": result.ok,
            "calls_failed": result.failed,
            "failures": result.failures,
            "calls_s": result.seconds,
            "server": server.resources(),
        }


async def many_streams(reactor, workdir, count=1000, messages=4, size=4096):
    """``count`` concurrent streaming calls through one client, every byte hashed."""
    async with Scene(reactor, workdir) as scene:
        backend = await scene.backend()
        server = await scene.server(keepalive=(30.0, 10.0))
        await scene.client("edge-streams", server.multiplexer_address, backend,
                           keepalive=(30.0, 10.0))
        result = await callers.run_load(
            reactor, server.proxy_address,
            callers.bidi_calls("edge-streams", count, messages, size), concurrency=count)
        return {
            "streams": count,
            "calls_ok": result.ok,
            "calls_failed": result.failed,
            "failures": result.failures,
            "bytes_checked": result.bytes_checked,
            "seconds": result.seconds,
        }


async def backpressure(reactor, workdir, total=GIB, read=None, rate=MIB, slow_seconds=4.0,
                       tick=0.1):
    """A caller reads a ``total``-byte stream at ``rate`` bytes/s for ``slow_seconds``,
    then at full speed until it has ``read`` bytes (default: all), and cancels the
    rest.  The RSS of the server and client processes is sampled every ``tick``;
    every chunk is checked and everything received hashed."""
    read = total if read is None else read
    async with Scene(reactor, workdir) as scene:
        backend = await scene.backend()
        server = await scene.server(keepalive=(30.0, 10.0))
        client = await scene.client("edge-flood", server.multiplexer_address, backend,
                                    keepalive=(30.0, 10.0))
        await _probe_until_ok(reactor, server, "edge-flood")  # the path is warm
        rss = {"server": server.child.resources, "client": client.resources}
        baseline = {name: measure()["rss"] for name, measure in rss.items()}
        peak = dict(baseline)
        reader = callers.PacedReader(reactor, server.proxy_address, "edge-flood", total)
        scene.closers.append(reader.close)
        started = time.monotonic()
        allowed = [0]
        done = Deferred()

        def sample():
            for name, measure in rss.items():
                peak[name] = max(peak[name], measure()["rss"])
            due = int(rate * (time.monotonic() - started) / CHUNK)  # a late tick catches up
            reader.allow(due - allowed[0])
            allowed[0] = due
            if reader.received >= read and not done.called:
                done.callback(None)

        def ended(code):
            if not done.called:
                done.callback(None)
            return code

        reader.ended.addCallback(ended)
        sampler = LoopingCall(sample)
        sampler.clock = reactor
        sampler.start(tick)
        def produced():
            progress = [e["produced"] for e in backend.events
                        if e.get("event") == "flood_progress"]
            return progress[-1] if progress else 0

        try:
            # Halfway, the buffers on the way are full; from then on the backend may
            # produce only what the caller reads.
            await deferLater(reactor, slow_seconds / 2)
            mid_received, mid_produced = reader.received, produced()
            await deferLater(reactor, slow_seconds / 2)
            slow_received = reader.received
            produced_slow = produced()
            slow_peak = dict(peak)
            reader.unpace()
            fast_started = time.monotonic()
            await done.addTimeout(300.0, reactor)
            fast_seconds = time.monotonic() - fast_started
        finally:
            sampler.stop()
        if read < total:
            reader.stop()
        code = await reader.ended.addTimeout(30.0, reactor)
        expected = await in_thread(reactor, expected_digest, reader.chunks)
        intact = reader.error is None and reader.digest.hexdigest() == expected
        return {
            "requested_mib": total / MIB,
            "read_mib": read / MIB,
            "slow_read_rate_mib_s": slow_received / slow_seconds / MIB,
            "slow_received_mib": slow_received / MIB,
            "slow_produced_mib": produced_slow / MIB,
            "slow_held_back_mib": (produced_slow - slow_received) / MIB,
            "second_half_read_mib": (slow_received - mid_received) / MIB,
            "second_half_produced_mib": (produced_slow - mid_produced) / MIB,
            "slow_server_extra_mib": (slow_peak["server"] - baseline["server"]) / MIB,
            "slow_client_extra_mib": (slow_peak["client"] - baseline["client"]) / MIB,
            "fast_mib_s": (reader.received - slow_received) / fast_seconds / MIB,
            "run_server_extra_mib": (peak["server"] - baseline["server"]) / MIB,
            "run_client_extra_mib": (peak["client"] - baseline["client"]) / MIB,
            "received_mib": reader.received / MIB,
            "status": code.name,
            "hash_ok": intact,
        }


def _compare(baseline, after):
    """Each resource figure after the load relative to its baseline (1.0: equal)."""
    return {name: (after[name] / baseline[name] if baseline[name] else
                   (1.0 if after[name] == 0 else float("inf")))
            for name in baseline}


async def _settled(reactor, server, limit=30.0, pause=0.1):
    """Wait until the server lists no client."""
    started = time.monotonic()
    while True:
        listed = await in_thread(reactor, list_servers, server.proxy_address)
        if not listed:
            return time.monotonic() - started
        if time.monotonic() - started > limit:
            raise AssertionError(f"server not idle after {limit}s: {len(listed)} listed")
        await deferLater(reactor, pause)


async def churn_connections(reactor, workdir, cycles=5000, warmup=200, concurrency=50):
    """``cycles`` client connect/disconnect cycles; the server's resources before
    (after ``warmup`` cycles) and after."""
    async with Scene(reactor, workdir) as scene:
        backend = await scene.backend()
        server = await scene.server(keepalive=(30.0, 10.0))

        async def churn(count, prefix):
            swarm = scene.track(kit_script(
                reactor, "swarm", "swarm", "churn", "--cycles", count, "--prefix", prefix,
                "--concurrency", concurrency, "--multiplexer", server.multiplexer_address,
                "--backend", backend.address))
            report = await swarm.wait_for(lambda e: e.get("event") == "churned", timeout=600)
            await swarm.when_ended()
            await _settled(reactor, server)
            return report

        await churn(warmup, "warmup")
        baseline = server.resources()
        report = await churn(cycles, "churn")
        after = server.resources()
        return {
            "cycles": cycles,
            "failed": report["failed"],
            "errors": report["errors"],
            "seconds": report["seconds"],
            "baseline": baseline,
            "after": after,
            "ratio": _compare(baseline, after),
        }


async def churn_calls(reactor, workdir, calls=100000, warmup=20000, concurrency=100):
    """``calls`` proxied unary calls to one client; the server's and the client's
    resources before (after ``warmup`` calls) and after.

    The server's RSS grows over its first tens of thousands of calls, then stays:
    a warm-up of 20,000 calls puts that growth in the baseline, so the comparison
    shows leaks."""
    async with Scene(reactor, workdir) as scene:
        backend = await scene.backend()
        server = await scene.server(keepalive=(30.0, 10.0))
        client = await scene.client("edge-calls", server.multiplexer_address, backend,
                                    keepalive=(30.0, 10.0))

        def load(count):
            return callers.run_load(reactor, server.proxy_address,
                                    callers.repeated_unary_calls(["edge-calls"], count),
                                    concurrency=concurrency, timeout=900.0)

        warm = await load(warmup)
        baseline = server.resources()
        client_baseline = client.resources()
        result = await load(calls)
        after = server.resources()
        client_after = client.resources()
        return {
            "calls": calls,
            "calls_ok": result.ok,
            "calls_failed": result.failed + warm.failed,
            "failures": result.failures,
            "seconds": result.seconds,
            "calls_per_s": calls / result.seconds,
            "baseline": baseline,
            "after": after,
            "ratio": _compare(baseline, after),
            "client_baseline": client_baseline,
            "client_after": client_after,
            "client_ratio": _compare(client_baseline, client_after),
        }
