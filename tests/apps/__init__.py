"""Small apps that tests run as `python main.py` subprocesses (selected with ROUTERS_PACKAGE)."""
