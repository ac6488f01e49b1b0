"""Small apps the benchmarks run with `python main.py` (selected with ROUTERS_PACKAGE)."""
