"""Command line: run the app (single process or with workers), list routes, publish a test message."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from core.foundation.config import Settings

HELP_EPILOG = """\
commands:
  run (default)          serve the routes in app/routers
  routes                 print the route table
  publish TOPIC PAYLOAD  publish one message (for manual checks)
  asyncapi               write an AsyncAPI 3.0 document of the routes (JSON or YAML)

examples:
  python main.py                      # single process; embedded broker unless MQTT_BROKER is set
  python main.py --workers            # supervisor + worker processes for the shared routes: as many as the
                                      # largest worker_count of a shared route (each route on exactly its
                                      # worker_count workers); one per CPU core if none sets it above 1
  python main.py --workers 4          # four worker processes, each subscribed to every shared route
  WORKER_AUTO_SCALE=true python main.py --workers
                                      # grow and shrink the workers with the load, between
                                      # WORKER_MIN_COUNT and WORKER_MAX_COUNT (docs/workers.md)
  python main.py routes
  python main.py publish devices/42/status '{"state": "on"}' --qos 1
  python main.py asyncapi --format yaml -o asyncapi.yaml

Configuration comes from environment variables and .env; see .env.example and README.md.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py", description="MQTT application framework: routes MQTT topics to controllers.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=HELP_EPILOG,
    )
    parser.add_argument("command", nargs="?", default="run", choices=("run", "routes", "publish", "asyncapi"), help="what to do (default: run)")
    parser.add_argument("args", nargs="*", help="for publish: TOPIC PAYLOAD")
    parser.add_argument("--workers", nargs="?", const=0, type=int, metavar="N",
                        help="run shared routes in N worker processes, each on every shared route (WORKER_COUNT also sets "
                             "N). No N: the largest worker_count of the shared routes, worker i on the routes with "
                             "worker_count > i; one per CPU core if no shared route sets worker_count above 1")
    parser.add_argument("--test-mode", action="store_true",
                        help="handle what is available and exit 0 after TEST_MODE_IDLE seconds without messages")
    parser.add_argument("--debug", action="store_true", help="log at DEBUG level (overrides LOG_LEVEL)")
    parser.add_argument("--env-file", default=".env", help="dotenv file to read (default: .env; real environment wins)")
    parser.add_argument("--qos", type=int, default=0, choices=(0, 1, 2), help="for publish: QoS (default 0)")
    parser.add_argument("--retain", action="store_true", help="for publish: set the retain flag")
    parser.add_argument("--format", dest="doc_format", default="json", choices=("json", "yaml"),
                        help="for asyncapi: output format (default json)")
    parser.add_argument("-o", "--output", metavar="FILE", help="for asyncapi: write to FILE instead of stdout")
    parser.add_argument("--api-version", default="1.0.0", metavar="VERSION",
                        help="for asyncapi: the document's info.version (default 1.0.0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.foundation.config import ConfigError, load_settings_from_environment
    from core.foundation.logging_setup import setup_logging

    try:
        settings = load_settings_from_environment(args.env_file)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.debug:
        settings = settings.with_overrides(log_level="DEBUG")
        os.environ["LOG_LEVEL"] = "DEBUG"  # worker processes read the environment
    setup_logging(settings.log_level, settings.log_format, "main")
    port_was_set = bool(os.environ.get("EMBEDDED_BROKER_PORT", "").strip())

    if args.command == "publish":
        from core.operations.cli_tools import publish_once

        if len(args.args) != 2:
            print("usage: python main.py publish TOPIC PAYLOAD [--qos N] [--retain]", file=sys.stderr)
            return 2
        if settings.uses_embedded_broker and not port_was_set:
            settings = embedded_broker_for_publish(settings)
        return publish_once(settings, args.args[0], args.args[1], args.qos, args.retain)

    if args.command == "routes":
        from core.operations.cli_tools import routes_command

        return routes_command(settings)  # listing is not serving: stream routes need no ENABLE_REDIS here

    if args.command == "asyncapi":
        from core.operations.cli_tools import asyncapi_command

        return asyncapi_command(settings, args.doc_format, args.output, args.api_version)

    from bootstrap.app import Application, DiscoveryError, serve_single_process
    from core.router import RouteError

    try:
        app = Application.load(settings)
    except (RouteError, DiscoveryError) as exc:
        print(f"route error: {exc}", file=sys.stderr)
        return 2

    from bootstrap.app import choose_embedded_broker_port
    from core.transport.embedded_broker import EmbeddedBrokerError
    from core.operations.http import OpsServerError

    if settings.uses_embedded_broker:
        settings = choose_embedded_broker_port(settings, port_was_set)
        os.environ["EMBEDDED_BROKER_PORT"] = str(settings.embedded_broker_port)  # for worker processes
        app.settings = settings

    workers = args.workers
    # `--workers` without N (0) also takes WORKER_COUNT, so `CMD ["python", "main.py", "--workers"]`
    # in an image is sized by the environment (in a container the CPU count is the node's).
    if not workers and settings.worker_count is not None and app.shared_routes():
        workers = settings.worker_count
    from bootstrap.app import exit_past_stuck_threads

    try:
        if workers is not None:
            from core.processes.supervisor import run_supervisor

            from core.operations.http import supervisor_services

            code = run_supervisor(app, workers=workers or None, test_mode=args.test_mode, env_file=args.env_file,
                                  services=supervisor_services(settings))
        else:
            code = asyncio.run(serve_single_process(app, test_mode=args.test_mode))
        # A plain handler stuck in the thread pool would otherwise keep the process from exiting.
        return exit_past_stuck_threads(code)
    except (EmbeddedBrokerError, OpsServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RouteError as exc:  # a route that cannot work with this many workers (e.g. ordered=True)
        print(f"route error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def embedded_broker_for_publish(settings: "Settings") -> "Settings":
    """`publish` without MQTT_BROKER: an app's embedded broker on the fallback port if one listens there."""
    import socket

    from bootstrap.app import EMBEDDED_FALLBACK_PORT

    try:
        with socket.create_connection((settings.embedded_broker_host, EMBEDDED_FALLBACK_PORT), timeout=0.5):
            return settings.with_overrides(embedded_broker_port=EMBEDDED_FALLBACK_PORT)
    except OSError:
        return settings


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
