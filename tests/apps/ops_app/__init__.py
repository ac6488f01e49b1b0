"""A small app for the operations tests: validated, rate-limited, failing and plain routes."""
