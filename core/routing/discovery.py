"""Finding an app's routers: every module of a package (ROUTERS_PACKAGE, e.g. `app.routers`) that defines `router`."""

from __future__ import annotations

import importlib
import pkgutil

from core.routing.router import Router, RouteError


class DiscoveryError(RuntimeError):
    """A router module could not be imported or exposes something that is not a Router."""


def discover_routers(package: str) -> list[tuple[str, Router]]:
    """Import every module of `package` (e.g. `app.routers`) that defines `router`, in name order."""
    try:
        pkg = importlib.import_module(package)
    except ImportError as exc:
        raise DiscoveryError(f"ROUTERS_PACKAGE={package!r}: cannot import it: {exc}") from exc
    found: list[tuple[str, Router]] = []
    paths = getattr(pkg, "__path__", None)
    modules = [package] if paths is None else [f"{package}.{m.name}" for m in sorted(pkgutil.iter_modules(paths), key=lambda m: m.name)]
    for name in modules:
        try:
            module = importlib.import_module(name)
        except RouteError:
            raise
        except Exception as exc:
            raise DiscoveryError(f"router module {name}: import failed: {type(exc).__name__}: {exc}") from exc
        router = getattr(module, "router", None)
        if router is None:
            continue
        if not isinstance(router, Router):
            raise DiscoveryError(f"router module {name}: `router` is a {type(router).__name__}, not a core.routing.router.Router")
        if any(router is seen for _, seen in found):
            continue  # a module that imported another module's router to extend it: merge it once
        found.append((name, router))
    return found
