"""yamux echo throughput over loopback TCP between two processes.

Pairs: Python<->Python, Python<->Go (both ways round) and Go<->Go, where Go is
the reference peer tests/interop/yamuxpeer (Debian's 2019 hashicorp/yamux),
built with tests/interop/gobuild.py. The driver opens the streams, sends the
payload, half-closes and verifies the echo byte for byte; MB/s is payload
bytes sent per second of the driver's wall time (10**6 bytes; every byte also
travels back), the median over several runs.

    python benchmarks/yamux_throughput.py [--runs 5] [--single-mib 64] [--multi-mib 8]
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--single-mib", type=int, default=64, help="MiB on the single stream")
    parser.add_argument("--multi-mib", type=int, default=8, help="MiB on each of the 16 streams")
    args = parser.parse_args(argv)

    go = [str(gobuild.build("yamuxpeer"))]
    pairs = [
        ("Python <-> Python", PYTHON, PYTHON),
        ("Python echo <- Go drive", PYTHON, go),
        ("Go echo <- Python drive", go, PYTHON),
        ("Go <-> Go", go, go),
    ]
    shapes = [("1 stream", 1, args.single_mib * MiB), ("16 streams", 16, args.multi_mib * MiB)]
    print("reproduce: cd " + shlex.quote(str(REPO)) + " && " + " ".join(
        shlex.quote(part) for part in
        [sys.executable, "benchmarks/yamux_throughput.py", "--runs", str(args.runs),
         "--single-mib", str(args.single_mib), "--multi-mib", str(args.multi_mib)]))
    print(f"median MB/s (10**6 payload bytes per second, echoed back) over {args.runs} runs;"
          " min..max in brackets")
    header = f"{'pair':<26}" + "".join(f"{name:>26}" for name, _, _ in shapes)
    print(header)
    print("-" * len(header))
    for label, echo_cmd, drive_cmd in pairs:
        cells = []
        for _, streams, size in shapes:
            rates = [run_once(echo_cmd, drive_cmd, streams, size)["mb_per_s"]
                     for _ in range(args.runs)]
            cells.append(f"{statistics.median(rates):8.1f} [{min(rates):6.1f}..{max(rates):6.1f}]")
        print(f"{label:<26}" + "".join(f"{cell:>26}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
