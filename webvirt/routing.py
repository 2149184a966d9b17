"""Route registration shared by the API modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web


def get_and_post(routes: web.RouteTableDef, path: str) -> Callable[[Any], Any]:
    """Register a handler for GET (Stream Deck buttons, the seed's style) and POST."""

    def register(handler: Any) -> Any:
        routes.get(path, allow_head=False)(handler)
        routes.post(path)(handler)
        return handler

    return register
