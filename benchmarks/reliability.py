"""Run the reliability scenarios (faults and load, real processes on loopback) and
print their figures as a table.

    python3 benchmarks/reliability.py                 # every scenario, full counts
    python3 benchmarks/reliability.py client_killed many_clients --scale 0.1

The scenarios are those of the tests (``tests/reliability_kit/scenarios.py``);
``--scale`` multiplies the load counts (clients, streams, cycles, calls).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from twisted.internet import defer, task  # noqa: E402

from reliability_kit import scenarios  # noqa: E402
from reliability_kit.scenarios import LOAD_COUNTS  # noqa: E402

FAULTS = ["client_killed", "client_frozen", "link_blackholed", "server_restarted",
          "backend_restarted", "duplicate_takeover"]
LOADS = list(LOAD_COUNTS)


def _flatten(figures, prefix=""):
    for key, value in figures.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list) and len(value) > 5:
            yield f"{prefix}{key}", f"[{len(value)} items]"
        elif isinstance(value, float):
            yield f"{prefix}{key}", f"{value:.3f}"
        else:
            yield f"{prefix}{key}", str(value)


def _short(text, width=72):
    return text if len(text) <= width else text[:width - 3] + "..."


def print_table(results):
    rows = [(name, key, _short(value)) for name, figures in results
            for key, value in _flatten(figures)]
    widths = [max(len(row[i]) for row in rows + [("scenario", "figure", "value")])
              for i in range(3)]
    line = "  ".join("=" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(("scenario", "figure", "value"), widths)))
    print(line)
    previous = None
    for name, key, value in rows:
        shown = name if name != previous else ""
        previous = name
        print("  ".join(v.ljust(w) for v, w in zip((shown, key, value), widths)).rstrip())
    print(line)


async def run(reactor, names, scale, as_json):
    results = []
    for name in names:
        kwargs = {key: max(1, int(value * scale))
                  for key, value in LOAD_COUNTS.get(name, {}).items()}
        with tempfile.TemporaryDirectory(prefix="grpcmux-reliability-") as workdir:
            started = time.monotonic()
            figures = await getattr(scenarios, name)(reactor, Path(workdir), **kwargs)
        figures["scenario_s"] = time.monotonic() - started
        results.append((name, figures))
        print(f"{name}: done in {figures['scenario_s']:.1f}s", file=sys.stderr)
    if as_json:
        print(json.dumps({name: figures for name, figures in results}, default=str, indent=1))
    else:
        print_table(results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="*",
                        help="scenarios to run (default: all): " + ", ".join(FAULTS + LOADS))
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the load counts (default 1: the issue's counts)")
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    args = parser.parse_args()
    unknown = sorted(set(args.scenario) - set(FAULTS + LOADS))
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(FAULTS + LOADS)}")
    names = args.scenario or FAULTS + LOADS
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, names, args.scale,
                                                        args.json)))


if __name__ == "__main__":
    main()
