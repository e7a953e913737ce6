"""gRPC through grpcmux vs. direct: the benchmark suite (issue #7).

    python benchmarks/grpc_bench.py            # full run (~4 minutes)
    python benchmarks/grpc_bench.py --quick    # fewer, shorter runs (< 2 minutes)

Starts, each in its own process on loopback: the echo backend
(``echo_backend.py``, grpcmux.v1.BenchService on grpc.aio), the real ``twistd
grpcmux-server`` and ``twistd grpcmux-client`` (client id ``bench``), and the load
generator(s) (``loadgen.py``, grpc.aio).  Every throughput scenario is measured
directly against the backend and through grpcmux's proxy endpoint, alternating
(the order flips every run), ``--runs`` times; the table shows medians and the
ratio proxied/direct next to the Go original's ratio (the issue's targets).
Then the CPU cost of the grpcmux processes per 1,000 calls at a fixed call rate,
and the server's memory with idle clients connected by ``crowd.py``.

``--stage`` adds a third way to every measurement: through the proxy stage alone
(``proxy_stage.py``: the same ProxyService, routing straight to the backend's
UNIX socket, no tunnel).  It shows what terminating each call in grpcio costs by
itself, against what the whole tunnel costs.

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
import sys
import tempfile
import time
from pathlib import Path

from _procs import BenchError, Child, children, cpu_seconds, rss_kib, twistd

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024
TIMEOUT = 60.0
# The Go original's ratios proxied/direct (issue #7); grpcmux must beat each.
GO_RATIOS = {"unary_c1": 0.15, "unary_c32": 0.14, "server_stream": 0.20,
             "client_stream": 0.18, "bidi_pingpong": 0.17}
GO_CPU_MS_PER_CALL = 0.7
GO_KIB_PER_IDLE_CLIENT = 140
# Streaming throughput must also reach this fraction of direct.
STREAMING_FLOOR = 0.5


def scenarios(args):
    """name -> (loadgen job fields, headline metric, unit)."""
    stream = {"count": args.stream_count, "size": args.stream_size}
    return {
        "unary_c1": ({"scenario": "unary", "concurrency": 1, "size": 100}, "rate", "calls/s"),
        "unary_c32": ({"scenario": "unary", "concurrency": 32, "size": 100}, "rate", "calls/s"),
        "server_stream": ({"scenario": "server_stream", "concurrency": 1, **stream},
                          "mb_per_s", "MB/s"),
        "client_stream": ({"scenario": "client_stream", "concurrency": 1, **stream},
                          "mb_per_s", "MB/s"),
        "bidi_pingpong": ({"scenario": "bidi", "concurrency": 1, "size": 100},
                          "rate", "round trips/s"),
    }


class Stack:
    """The processes under test, started on loopback; ``stop()`` ends them all."""

    def __init__(self, args, workdir):
        self.args = args
        self.children = []
        try:
            self._launch(args, workdir)
        except BaseException:
            self.stop()  # the ones started so far: a failed start leaves nothing running
            raise

    def _launch(self, args, workdir):
        backend_socket = workdir / "backend.sock"
        self.backend = self._start(Child("backend", [sys.executable, HERE / "echo_backend.py",
                                                     "--unix", backend_socket]))
        port = self.backend.read_until(lambda l: l.startswith("listening "), TIMEOUT).split()[1]
        self.backend_address = f"127.0.0.1:{port}"
        self.stage = self.stage_address = None
        if args.stage:
            self.stage = self._start(Child("stage", [sys.executable, HERE / "proxy_stage.py",
                                                     "--socket", backend_socket]))
            port = self.stage.read_until(lambda l: l.startswith("listening "), TIMEOUT).split()[1]
            self.stage_address = f"127.0.0.1:{port}"
        server_argv = ["grpcmux-server", "--multiplexer-listener", "127.0.0.1:0",
                       "--proxy-listener", "127.0.0.1:0", "--runtime-dir", workdir / "run",
                       *args.server_arg]
        self.server = self._start(twistd("grpcmux-server", *server_argv))
        mux = _event(self.server, "multiplexer endpoint listening")
        proxy = _event(self.server, "proxy endpoint listening")
        self.multiplexer_address = mux["address"]
        self.proxy_address = f"127.0.0.1:{proxy['port']}"
        self.client = self._start(twistd(
            "grpcmux-client", "grpcmux-client", "--client-id", "bench",
            "--multiplexer-address", self.multiplexer_address,
            "--grpc-server-address", self.backend_address))
        _event(self.client, "connected to multiplexer")
        self.loadgens = [self._start(Child(f"loadgen-{i}", [sys.executable, HERE / "loadgen.py"]))
                         for i in range(args.load_procs)]
        for loadgen in self.loadgens:
            loadgen.read_until(lambda l: l == "ready", TIMEOUT)
        self.pids = {child.name: child.pid for child in self.children}
        _progress(f"processes: {self.pids}")

    def _start(self, child):
        self.children.append(child)
        return child

    @property
    def modes(self):
        """The ways every scenario is measured: direct, proxied and perhaps stage."""
        return ("direct", "proxied", "stage") if self.stage else ("direct", "proxied")

    def target(self, mode):
        if mode == "direct":
            return {"target": self.backend_address, "metadata": []}
        address = self.stage_address if mode == "stage" else self.proxy_address
        return {"target": address, "metadata": [["client-id", "bench"]]}

    def run_job(self, job):
        """Run ``job`` on the load generators at once, its concurrency (or rate) split
        between them; each has its own connection, so with proxy workers the calls
        can reach more than one worker."""
        loadgens = self.loadgens[:job.get("concurrency", len(self.loadgens))]
        n = len(loadgens)
        for i, loadgen in enumerate(loadgens):
            part = dict(job)
            if "rate" in job:
                part["rate"] = job["rate"] / n
            else:
                part["concurrency"] = job["concurrency"] // n + (i < job["concurrency"] % n)
            loadgen.send(json.dumps(part))
        results = []
        for loadgen in loadgens:
            result = json.loads(loadgen.read_until(lambda l: l.startswith("{"),
                                                   job["duration"] + job["warmup"] + TIMEOUT))
            if "error" in result:
                raise BenchError(f"{loadgen.name}: {result['error']}")
            results.append(result)
        latencies = sorted(x for r in results for x in r["latencies"])
        elapsed = max(r["elapsed"] for r in results)
        calls = sum(r["calls"] for r in results)
        return {
            "calls": calls,
            "rate": calls / elapsed,
            "mb_per_s": sum(r["bytes"] for r in results) / elapsed / 1e6,
            "p50_ms": _percentile(latencies, 50) * 1e3,
            "p99_ms": _percentile(latencies, 99) * 1e3,
        }

    def stop(self):
        for child in reversed(self.children):
            child.stop()


def _event(child, text):
    def matches(line):
        # With --proxy-workers the server's log also holds the workers' own lines,
        # relayed with their pid ("proxy worker <pid>: ..."): not the server's event.
        if not line.startswith("{"):
            return False
        record = json.loads(line)
        return text in record["message"] and "worker_pid" not in record

    line = child.read_until(matches, TIMEOUT)
    return json.loads(line)


def _percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))]


def measure_throughput(stack, args):
    """Every scenario in every mode, the order rotating, ``args.runs`` times."""
    table = scenarios(args)
    runs = {name: {mode: [] for mode in stack.modes} for name in table if name in args.scenario}
    for run in range(args.runs):
        shift = run % len(stack.modes)
        modes = stack.modes[shift:] + stack.modes[:shift]
        for name in runs:
            job, _, _ = table[name]
            for mode in modes:
                result = stack.run_job({**job, **stack.target(mode),
                                        "duration": args.duration, "warmup": args.warmup})
                runs[name][mode].append(result)
                _progress(f"run {run + 1}/{args.runs} {name} {mode}: "
                          f"{result['rate']:.0f}/s {result['mb_per_s']:.1f} MB/s "
                          f"p50 {result['p50_ms']:.2f} ms")
    out = {}
    for name, by_mode in runs.items():
        _, metric, unit = table[name]
        entry = {"metric": metric, "unit": unit, "target_ratio": GO_RATIOS[name]}
        for mode, results in by_mode.items():
            entry[mode] = {key: statistics.median(r[key] for r in results)
                           for key in ("rate", "mb_per_s", "p50_ms", "p99_ms")}
            entry[mode]["runs"] = results
        entry["ratio"] = entry["proxied"][metric] / entry["direct"][metric]
        if "stage" in by_mode:
            entry["stage_ratio"] = entry["stage"][metric] / entry["direct"][metric]
        entry["beats_go"] = entry["ratio"] > GO_RATIOS[name]
        if metric == "mb_per_s":
            entry["half_of_direct"] = entry["ratio"] >= STREAMING_FLOOR
        out[name] = entry
    return out


def measure_cpu(stack, args):
    """CPU ms per call at a fixed rate: the backend direct, grpcmux's two processes
    proxied, the proxy stage's process alone with --stage; in every mode also the
    load generators' own cost (``caller_ms_per_call``), the price of a gRPC client call."""
    job = {"scenario": "unary", "size": 100, "rate": args.cpu_rate,
           "duration": args.cpu_duration, "warmup": args.warmup}
    out = {"rate": args.cpu_rate, "unit": "ms CPU per call (= s per 1,000 calls)",
           "target_ms": GO_CPU_MS_PER_CALL}
    # With --proxy-workers the server's child processes do the proxy's gRPC work.
    workers = {f"worker{i}": pid for i, pid in enumerate(children(stack.server.pid))}
    pids_by_mode = {"direct": {"backend": stack.backend.pid},
                    "proxied": {"server": stack.server.pid, "client": stack.client.pid,
                                **workers}}
    if stack.stage:
        pids_by_mode["stage"] = {"stage": stack.stage.pid}
    callers = {loadgen.name: loadgen.pid for loadgen in stack.loadgens}
    for mode, pids in pids_by_mode.items():
        before = {name: cpu_seconds(pid) for name, pid in {**pids, **callers}.items()}
        # The warm-up burns CPU too: count it in the calls (warm-up + measured).
        result = stack.run_job({**job, **stack.target(mode)})
        spent = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        calls = result["calls"] + int(args.cpu_rate * args.warmup)
        caller_seconds = sum(cpu_seconds(pid) - before[name] for name, pid in callers.items())
        entry = {f"{name}_ms_per_call": seconds * 1e3 / calls for name, seconds in spent.items()
                 if not name.startswith("worker")}
        if mode == "proxied" and workers:
            entry["workers_ms_per_call"] = sum(spent[name] for name in workers) * 1e3 / calls
        entry["ms_per_call"] = sum(spent.values()) * 1e3 / calls
        entry["caller_ms_per_call"] = caller_seconds * 1e3 / calls
        entry["achieved_rate"] = result["rate"]
        entry["p50_ms"] = result["p50_ms"]
        out[mode] = entry
        _progress(f"cpu at {args.cpu_rate}/s {mode}: {entry['ms_per_call']:.3f} ms/call")
    return out


