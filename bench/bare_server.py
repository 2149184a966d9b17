"""The floor: a bare aiohttp handler answering what /api/0/state/{domain} answers."""

from __future__ import annotations

import sys

from aiohttp import web


async def state(_request: web.Request) -> web.Response:
    return web.json_response("running")


def main() -> None:
    app = web.Application()
    app.router.add_get("/api/0/state/{domain}", state)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
