"""Each benchmark in bench/ still runs end to end with tiny counts and prints its table.

Speed is not asserted here (that is what the benchmarks report); what is asserted is that every
message was handled and the markdown table came out, so the benchmarks do not rot.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import MOSQUITTO_BIN

ROOT = Path(__file__).resolve().parent.parent

needs_mosquitto = pytest.mark.skipif(not os.access(MOSQUITTO_BIN, os.X_OK) and os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
                                     reason=f"{MOSQUITTO_BIN} is not installed")


def run_bench(module: str, *args: str, timeout: float = 100) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"{module} exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def table_rows(output: str) -> list[list[str]]:
    """The cells of every markdown table row, separator rows left out."""
    rows = []
    for line in output.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[-:|]+\|", line):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_bench_routing_prints_a_row_per_size() -> None:
    out = run_bench("bench.bench_routing", "--sizes", "10,200", "--runs", "1", "--repeat", "2", "--topics", "50")
    rows = table_rows(out)
    assert rows[0][0] == "routes"
    assert [r[0] for r in rows[1:]] == ["10", "200"]
    # 9 of every 10 sampled topics hit exactly one route.
    assert all(r[-1] == "0.90" for r in rows[1:])
    assert "200 routes vs 10:" in out


def test_bench_status_page_prints_a_row_per_shape() -> None:
    out = run_bench("bench.bench_status_page", "--shapes", "2x1,3x2", "--points", "10")
    rows = table_rows(out)
    assert rows[0][:3] == ["routes", "workers", "points per line"]
    assert [r[:3] for r in rows[1:]] == [["2", "1", "10"], ["3", "2", "10"]]


@pytest.mark.integration
@needs_mosquitto
def test_bench_core_drains_everything_and_prints_ratios() -> None:
    out = run_bench("bench.bench_core", "--count", "300", "--live-count", "60", "--rate", "300", "--repeat", "1")
    assert "QoS 1 messages lost: 0." in out
    rows = {r[0]: r[1:] for r in table_rows(out)}
    assert rows["measurement"] == ["raw paho 3.1.1", "raw paho 5", "framework", "framework / raw 3.1.1",
                                   "framework / raw 5"]
    for label in ("QoS 1 drain, msgs/s", "QoS 0 live flood, received msgs/s", "QoS 1 latency p99, ms",
                  "RSS idle (subscribed), MB"):
        assert label in rows, f"row {label!r} missing from:\n{out}"
    drain = [float(cell.replace(",", "")) for cell in rows["QoS 1 drain, msgs/s"]]
    assert all(value > 0 for value in drain), drain  # three rates and both ratios
    assert float(rows["RSS idle (subscribed), MB"][2]) > 0


@pytest.mark.integration
@needs_mosquitto
def test_bench_workers_runs_one_and_two_workers() -> None:
    pytest.importorskip("core.worker_manager")
    out = run_bench("bench.bench_workers", "--count", "150", "--live-count", "30", "--rate", "100", "--repeat", "1",
                    "--work-ms", "0.2")
    rows = table_rows(out)
    assert rows[0][0] == "workers"
    by_workers = {r[0]: r for r in rows[1:]}
    assert set(by_workers) == {"1", "2"}
    assert by_workers["1"][3] == "100%"
    assert len(by_workers["2"][3].split(" / ")) == 2  # both workers took a share
    for row in by_workers.values():
        assert row[-1] == "0", f"the app did not exit 0: {row}"


@pytest.mark.integration
@needs_mosquitto
def test_bench_ordering_prints_both_handlers() -> None:
    out = run_bench("bench.bench_ordering", "--count", "200", "--topics", "5", "--repeat", "1")
    rows = {r[0]: r[1:] for r in table_rows(out)}
    assert set(rows) == {"handler", "trivial", "awaits 1 ms"}, out


@pytest.mark.integration
@needs_mosquitto
def test_bench_tracing_prints_costs_and_both_handlers() -> None:
    out = run_bench("bench.bench_tracing", "--count", "200", "--topics", "5", "--repeat", "1")
    rows = {r[0]: r[1:] for r in table_rows(out)}
    assert {"per message (no publish)", "trivial", "publishes one QoS 0 message"} <= set(rows), out


@pytest.mark.integration
@needs_mosquitto
def test_bench_fleet_measures_a_scale_down() -> None:
    out = run_bench("bench.bench_fleet", "--only", "scale-down", "--repeat", "1", "--grace", "2", "--tail", "4",
                    "--rate", "100")
    rows = {r[0]: r[1:] for r in table_rows(out)}
    wait, lost = rows["scale-down (SIGTERM)"][0], rows["scale-down (SIGTERM)"][1]
    assert lost == "0", out
    p50, worst = (float(x) for x in wait.split(" / "))
    assert 0 < p50 <= worst