def measure_memory(stack, args):
    """Server RSS (plus its proxy workers', if any) with 1 (the bench client) and more
    idle clients, and the time they took to connect and register."""
    # Each client holds two descriptors in the server (its TCP connection and its
    # bridge's UNIX listener), whose open-file limit is raised to the hard one: count
    # only as many clients as that allows, and say so.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd_cap = (hard - 200) // 2
    levels = sorted(set(min(level, fd_cap) for level in args.idle_clients))
    if levels[-1] < max(args.idle_clients):
        _progress(f"memory: at most {fd_cap} clients fit in the open-file limit {hard}")
    out = {"unit": "KiB", "target_kib_per_client": GO_KIB_PER_IDLE_CLIENT,
           "requested": args.idle_clients, "fd_limit": hard, "levels": []}
    crowd = stack._start(Child("crowd", [sys.executable, HERE / "crowd.py",
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
        listed = _listed_clients(stack.proxy_address)
        out["levels"].append({"clients": level, "listed": listed,
                              "server_rss_kib": rss_kib(stack.server.pid),
                              # --proxy-workers: each keeps a copy of the registry
                              "workers_rss_kib": sum(rss_kib(pid) for pid in
                                                     children(stack.server.pid)),
                              "connect_seconds": connect_seconds})
        _progress(f"memory: {level} clients ({listed} listed): "
                  f"{out['levels'][-1]['server_rss_kib']} KiB, connected in {connect_seconds:.1f}s")
    first, last = out["levels"][0], out["levels"][-1]
    if last["clients"] > first["clients"]:
        out["kib_per_idle_client"] = (
            (last["server_rss_kib"] + last["workers_rss_kib"]
             - first["server_rss_kib"] - first["workers_rss_kib"])
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


def render(report):
    """The results as a fixed-width text table (stage columns only with --stage)."""
    stage = "stage" in report["processes"]
    extra = ("stage", "ratio") if stage else ()
    rows = [("scenario", "metric", "direct", "proxied", "ratio", "Go ratio", *extra)]

    def row(*cells, stage_cells=("", "")):
        rows.append((*cells, *(stage_cells if stage else ())))

    for name, entry in report["throughput"].items():
        metric = entry["metric"]
        d, p = entry["direct"], entry["proxied"]
        row(name, entry["unit"], f"{d[metric]:.1f}", f"{p[metric]:.1f}",
            f"{entry['ratio']:.2f}x", f"{entry['target_ratio']:.2f}x",
            stage_cells=stage and (f"{entry['stage'][metric]:.1f}", f"{entry['stage_ratio']:.2f}x"))
        if name in ("unary_c1", "unary_c32", "bidi_pingpong"):
            for key in ("p50_ms", "p99_ms"):
                row("", key.replace("_ms", " ms"), f"{d[key]:.2f}", f"{p[key]:.2f}", "", "",
                    stage_cells=stage and (f"{entry['stage'][key]:.2f}", ""))
    cpu = report.get("cpu")
    if cpu:
        row(f"cpu @ {cpu['rate']}/s", "ms CPU/call", f"{cpu['direct']['ms_per_call']:.3f}",
            f"{cpu['proxied']['ms_per_call']:.3f}", "", f"{cpu['target_ms']} ms",
            stage_cells=stage and (f"{cpu['stage']['ms_per_call']:.3f}", ""))
        proxied = cpu["proxied"]
        parts = [("server", proxied["server_ms_per_call"])]
        if "workers_ms_per_call" in proxied:
            parts.append(("workers", proxied["workers_ms_per_call"]))
        parts.append(("client", proxied["client_ms_per_call"]))
        row("", "  " + " / ".join(name for name, _ in parts), "",
            " / ".join(f"{ms:.3f}" for _, ms in parts), "", "")
        row("", "  caller (load generator)", f"{cpu['direct']['caller_ms_per_call']:.3f}",
            f"{proxied['caller_ms_per_call']:.3f}", "", "",
            stage_cells=stage and (f"{cpu['stage']['caller_ms_per_call']:.3f}", ""))
    memory = report.get("memory")
    if memory:
        for level in memory["levels"]:
            workers = (f" + {level['workers_rss_kib'] / 1024:.1f}"
                       if level["workers_rss_kib"] else "")
            row("memory", f"{level['clients']} idle clients", "",
                f"{level['server_rss_kib'] / 1024:.1f}{workers} MiB", "",
                f"connected in {level['connect_seconds']:.1f}s")
        if "kib_per_idle_client" in memory:
            row("", "KiB per idle client", "", f"{memory['kib_per_idle_client']:.1f}",
                "", f"{memory['target_kib_per_client']} KiB")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2 runs of 1 s, 2 s at the fixed rate, up to 1,000 idle clients")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before each")
    parser.add_argument("--scenario", action="append", choices=list(GO_RATIOS),
                        help="run only these throughput scenarios (repeatable)")
    parser.add_argument("--stream-count", type=int, default=16, help="messages per streaming call")
    parser.add_argument("--stream-size", type=int, default=MIB, help="bytes per streamed message")
    parser.add_argument("--cpu-rate", type=float, default=500.0, help="calls/s for the CPU cost")
    parser.add_argument("--cpu-duration", type=float, default=5.0)
    parser.add_argument("--idle-clients", default="1,1000,10000",
                        help="comma-separated idle-client counts for the memory figures "
                             "('' skips them)")
    parser.add_argument("--load-procs", type=int, default=1, help="load generator processes")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra flag for grpcmux-server (repeatable, e.g. "
                             "--server-arg=--proxy-workers=2)")
    parser.add_argument("--stage", action="store_true",
                        help="also measure the proxy stage alone (proxy_stage.py)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "grpc_bench.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.duration, args.cpu_duration = 2, 1.0, 2.0
        if args.idle_clients == "1,1000,10000":
            args.idle_clients = "1,1000"
    args.scenario = args.scenario or list(GO_RATIOS)
    try:
        args.idle_clients = [int(n) for n in args.idle_clients.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--idle-clients: expected comma-separated counts, got {args.idle_clients!r}")
    if any(n < 1 for n in args.idle_clients) or args.runs < 1 or args.load_procs < 1:
        parser.error("--runs, --load-procs and --idle-clients counts must be at least 1")
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
        stack = Stack(args, workdir)
        report["processes"] = stack.pids
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
