"""The HTTP authentication API (protocol §2) as Starlette routes.

Routes only parse, call :class:`tether.server.auth.service.AuthService` and shape the answer. A
malformed request is an :class:`tether.server.errors.HTTPError`; the service's
:class:`~tether.server.auth.errors.AuthFailure` becomes one through :func:`http_error`, which
picks the status (and the HTTP code, where the socket's is finer). Both are rendered as
``{"error", "message"}``.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tether.protocol import AuthErrorCode, HTTPCode
from tether.server.auth.errors import AuthFailure, FailureCode
from tether.server.auth.service import AuthService
from tether.server.clock import to_ms
from tether.server.errors import HTTPError

JWKS_PATH = "/.well-known/jwks.json"


#: The status, and the HTTP API's code, of each failure of the auth service (protocol §2).
HTTP_FAILURES: dict[FailureCode, tuple[int, HTTPCode]] = {
    HTTPCode.INVALID_REQUEST: (400, HTTPCode.INVALID_REQUEST),
    HTTPCode.EMAIL_TAKEN: (409, HTTPCode.EMAIL_TAKEN),
    HTTPCode.INVALID_CREDENTIALS: (401, HTTPCode.INVALID_CREDENTIALS),
    AuthErrorCode.RATE_LIMITED: (429, HTTPCode.RATE_LIMITED),
    AuthErrorCode.REFRESH_INVALID: (401, HTTPCode.REFRESH_INVALID),
    AuthErrorCode.REFRESH_REUSED: (401, HTTPCode.REFRESH_REUSED),
    AuthErrorCode.UNAVAILABLE: (503, HTTPCode.UNAVAILABLE),
    # The HTTP API does not tell why a bearer token was refused: every reason is invalid_token.
    AuthErrorCode.INVALID_TOKEN: (401, HTTPCode.INVALID_TOKEN),
    AuthErrorCode.TOKEN_EXPIRED: (401, HTTPCode.INVALID_TOKEN),
    AuthErrorCode.SESSION_REVOKED: (401, HTTPCode.INVALID_TOKEN),
}


def http_error(failure: AuthFailure) -> HTTPError:
    """The HTTP answer to a failure of the auth service (same message, ``Retry-After`` kept)."""
    status, code = HTTP_FAILURES[failure.code]
    return HTTPError(status, code, failure.message, retry_after=failure.retry_after)


def error_response(exc: HTTPError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(
        {"error": exc.code, "message": exc.message}, status_code=exc.status, headers=headers
    )


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, reading no more than ``limit`` bytes of it."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPError(400, HTTPCode.INVALID_REQUEST, f"the body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPError(400, HTTPCode.INVALID_REQUEST, f"the body is over {limit} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(400, HTTPCode.INVALID_REQUEST, "the body is not JSON") from None
    if not isinstance(doc, dict):
        raise HTTPError(400, HTTPCode.INVALID_REQUEST, "the body is not a JSON object")
    return doc


def bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPError(401, HTTPCode.INVALID_TOKEN, "an Authorization: Bearer token is required")
    return token.strip()


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class AuthRoutes:
    def __init__(self, service: AuthService, max_request_bytes: int) -> None:
        self.service = service
        self.limit = max_request_bytes

    def _tokens(self, pair: Any, status: int = 200) -> JSONResponse:
        body = pair.to_json(to_ms(self.service.clock()))
        return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})

    async def signup(self, request: Request) -> Response:
        body = await read_json_object(request, self.limit)
        pair = await self.service.sign_up(
            body.get("email"), body.get("password"), client_address(request)
        )
        return self._tokens(pair, 201)

    async def signin(self, request: Request) -> Response:
        body = await read_json_object(request, self.limit)
        pair = await self.service.sign_in(
            body.get("email"), body.get("password"), client_address(request)
        )
        return self._tokens(pair)

    async def refresh(self, request: Request) -> Response:
        body = await read_json_object(request, self.limit)
        pair = await self.service.refresh(body.get("refreshToken"), body.get("retryKey"))
        return self._tokens(pair)

    async def signout(self, request: Request) -> Response:
        await self.service.sign_out(bearer_token(request))
        return Response(status_code=204)

    async def signout_all(self, request: Request) -> Response:
        await self.service.sign_out_all(bearer_token(request))
        return Response(status_code=204)

    async def jwks(self, request: Request) -> Response:
        keys = self.service.tokens.keyring.current.jwks()
        return JSONResponse(keys, headers={"Cache-Control": "public, max-age=300"})

    async def openid_configuration(self, request: Request) -> Response:
        settings = self.service.settings
        base = (settings.public_url or str(request.base_url)).rstrip("/")
        return JSONResponse(
            {
                "issuer": settings.effective_issuer,
                "jwks_uri": base + JWKS_PATH,
                "token_endpoint": base + "/auth/refresh",
            }
        )

    def routes(self) -> list[Route]:
        return [
            Route("/auth/signup", self.signup, methods=["POST"]),
            Route("/auth/signin", self.signin, methods=["POST"]),
            Route("/auth/refresh", self.refresh, methods=["POST"]),
            Route("/auth/signout", self.signout, methods=["POST"]),
            Route("/auth/signout-all", self.signout_all, methods=["POST"]),
            Route(JWKS_PATH, self.jwks, methods=["GET"]),
            Route("/.well-known/openid-configuration", self.openid_configuration, methods=["GET"]),
        ]
