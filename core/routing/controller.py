"""The base class users extend for their controllers.

A controller is a namespace for handlers: usually `@staticmethod async def` methods whose
argument names select what the framework passes (route parameters by name, plus `payload`,
`topic`, `client` and `context`). See `core.routing.handler` for the binding rules.
"""

from __future__ import annotations

import logging


class Controller:
    """Base class for controllers; gives each subclass a logger named after it."""

    logger: logging.Logger = logging.getLogger("app.controllers")

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.logger = logging.getLogger(f"app.controllers.{cls.__name__}")
