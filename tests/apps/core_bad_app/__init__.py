"""A router package with a route error, for `python main.py routes` error reporting."""
