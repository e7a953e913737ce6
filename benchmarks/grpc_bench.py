"""gRPC through grpcmux vs. direct, at Go speed: the benchmark suite (issues #7, #12).

    python benchmarks/grpc_bench.py            # full run (~6 minutes)
    python benchmarks/grpc_bench.py --quick    # fewer, shorter runs (~2 minutes)

Starts, each in its own process on loopback: the Go echo backend (``go/echobackend``,
grpcmux.v1.BenchService on grpc-go), the real ``twistd grpcmux-server`` and ``twistd
grpcmux-client`` (client id ``bench``), and the Go original's server and client
(``tests/interop/legacy``, grpc-multiplexer v0.2.1 on the wire) in front of the same
backend, and two chained Go TCP relays (``go/relay``) in front of it: the two extra
hops a tunnel adds, at no cost of their own, hence the most of the direct rate any
two-process proxy keeps on this machine.  The Go load generator (``go/loadgen``, one
process per measurement) calls the backend directly, through grpcmux's proxy
endpoint, through the Go original and through the relays; the modes alternate (the
order rotates every round), ``--runs`` rounds, and the table shows medians with the
ratios to direct next to the target ratios (issue #12).  Both Go programs are built by ``tests/interop/gobuild.py``
from Debian's packages.  Then the CPU time per call at a fixed call rate (grpcmux:
server + client processes, from /proc; the Go original's two; the backend's own for
"direct"), and the server's memory with idle clients connected by ``crowd.py``.

The table goes to stdout, everything measured to ``--json``
(default ``benchmarks/results/grpc_bench.json``).
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _procs import BenchError, Child, cpu_seconds, rss_kib, twistd
from interop import gobuild  # noqa: I100  (tests/, on the path through _procs)

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024
TIMEOUT = 60.0
CLIENT_ID = "bench"
# What grpcmux must reach, proxied/direct (issue #12; the Go original does 0.15-0.19x).
TARGET_RATIOS = {"unary_c1": 0.20, "unary_c32": 0.20, "bidi_pingpong": 0.20,
                 "server_stream": 0.50, "client_stream": 0.50}
TARGET_CPU_MS_PER_CALL = 0.7
GO_KIB_PER_IDLE_CLIENT = 140
LATENCY_SCENARIOS = ("unary_c1", "unary_c32", "bidi_pingpong")
SECONDS_FLAGS = ("duration", "warmup")  # the load generator's flags that take a Go duration


def scenarios(args):
    """name -> (loadgen flags, headline metric, unit)."""
    stream = {"messages": args.stream_count, "size": args.stream_size}
    return {
        "unary_c1": ({"kind": "unary", "concurrency": 1, "size": 100}, "calls_per_s", "calls/s"),
        "unary_c32": ({"kind": "unary", "concurrency": 32, "size": 100},
                      "calls_per_s", "calls/s"),
        "bidi_pingpong": ({"kind": "bidi", "concurrency": 1, "size": 100},
                          "calls_per_s", "round trips/s"),
        "server_stream": ({"kind": "server_stream", "concurrency": 1, **stream},
                          "mb_per_s", "MB/s"),
        "client_stream": ({"kind": "client_stream", "concurrency": 1, **stream},
                          "mb_per_s", "MB/s"),
    }


def build_programs():
    """The Go programs' paths, built (once per checkout) from Debian's packages."""
    try:
        return {name: gobuild.build(name)
                for name in ("echobackend", "loadgen", "legacyserver", "legacyclient", "relay")}
    except gobuild.GoBuildError as error:
        raise BenchError(f"cannot build the Go programs: {error}") from None


class Stack:
    """The processes under test, started on loopback; ``stop()`` ends them all."""

    def __init__(self, args, workdir, programs):
        self.args = args
        self.programs = programs
        self.children = []
        try:
            self._launch(args, workdir)
        except BaseException:
            self.stop()  # the ones started so far: a failed start leaves nothing running
            raise

    def _launch(self, args, workdir):
        self.backend = self.adopt(Child("backend", [self.programs["echobackend"]]))
        port = self.backend.read_until(lambda l: l.startswith("listening "), TIMEOUT).split()[1]
        self.backend_address = f"127.0.0.1:{port}"
        self.addresses = {"direct": self.backend_address}
        self.processes = {"direct": {"backend": self.backend}}

        server_argv = ["grpcmux-server", "--multiplexer-listener", "127.0.0.1:0",
                       "--proxy-listener", "127.0.0.1:0", "--runtime-dir", workdir / "run",
                       *args.server_arg]
        self.server = self.adopt(twistd("grpcmux-server", *server_argv))
        mux = _event(self.server, "multiplexer endpoint listening")
        proxy = _event(self.server, "proxy endpoint listening")
        self.multiplexer_address = mux["address"]
        self.addresses["proxied"] = proxy["address"]
        self.client = self.adopt(twistd(
            "grpcmux-client", "grpcmux-client", "--client-id", CLIENT_ID,
            "--multiplexer-address", self.multiplexer_address,
            "--grpc-server-address", self.backend_address))
        _event(self.client, "connected to multiplexer")
        self.processes["proxied"] = {"server": self.server, "client": self.client}

        if args.go_original:
            go_server = self.adopt(Child("go-server", [
                self.programs["legacyserver"], "-multiplexer-listener", "127.0.0.1:0",
                "-proxy-listener", "127.0.0.1:0"]))
            go_mux = go_server.read_until(lambda l: l.startswith("multiplexer "), TIMEOUT)
            go_proxy = go_server.read_until(lambda l: l.startswith("proxy "), TIMEOUT)
            go_client = self.adopt(Child("go-client", [
                self.programs["legacyclient"], "-client-id", CLIENT_ID,
                "-multiplexer-address", go_mux.split()[1],
                "-grpc-server-address", self.backend_address]))
            go_server.read_until(lambda l: l == f"registered {CLIENT_ID}", TIMEOUT)
            self.addresses["go"] = go_proxy.split()[1]
            self.processes["go"] = {"go_server": go_server, "go_client": go_client}

        if args.relays:
            relay_far = self._relay("relay-2", self.backend_address)
            relay_near = self._relay("relay-1", relay_far[1])
            self.addresses["relays"] = relay_near[1]
            self.processes["relays"] = {"relay_1": relay_near[0], "relay_2": relay_far[0]}

        self.pids = {child.name: child.pid for child in self.children}
        _progress(f"processes: {self.pids}")

    def _relay(self, name, target):
        """A Go TCP relay to ``target``: (its Child, its address)."""
        relay = self.adopt(Child(name, [self.programs["relay"], "-target", target]))
        port = relay.read_until(lambda l: l.startswith("listening "), TIMEOUT).split()[1]
        return relay, f"127.0.0.1:{port}"

    def adopt(self, child):
        """Own ``child`` (a started Child), so that ``stop()`` ends it; returns it.

        Measurements that start processes of their own (the memory crowd) adopt
        them, so that a failed run leaves nothing running.
        """
        self.children.append(child)
        return child

    @property
    def modes(self):
        """The ways every scenario is measured: direct, proxied and perhaps go."""
        return tuple(self.addresses)

    def run_loadgen(self, mode, flags, during=None):
        """One measurement by a fresh Go load generator against ``mode``'s address.

        ``during`` (optional) is called as the measured part starts; the function it
        returns is called when the result arrives, and what that returns comes back
        with the result (the harness samples /proc this way)."""
        argv = [self.programs["loadgen"], "-target", self.addresses[mode], "-announce"]
        if mode != "direct":
            argv += ["-client-id", CLIENT_ID]
        for flag, value in flags.items():
            argv += [f"-{flag}", f"{value}s" if flag in SECONDS_FLAGS else value]
        loadgen = Child(f"loadgen ({mode})", argv, stdin=subprocess.DEVNULL)
        try:
            budget = flags.get("warmup", 0) + flags.get("duration", 0) + TIMEOUT
            line = loadgen.read_until(lambda l: l == "measuring" or l.startswith("{"), budget)
            after = None
            if line == "measuring":
                sample = during() if during else None
                line = loadgen.read_until(lambda l: l.startswith("{"), budget)
                after = sample() if sample else None
            result = json.loads(line)
            if "error" in result:
                raise BenchError(f"{loadgen.name}: {result['error']}")
            code = loadgen.wait(TIMEOUT)
            if code != 0:
                raise BenchError(f"{loadgen.name}: exit {code} after its result: {loadgen.stderr}")
        except AssertionError as error:  # Peer.wait's "still running"
            raise BenchError(f"{loadgen.name}: {error}") from None
        finally:
            loadgen.stop()
        return result, after

    def stop(self):
        for child in reversed(self.children):
            child.stop()


def _event(child, text):
    """The first JSON log record of ``child`` whose message contains ``text``."""
    line = child.read_until(lambda l: l.startswith("{") and text in json.loads(l)["message"],
                            TIMEOUT)
    return json.loads(line)


def measure_throughput(stack, args):
    """Every scenario in every mode, the order rotating, ``args.runs`` rounds."""
    table = scenarios(args)
    runs = {name: {mode: [] for mode in stack.modes} for name in table if name in args.scenario}
    for run in range(args.runs):
        shift = run % len(stack.modes)
        modes = stack.modes[shift:] + stack.modes[:shift]
        for name in runs:
            flags, _, _ = table[name]
            for mode in modes:
                result, _ = stack.run_loadgen(mode, {**flags, "duration": args.duration,
                                                     "warmup": args.warmup})
                runs[name][mode].append(result)
                _progress(f"round {run + 1}/{args.runs} {name} {mode}: "
                          f"{result['calls_per_s']:.0f}/s {result['mb_per_s']:.1f} MB/s "
                          f"p50 {result['p50_ms']:.2f} ms")
    out = {}
    for name, by_mode in runs.items():
        _, metric, unit = table[name]
        entry = {"metric": metric, "unit": unit, "target_ratio": TARGET_RATIOS[name]}
        for mode, results in by_mode.items():
            entry[mode] = {key: statistics.median(r[key] for r in results)
                           for key in ("calls_per_s", "mb_per_s", "p50_ms", "p99_ms")}
            entry[mode]["runs"] = results
        for mode in stack.modes[1:]:
            entry[f"{mode}_ratio"] = entry[mode][metric] / entry["direct"][metric]
        entry["meets_target"] = entry["proxied_ratio"] >= TARGET_RATIOS[name]
        out[name] = entry
    return out


def measure_cpu(stack, args):
    """CPU ms per call at a fixed rate, over the measured part only: the backend's
    direct, grpcmux's server and client proxied, the Go original's two; in every mode
    also the load generator's own (``caller_ms_per_call``), the price of a gRPC call."""
    flags = {"kind": "unary", "size": 100, "rate": args.cpu_rate,
             "duration": args.cpu_duration, "warmup": args.warmup}
    out = {"rate": args.cpu_rate, "unit": "ms CPU per call (= s per 1,000 calls)",
           "target_ms": TARGET_CPU_MS_PER_CALL}
    for mode in stack.modes:
        pids = {name: child.pid for name, child in stack.processes[mode].items()}

        def during(pids=pids):
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            return lambda: {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}

        result, spent = stack.run_loadgen(mode, flags, during)
        calls = result["calls"]
        entry = {f"{name}_ms_per_call": seconds * 1e3 / calls for name, seconds in spent.items()}
        entry["ms_per_call"] = sum(spent.values()) * 1e3 / calls
        entry["caller_ms_per_call"] = result["cpu_s"] * 1e3 / calls
        entry["achieved_rate"] = result["calls_per_s"]
        entry["p50_ms"] = result["p50_ms"]
        out[mode] = entry
        _progress(f"cpu at {args.cpu_rate}/s {mode}: {entry['ms_per_call']:.3f} ms/call")
    out["meets_target"] = out["proxied"]["ms_per_call"] <= TARGET_CPU_MS_PER_CALL
    return out


