"""The HTTP authentication API (protocol §2) as Starlette routes.

Routes only parse, call :class:`tether.server.auth.service.AuthService` and shape the answer. A
malformed request is an :class:`tether.server.errors.HTTPError`; the service's
:class:`~tether.server.auth.errors.AuthFailure` becomes one through :func:`http_error`, which
picks the status (and the HTTP code, where the socket's is finer). Both are rendered as
``{"error", "message"}``.

Cookie mode (protocol §5 rule 10): a browser asks for it with ``"cookie": true`` in the body
(or the header ``Tether-Refresh: cookie``); the refresh token then goes into an ``HttpOnly``
cookie scoped to ``/auth`` and the body's ``refreshToken`` is ``null``. ``/auth/refresh``
without a body token, and the sign-outs without a bearer token, read that cookie; such a
request must carry ``Tether-CSRF: 1`` (a cross-site form cannot set a header) and an allowed
``Origin`` (a cross-site ``fetch`` cannot forge one), else 403 ``csrf_required`` /
``origin_not_allowed``. A refresh or sign-out read from the cookie that ends in
``refresh_invalid`` / ``refresh_reused``, and every sign-out, clears the cookie.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tether.protocol import AuthErrorCode, HTTPCode
from tether.server.auth.errors import AuthFailure, FailureCode
from tether.server.auth.service import AuthService, TokenPair
from tether.server.clock import to_ms
from tether.server.errors import HTTPError
from tether.server.json_input import JSONInputError, parse_client_json
from tether.server.logs import begin_request
from tether.server.origins import is_loopback_http, origin_allowed

JWKS_PATH = "/.well-known/jwks.json"

Handler = Callable[[Request], Awaitable[Response]]

#: The refresh cookie: its name, and the only path it is sent to.
REFRESH_COOKIE = "tether_refresh"
REFRESH_COOKIE_PATH = "/auth"
#: A cookie-authenticated request must carry this header with the value "1".
CSRF_HEADER = "Tether-CSRF"
#: ``Tether-Refresh: cookie`` asks for cookie mode like ``"cookie": true`` in the body.
REFRESH_MODE_HEADER = "Tether-Refresh"


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


async def read_json_object(
    request: Request, limit: int, max_depth: int, *, empty_ok: bool = False
) -> dict[str, Any]:
    """The body as a JSON object, reading no more than ``limit`` bytes of it; with
    ``empty_ok``, an empty body is ``{}`` (a cookie refresh has nothing to say).

    Anything else is a 400 ``invalid_request`` saying what is wrong: a body over the limit, not
    UTF-8, not strict JSON, nested deeper than ``max_depth``, or not an object (see
    :func:`tether.server.json_input.parse_client_json`). A client that goes away mid-body raises
    Starlette's ``ClientDisconnect`` (the app answers it with one debug line).
    """
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPError(400, HTTPCode.INVALID_REQUEST, f"the body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPError(400, HTTPCode.INVALID_REQUEST, f"the body is over {limit} bytes")
    if empty_ok and not body.strip():
        return {}
    try:
        doc = parse_client_json(bytes(body), max_depth=max_depth)
    except JSONInputError as exc:
        raise HTTPError(400, HTTPCode.INVALID_REQUEST, f"the body {exc}") from None
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


def cookie_secure(request: Request) -> bool:
    """``Secure`` on the refresh cookie, except for a page on a plain-HTTP loopback origin."""
    origin = request.headers.get("origin")
    return not (origin is not None and is_loopback_http(origin))


def refresh_cookie(request: Request, value: str, max_age: int) -> str:
    """A ``Set-Cookie`` value for the refresh cookie (``max_age`` 0 clears it)."""
    attributes = [
        f"{REFRESH_COOKIE}={value}",
        f"Max-Age={max_age}",
        f"Path={REFRESH_COOKIE_PATH}",
        "HttpOnly",
        *(["Secure"] if cookie_secure(request) else []),
        "SameSite=Strict",
    ]
    return "; ".join(attributes)


def clear_refresh_cookie(request: Request, response: Response) -> Response:
    response.headers.append("Set-Cookie", refresh_cookie(request, "", 0))
    return response


#: Refusals of a bearer token that say nothing of the refresh cookie's session.
BEARER_REFUSED = frozenset(
    {AuthErrorCode.INVALID_TOKEN, AuthErrorCode.TOKEN_EXPIRED, AuthErrorCode.SESSION_REVOKED}
)


class AuthRoutes:
    def __init__(
        self,
        service: AuthService,
        max_request_bytes: int,
        allowed_origins: tuple[str, ...],
        max_json_depth: int,
    ) -> None:
        self.service = service
        self.limit = max_request_bytes
        self.allowed_origins = allowed_origins
        self.max_depth = max_json_depth

    def _tokens(
        self, request: Request, pair: TokenPair, *, cookie: bool, status: int = 200
    ) -> JSONResponse:
        now_ms = to_ms(self.service.clock())
        body = pair.to_json(now_ms, cookie=cookie)
        response = JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})
        if cookie:
            # The cookie lives as long as the session would without another refresh.
            max_age = max(1, math.ceil((pair.session_deadline - now_ms) / 1000))
            response.headers.append(
                "Set-Cookie", refresh_cookie(request, pair.refresh_token, max_age)
            )
        return response

    def _origin_ok(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        return origin is not None and origin_allowed(
            origin, request.headers.get("host"), self.allowed_origins
        )

    def _wants_cookie(self, request: Request, body: dict[str, Any]) -> bool:
        """Does the request ask for cookie mode (``"cookie": true`` or ``Tether-Refresh:
        cookie``)? A page on an Origin not allowed gets no cookie (403 ``origin_not_allowed``,
        before anything happens): no sign-in forced on a browser from a form elsewhere."""
        flag = body.get("cookie", False)
        if not isinstance(flag, bool):
            raise HTTPError(400, HTTPCode.INVALID_REQUEST, '"cookie" must be true or false')
        mode = request.headers.get(REFRESH_MODE_HEADER)
        if mode is not None and mode.strip().lower() != "cookie":
            raise HTTPError(
                400, HTTPCode.INVALID_REQUEST, f"{REFRESH_MODE_HEADER} takes only the value cookie"
            )
        wanted = flag or mode is not None
        if wanted and "origin" in request.headers and not self._origin_ok(request):
            raise HTTPError(
                403,
                HTTPCode.ORIGIN_NOT_ALLOWED,
                "the refresh cookie is set only for an Origin in TETHER_ALLOWED_ORIGINS",
            )
        return wanted

    def _cookie_token(self, request: Request) -> str | None:
        """The refresh cookie's token, after the checks a cookie-authenticated request must
        pass (403 ``csrf_required`` / ``origin_not_allowed``); ``None`` if there is none."""
        token = request.cookies.get(REFRESH_COOKIE)
        if token is None:
            return None
        if request.headers.get(CSRF_HEADER) != "1":
            raise HTTPError(
                403,
                HTTPCode.CSRF_REQUIRED,
                f"a request authenticated by the refresh cookie needs the header {CSRF_HEADER}: 1",
            )
        if not self._origin_ok(request):
            raise HTTPError(
                403,
                HTTPCode.ORIGIN_NOT_ALLOWED,
                "a request authenticated by the refresh cookie needs an Origin "
                "in TETHER_ALLOWED_ORIGINS",
            )
        return token

    async def signup(self, request: Request) -> Response:
        body = await read_json_object(request, self.limit, self.max_depth)
        cookie = self._wants_cookie(request, body)
        pair = await self.service.sign_up(
            body.get("email"), body.get("password"), client_address(request)
        )
        return self._tokens(request, pair, cookie=cookie, status=201)

    async def signin(self, request: Request) -> Response:
        body = await read_json_object(request, self.limit, self.max_depth)
        cookie = self._wants_cookie(request, body)
        pair = await self.service.sign_in(
            body.get("email"), body.get("password"), client_address(request)
        )
        return self._tokens(request, pair, cookie=cookie)

    async def refresh(self, request: Request) -> Response:
        body = await read_json_object(request, self.limit, self.max_depth, empty_ok=True)
        cookie = self._wants_cookie(request, body)
        token = body.get("refreshToken")
        from_cookie = False
        if token is None:
            token = self._cookie_token(request)
            from_cookie = token is not None
        try:
            pair = await self.service.refresh(token, body.get("retryKey"))
        except AuthFailure as exc:
            if from_cookie and exc.code in (
                AuthErrorCode.REFRESH_INVALID,
                AuthErrorCode.REFRESH_REUSED,
            ):
                # The cookie's session is over: do not let the browser present it again.
                return clear_refresh_cookie(request, error_response(http_error(exc)))
            raise
        # A token read from the cookie can only go back into it: the page cannot read it.
        return self._tokens(request, pair, cookie=cookie or from_cookie)

    async def _sign_out(self, request: Request, *, everywhere: bool) -> Response:
        has_cookie = REFRESH_COOKIE in request.cookies
        if "authorization" in request.headers or not has_cookie:
            token = bearer_token(request)
            try:
                if everywhere:
                    await self.service.sign_out_all(token)
                else:
                    await self.service.sign_out(token)
            except AuthFailure as exc:
                if not has_cookie or exc.code not in BEARER_REFUSED:
                    raise
                # The browser client sends its access token with the cookie. One that expired
                # (a tab left alone past TETHER_ACCESS_TTL) says nothing of the cookie's
                # session, which may be live: end that one, which the page cannot do itself.
                return await self._sign_out_after_refused_bearer(request, exc, everywhere)
            response = Response(status_code=204)
            if has_cookie:
                clear_refresh_cookie(request, response)
            return response
        return await self._sign_out_with_cookie(request, everywhere=everywhere)

    async def _sign_out_after_refused_bearer(
        self, request: Request, refused: AuthFailure, everywhere: bool
    ) -> Response:
        """A bearer sign-out whose token was refused, from a browser holding the cookie: sign
        out with the cookie if the request may use it; otherwise, or if the cookie's session
        is over too, the bearer's refusal (``invalid_token``, as the contract says)."""
        try:
            response = await self._sign_out_with_cookie(request, everywhere=everywhere)
        except HTTPError:
            raise refused from None  # no Tether-CSRF or no allowed Origin: as before
        if response.status_code == 204:
            return response
        return clear_refresh_cookie(request, error_response(http_error(refused)))

    async def _sign_out_with_cookie(self, request: Request, *, everywhere: bool) -> Response:
        cookie_token = self._cookie_token(request)
        try:
            await self.service.sign_out_with_refresh(cookie_token, everywhere=everywhere)
        except AuthFailure as exc:
            if exc.code != AuthErrorCode.REFRESH_INVALID:
                raise  # unavailable: the session may still be on; keep the cookie to retry
            return clear_refresh_cookie(request, error_response(http_error(exc)))
        return clear_refresh_cookie(request, Response(status_code=204))

    async def signout(self, request: Request) -> Response:
        return await self._sign_out(request, everywhere=False)

    async def signout_all(self, request: Request) -> Response:
        return await self._sign_out(request, everywhere=True)

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

    def _observed(self, route: str, handler: Handler) -> Handler:
        """``handler`` counted in ``tether_http_auth_requests`` by its answer's code, with its
        log lines naming the user and session once the service knows them."""
        metrics = self.service.metrics

        async def observed(request: Request) -> Response:
            begin_request()
            try:
                response = await handler(request)
            except AuthFailure as exc:
                metrics.http_auth(route, str(http_error(exc).code))
                raise
            except HTTPError as exc:
                metrics.http_auth(route, str(exc.code))
                raise
            except Exception:
                metrics.http_auth(route, "internal")
                raise
            metrics.http_auth(route, "ok")
            return response

        return observed

    def routes(self) -> list[Route]:
        observed = self._observed
        return [
            Route("/auth/signup", observed("signup", self.signup), methods=["POST"]),
            Route("/auth/signin", observed("signin", self.signin), methods=["POST"]),
            Route("/auth/refresh", observed("refresh", self.refresh), methods=["POST"]),
            Route("/auth/signout", observed("signout", self.signout), methods=["POST"]),
            Route("/auth/signout-all", observed("signout_all", self.signout_all), methods=["POST"]),
            Route(JWKS_PATH, self.jwks, methods=["GET"]),
            Route("/.well-known/openid-configuration", self.openid_configuration, methods=["GET"]),
        ]
