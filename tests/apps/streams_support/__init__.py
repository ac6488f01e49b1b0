"""Helpers shared by the stream and outbox integration tests and benchmarks."""