def measure_memory(stack, args):
    """Server RSS with 1 (the bench client) and more idle clients, and the time they
    took to connect and register."""
    # Each client holds a descriptor in the server (its TCP connection), whose
    # open-file limit is raised to the hard one: count only as many clients as that
    # allows, and say so.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd_cap = hard - 200
    levels = sorted(set(min(level, fd_cap) for level in args.idle_clients))
    if levels[-1] < max(args.idle_clients):
        _progress(f"memory: at most {fd_cap} clients fit in the open-file limit {hard}")
    out = {"unit": "KiB", "target_kib_per_client": GO_KIB_PER_IDLE_CLIENT,
           "requested": args.idle_clients, "fd_limit": hard, "levels": []}
    crowd = stack.adopt(Child("crowd", [sys.executable, HERE / "crowd.py",
                                        "--multiplexer", stack.multiplexer_address,
                                        "--backend", stack.backend_address]))
    crowd.read_until(lambda l: l == "ready", TIMEOUT)
    connect_seconds = 0.0
    for level in levels:
        if level > 1:
            crowd.send(f"grow {level - 1}")
            result = json.loads(crowd.read_until(lambda l: l.startswith("{"), 600))
            if "error" in result:
                raise BenchError(f"crowd: {result['error']}")
            connect_seconds += result["seconds"]
        listed = _listed_clients(stack.addresses["proxied"])
        out["levels"].append({"clients": level, "listed": listed,
                              "server_rss_kib": rss_kib(stack.server.pid),
                              "connect_seconds": connect_seconds})
        _progress(f"memory: {level} clients ({listed} listed): "
                  f"{out['levels'][-1]['server_rss_kib']} KiB, connected in {connect_seconds:.1f}s")
    first, last = out["levels"][0], out["levels"][-1]
    if last["clients"] > first["clients"]:
        out["kib_per_idle_client"] = ((last["server_rss_kib"] - first["server_rss_kib"])
                                      / (last["clients"] - first["clients"]))
        out["connect_clients_per_s"] = (last["clients"] - 1) / max(last["connect_seconds"], 1e-9)
    crowd.stop()
    return out


