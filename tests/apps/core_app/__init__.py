"""Test app for the core runtime suites (tests/integration/test_faults.py, test_cli.py)."""
