"""Test app for Redis Streams (tests/integration/test_streams.py, bench/bench_streams.py)."""
