"""Run every framework benchmark, one after the other, and print their tables as one markdown text.

Run:  .venv/bin/python -m bench.run_all [--quick] [--only core,routing,workers]

Each benchmark runs in its own interpreter (so one's memory and threads do not weigh on the
next); their progress lines go to stderr, the tables to stdout. ``--quick`` uses small counts and
one repeat: a check that everything runs, not numbers to publish.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BENCHMARKS: dict[str, tuple[str, str, list[str]]] = {
    # name: (title, module, arguments for --quick)
    "core": ("Framework vs raw paho", "bench.bench_core",
             ["--count", "2000", "--live-count", "500", "--repeat", "1"]),
    "routing": ("Route matching", "bench.bench_routing", ["--runs", "1", "--repeat", "5"]),
    "workers": ("Worker scaling", "bench.bench_workers",
                ["--count", "1000", "--live-count", "300", "--repeat", "1"]),
    "fleet": ("Fleet: pods going away", "bench.bench_fleet",
              ["--repeat", "1", "--grace", "2", "--tail", "6", "--count", "600", "--rate", "100"]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one repeat")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    failed = []
    for name in chosen:
        title, module, quick = BENCHMARKS[name]
        print(f"== {name} ==", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", module, *(quick if args.quick else [])], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True)
        print(f"## {title}\n\n{proc.stdout.strip()}\n", flush=True)
        if proc.returncode != 0:
            failed.append(f"{name} (exit {proc.returncode})")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
