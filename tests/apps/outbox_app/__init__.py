"""Test app for the transactional outbox (tests/integration/test_outbox.py, bench/bench_outbox.py)."""
