"""`RouterRegistry`: RouteMQ's name for loading every router of a package into one.

```python
router = RouterRegistry("app.routers").discover_and_load_routers()
```

It does what startup does (`core.routing.discovery.discover_routers` and `merge_routers`), so the routes and
their checks are the same. Unlike RouteMQ's, it does not fall back to an empty router: a package or
module that cannot be imported raises `DiscoveryError`, a bad route `RouteError`.
"""

from __future__ import annotations

from core.routing.discovery import discover_routers
from core.routing.router import Router, merge_routers


class RouterRegistry:
    """Discovers the modules of `router_directory` (a package name) that define `router`."""

    def __init__(self, router_directory: str = "app.routers") -> None:
        self.router_directory = router_directory

    def discover_and_load_routers(self) -> Router:
        """One router with the routes of every module of the package, in module name order."""
        return merge_routers(discover_routers(self.router_directory))
