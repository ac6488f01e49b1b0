"""Test app for tests/integration/test_poison.py: one route whose handler may raise a multi-line error."""
