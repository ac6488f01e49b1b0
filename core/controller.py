"""`from core.controller import Controller`: the public path of the controller base class (`core.routing.controller`)."""

from core.routing.controller import Controller

__all__ = ["Controller"]
