"""CORS for the HTTP API (protocol §5 rule 10): which pages may call ``/auth/*`` and read the
JWKS from another origin.

A small ASGI middleware rather than Starlette's ``CORSMiddleware``, for four reasons:

* the allowed Origins are ``TETHER_ALLOWED_ORIGINS``, matched by the one rule ``/sync`` uses
  (:func:`tether.server.origins.origin_allowed`), which knows ``self`` (the request's own
  host, not known until the request comes) and ``*`` in a port;
* credentials are always allowed (the refresh cookie), so the answer always names the Origin:
  with ``*`` Starlette sends ``Access-Control-Allow-Origin: *`` to a request that carries no
  cookie yet, which a browser refuses for ``credentials: "include"`` (the first sign-in);
* a preflight from an Origin not allowed gets no CORS header at all, and a JSON error with a
  code (``origin_not_allowed``) like every other refusal of the API, where Starlette answers a
  plain-text 400 that still lists the allowed methods and headers;
* only the API's paths take part: other paths (``/tether.js``, ``/healthz``) are untouched.

A request without ``Origin`` (not a browser, or a same-origin GET) passes through unchanged.
Refusing the request itself is not CORS's job: a disallowed Origin still reaches the route (the
browser will not let its page read the answer); the routes that read the refresh cookie check
the Origin themselves (:mod:`tether.server.auth.http`).
"""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tether.protocol import HTTPCode
from tether.server.origins import origin_allowed

#: The paths that answer CORS requests: the auth API and the JWKS / OpenID configuration.
CORS_PATH_PREFIXES = ("/auth/", "/.well-known/")
ALLOW_METHODS = "GET, POST"
#: What the browser client sends: JSON bodies, a bearer token, and the two headers of cookie mode.
ALLOW_HEADERS = "Content-Type, Authorization, Tether-CSRF, Tether-Refresh"
#: Readable by the page besides the CORS-safelisted ones: when to retry after ``rate_limited``.
EXPOSE_HEADERS = "Retry-After"
#: Seconds a browser may reuse a preflight's answer.
PREFLIGHT_MAX_AGE = 600


class CORSMiddleware:
    def __init__(self, app: ASGIApp, allowed_origins: tuple[str, ...]) -> None:
        self.app = app
        self.allowed_origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(CORS_PATH_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        allowed = origin is not None and origin_allowed(
            origin, headers.get("host"), self.allowed_origins
        )
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(origin if allowed else None)(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                # The answer depends on the Origin: a shared cache must not mix them up.
                out.add_vary_header("Origin")
                if allowed:
                    assert origin is not None
                    out["Access-Control-Allow-Origin"] = origin
                    out["Access-Control-Allow-Credentials"] = "true"
                    out["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_cors)

    @staticmethod
    def _preflight(origin: str | None) -> Response:
        if origin is None:
            return JSONResponse(
                {
                    "error": HTTPCode.ORIGIN_NOT_ALLOWED,
                    "message": "this Origin is not in TETHER_ALLOWED_ORIGINS",
                },
                status_code=403,
                headers={"Vary": "Origin"},
            )
        return Response(
            status_code=200,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE),
                "Vary": "Origin",
            },
        )
