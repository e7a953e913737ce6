"""yamux echo throughput over loopback TCP between two processes.

Pairs: Python<->Python, Python<->Go (both ways round) and Go<->Go, where Go is
the reference peer tests/interop/yamuxpeer (Debian's 2019 hashicorp/yamux),
built with tests/interop/gobuild.py. The driver opens the streams, sends the
payload, half-closes and verifies the echo byte for byte; MB/s is payload
bytes sent per second of the driver's wall time (10**6 bytes; every byte also
travels back), the median over several runs.  Both drivers do the same work:
the payload is slices of one seeded pseudo-random block (a per-stream offset)
and the echo is compared slice by slice (memcmp) against it.  (Until
2026-11-24 the Go driver generated every byte with math/rand on both sides and
compared byte by byte, which capped Go <-> Go near 350 MB/s.)  Remaining
differences, both small: the Go driver stops its clock at the last echoed byte,
the Python one at the echo's FIN; the Go driver polls for the tail of the echo
after its Close (a workaround for the 2019 yamux snapshot), with sleeps of up
to 2 ms.  Both CLIs send DATA frames as large as the window.

Runs are interleaved (every pair once per round), so a burst of load from
other processes hits all pairs alike.  The table is printed and written with
a JSON file of every figure (--out, default benchmarks/results/), together
with the command line and the load average before and after.

    python benchmarks/yamux_throughput.py [--runs 5] [--single-mib 64] [--multi-mib 8]
        [--pairs py-py,py-go,go-py,go-go] [--out DIR]
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "interop"))

import gobuild  # noqa: E402  (lives with the Go sources)

PYTHON = [sys.executable, "-m", "grpcmux.yamux"]
TIMEOUT = 600
MiB = 1024 * 1024


def run_once(echo_cmd, drive_cmd, streams, size):
    """One echo/drive pair; returns the driver's JSON result."""
    echo = subprocess.Popen(
        [*echo_cmd, "echo", "--listen", "127.0.0.1:0", "--role", "server"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        address = echo.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"{echo_cmd} echo printed no address")
        done = subprocess.run(
            [*drive_cmd, "drive", "--connect", address, "--role", "client",
             "--streams", str(streams), "--bytes", str(size)],
            cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
        )
        if done.returncode != 0:
            raise RuntimeError(f"drive failed ({done.returncode}): {done.stdout}{done.stderr}")
        echo.wait(TIMEOUT)
        return json.loads(done.stdout)
    finally:
        if echo.poll() is None:
            echo.kill()
            echo.wait()
        echo.stdout.close()


PAIRS = {
    # key: (label, echo side, drive side)
    "py-py": ("Python <-> Python", "python", "python"),
    "py-go": ("Python echo <- Go drive", "python", "go"),
    "go-py": ("Go echo <- Python drive", "go", "python"),
    "go-go": ("Go <-> Go", "go", "go"),
}


def _pair_keys(text):
    keys = [key.strip() for key in text.split(",") if key.strip()]
    unknown = [key for key in keys if key not in PAIRS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"pairs are a comma list of {', '.join(PAIRS)}")
    return keys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--single-mib", type=int, default=64, help="MiB on the single stream")
    parser.add_argument("--multi-mib", type=int, default=8, help="MiB on each of the 16 streams")
    parser.add_argument("--pairs", type=_pair_keys, default=list(PAIRS),
                        help="comma list of " + ",".join(PAIRS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="directory for the .txt table and .json figures")
    args = parser.parse_args(argv)

    commands = {"python": PYTHON, "go": [str(gobuild.build("yamuxpeer"))]}
    shapes = [("1 stream", 1, args.single_mib * MiB), ("16 streams", 16, args.multi_mib * MiB)]
    command = "cd " + shlex.quote(str(REPO)) + " && " + " ".join(shlex.quote(part) for part in [
        "python", "benchmarks/yamux_throughput.py", "--runs", str(args.runs),
        "--single-mib", str(args.single_mib), "--multi-mib", str(args.multi_mib),
        "--pairs", ",".join(args.pairs)])
    load_before = os.getloadavg()
    started = time.time()

    rates = {(key, shape): [] for key in args.pairs for shape, _, _ in shapes}
    for _ in range(args.runs):
        for key in args.pairs:
            _, echo_side, drive_side = PAIRS[key]
            for shape, streams, size in shapes:
                result = run_once(commands[echo_side], commands[drive_side], streams, size)
                rates[key, shape].append(result["mb_per_s"])

    lines = [
        f"reproduce: {command}",
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))}, "
        f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after",
        f"median MB/s (10**6 payload bytes per second, echoed back) over {args.runs} runs;"
        " min..max in brackets",
    ]
    header = f"{'pair':<26}" + "".join(f"{name:>26}" for name, _, _ in shapes)
    lines += [header, "-" * len(header)]
    for key in args.pairs:
        cells = []
        for shape, _, _ in shapes:
            values = rates[key, shape]
            cells.append(
                f"{statistics.median(values):8.1f} [{min(values):6.1f}..{max(values):6.1f}]")
        lines.append(f"{PAIRS[key][0]:<26}" + "".join(f"{cell:>26}" for cell in cells))
    table = "\n".join(lines)
    print(table, flush=True)

    figures = {
        "command": command,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "runs": args.runs,
        "unit": "MB/s (10**6 payload bytes per second)",
        "results": [
            {"pair": PAIRS[key][0], "key": key, "shape": shape, "streams": streams,
             "bytes_per_stream": size, "mb_per_s": rates[key, shape],
             "median": statistics.median(rates[key, shape])}
            for key in args.pairs for shape, streams, size in shapes
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("yamux_throughput-" + time.strftime("%Y%m%dT%H%M%SZ",
                                                            time.gmtime(started)))
    stem.with_suffix(".txt").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {stem}.txt and {stem}.json")


if __name__ == "__main__":
    main()