def _listed_clients(proxy_address):
    """How many clients the server's Discovery API lists (proof of registration)."""
    import grpc

    from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2, discovery_pb2_grpc

    with grpc.insecure_channel(proxy_address, options=[
            ("grpc.max_receive_message_length", -1)]) as channel:
        stub = discovery_pb2_grpc.DiscoveryServiceStub(channel)
        reply = stub.ListGRPCServer(discovery_pb2.ListGRPCServerRequest(), timeout=TIMEOUT)
    return len(reply.servers)


def _progress(text):
    print(f"  {text}", file=sys.stderr, flush=True)


#: Columns of the optional modes, in table order: mode -> heading.
EXTRA_MODES = {"go": "Go original", "relays": "2 Go relays"}


def render(report):
    """The results as a fixed-width text table; a pair of columns (figure, ratio) for
    each optional mode that was measured (the Go original, the two relays)."""
    extras = [mode for mode in EXTRA_MODES if mode in report["modes"]]
    rows = [("scenario", "metric", "direct", "proxied", "ratio", "target",
             *(cell for mode in extras for cell in (EXTRA_MODES[mode], "ratio")))]

    def row(*cells, extra=None):
        """``extra(mode)`` gives the optional modes' two cells (default: empty)."""
        rows.append((*cells, *(cell for mode in extras
                               for cell in (extra(mode) if extra else ("", "")))))

    for name, entry in report["throughput"].items():
        metric = entry["metric"]
        d, p = entry["direct"], entry["proxied"]
        row(name, entry["unit"], f"{d[metric]:.1f}", f"{p[metric]:.1f}",
            f"{entry['proxied_ratio']:.2f}x", f"{entry['target_ratio']:.2f}x",
            extra=lambda mode: (f"{entry[mode][metric]:.1f}", f"{entry[mode + '_ratio']:.2f}x"))
        if name in LATENCY_SCENARIOS:
            for key in ("p50_ms", "p99_ms"):
                row("", key.replace("_ms", " ms"), f"{d[key]:.2f}", f"{p[key]:.2f}", "", "",
                    extra=lambda mode: (f"{entry[mode][key]:.2f}", ""))
    cpu = report.get("cpu")
    if cpu:
        row(f"cpu @ {cpu['rate']:.0f}/s", "ms CPU/call", f"{cpu['direct']['ms_per_call']:.3f}",
            f"{cpu['proxied']['ms_per_call']:.3f}", "", f"{cpu['target_ms']} ms",
            extra=lambda mode: (f"{cpu[mode]['ms_per_call']:.3f}", ""))
        proxied = cpu["proxied"]

        def pair(mode):
            first, second = [key for key in cpu[mode] if key.endswith("_ms_per_call")
                             and key != "caller_ms_per_call"][:2]
            return f"{cpu[mode][first]:.3f} / {cpu[mode][second]:.3f}", ""

        row("", "  server / client", "",
            f"{proxied['server_ms_per_call']:.3f} / {proxied['client_ms_per_call']:.3f}", "", "",
            extra=pair)
        row("", "  caller (load generator)", f"{cpu['direct']['caller_ms_per_call']:.3f}",
            f"{proxied['caller_ms_per_call']:.3f}", "", "",
            extra=lambda mode: (f"{cpu[mode]['caller_ms_per_call']:.3f}", ""))
    memory = report.get("memory")
    if memory:
        for level in memory["levels"]:
            row("memory", f"{level['clients']} idle clients", "",
                f"{level['server_rss_kib'] / 1024:.1f} MiB", "",
                f"connected in {level['connect_seconds']:.1f}s")
        if "kib_per_idle_client" in memory:
            row("", "KiB per idle client", "", f"{memory['kib_per_idle_client']:.1f}",
                "", f"Go: {memory['target_kib_per_client']} KiB")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds of 1 s, 2 s at the fixed rate, up to 1,000 idle clients")
    parser.add_argument("--runs", type=int, default=5, help="rounds (medians are reported)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before each")
    parser.add_argument("--scenario", action="append", choices=list(TARGET_RATIOS),
                        help="run only these throughput scenarios (repeatable)")
    parser.add_argument("--stream-count", type=int, default=16, help="messages per streaming call")
    parser.add_argument("--stream-size", type=int, default=MIB, help="bytes per streamed message")
    parser.add_argument("--cpu-rate", type=float, default=500.0, help="calls/s for the CPU cost")
    parser.add_argument("--cpu-duration", type=float, default=5.0)
    parser.add_argument("--idle-clients", default="1,1000,10000",
                        help="comma-separated idle-client counts for the memory figures "
                             "('' skips them)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra flag for grpcmux-server (repeatable)")
    parser.add_argument("--go-original", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure through the Go original (default: yes)")
    parser.add_argument("--relays", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure through two chained Go TCP relays, the two hops "
                             "a tunnel adds at no cost of its own (default: yes)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "grpc_bench.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.duration, args.cpu_duration = 2, 1.0, 2.0
        if args.idle_clients == "1,1000,10000":
            args.idle_clients = "1,1000"
    args.scenario = args.scenario or list(TARGET_RATIOS)
    try:
        args.idle_clients = [int(n) for n in args.idle_clients.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--idle-clients: expected comma-separated counts, got {args.idle_clients!r}")
    if any(n < 1 for n in args.idle_clients) or args.runs < 1:
        parser.error("--runs and --idle-clients counts must be at least 1")
    if min(args.duration, args.cpu_duration, args.cpu_rate) <= 0 or args.warmup < 0:
        parser.error("--duration, --cpu-duration and --cpu-rate must be positive, "
                     "--warmup not negative")
    if args.stream_count < 1 or args.stream_size < 0:
        parser.error("--stream-count must be at least 1, --stream-size at least 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="grpc-bench-"))
    started = time.time()
    report = {
        "command": " ".join(["python", "benchmarks/grpc_bench.py", *(argv or sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
                    "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    stack = None
    try:
        stack = Stack(args, workdir, build_programs())
        report["processes"] = stack.pids
        report["modes"] = stack.modes
        report["throughput"] = measure_throughput(stack, args)
        report["cpu"] = measure_cpu(stack, args)
        if args.idle_clients:
            report["memory"] = measure_memory(stack, args)
    except BenchError as error:
        print(f"grpc_bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if stack is not None:
            stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["seconds"] = time.time() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(render(report))
    print(f"\n{report['command']}: {report['seconds']:.0f}s, load average "
          f"{report['machine']['loadavg_start'][0]:.2f} -> {report['machine']['loadavg_end'][0]:.2f}"
          f" on {os.cpu_count()} CPUs; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
