"""The files a browser loads from Tether: the client module at ``/tether.js`` (protocol §6) and,
with the built-in demo application, the demo page at ``/``.

Both ship inside the package (``tether/server/static/``, listed in pyproject's package-data)
and are read once, when the app is built. ``static/tether.js`` is the build output of the
repository's ``js/`` folder (``js/dist/tether.js``, copied there by ``make js``), committed so
that running Tether needs no Node; ``make js-check`` (in CI) fails when it is not the current
build. ``static/index.html`` is the demo page, plain HTML on the §6 API of ``/tether.js``.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

CLIENT_PATH = "/tether.js"
DEMO_PATH = "/"


class StaticFile:
    """One packaged file, answered with an ``ETag`` so a browser revalidates instead of
    downloading it again (``Cache-Control: no-cache``: a new release is seen at once)."""

    def __init__(self, name: str, media_type: str, *, cross_origin: bool = False) -> None:
        self.content = resources.files("tether.server").joinpath("static", name).read_bytes()
        self.media_type = media_type
        self.etag = '"' + hashlib.sha256(self.content).hexdigest()[:32] + '"'
        self.headers = {"Cache-Control": "no-cache", "ETag": self.etag}
        if cross_origin:
            # A module script is fetched in CORS mode: pages on other origins may import it.
            # Public code, no credentials: "*" is right here (the API's CORS is stricter).
            self.headers["Access-Control-Allow-Origin"] = "*"

    async def respond(self, request: Request) -> Response:
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=self.headers)
        return Response(self.content, media_type=self.media_type, headers=self.headers)


def browser_routes(*, demo: bool) -> list[Route]:
    """``GET /tether.js``, and ``GET /`` (the demo page) when ``demo``: a user's application
    owns its own pages, so ``/`` is left to it (it answers 404 from Tether)."""
    client = StaticFile("tether.js", "text/javascript; charset=utf-8", cross_origin=True)
    routes = [Route(CLIENT_PATH, client.respond, methods=["GET"])]
    if demo:
        page = StaticFile("index.html", "text/html; charset=utf-8")
        routes.append(Route(DEMO_PATH, page.respond, methods=["GET"]))
    return routes
