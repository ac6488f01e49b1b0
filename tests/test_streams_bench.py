"""bench/bench_streams.py and bench/bench_outbox.py still run end to end with tiny counts (no speed asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _run(module: str, *args: str) -> list[list[str]]:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, f"{module} exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def test_bench_streams_prints_raw_stream_and_inline_rows() -> None:
    rows = _run("bench.bench_streams", "--count", "300", "--repeat", "1", "--workers", "1")
    assert [row[0] for row in rows[1:]] == ["raw redis-py pipelined XADD + XREADGROUP/XACK loop", "MQTT -> stream -> handler",
                                            "MQTT -> handler (inline, no Redis)"]
    assert all(float(row[2].replace(",", "")) > 0 for row in rows[1:])
    assert float(rows[2][4]) > 0  # the stream route against the inline one, same run


def test_bench_outbox_prints_a_row_per_database() -> None:
    rows = _run("bench.bench_outbox", "--count", "100", "--repeat", "1", "--concurrency", "10")
    assert [row[0] for row in rows[1:]] == ["sqlite", "postgresql"]
