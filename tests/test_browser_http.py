"""The HTTP API as a browser meets it (protocol §5 rule 10): CORS, the refresh cookie with its
CSRF and Origin checks, and the files served to browsers (``/tether.js``, the demo page).

Real server processes and a real Redis, driven with httpx. Cookies are read from the raw
``Set-Cookie`` headers and sent back by hand in a ``Cookie`` header, so every attribute the
server sets is checked as written, and no client cookie jar decides for the test what to send.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

import httpx
import jwt
import pytest
from tether.server.origins import is_loopback_http, origin_allowed

from tests.harness import ServerProcess
from tests.test_auth_http import (
    MANY_SIGNUPS,
    PASSWORD,
    ServerFactory,
    assert_error,
    client_for,
    new_email,
)

COOKIE = "tether_refresh"
LOCAL_PAGE = "http://localhost:5173"  # allowed by default (http://localhost:*)
EVIL_PAGE = "https://evil.example"
APP_PAGE = "https://app.example"
#: What a browser page in cookie mode sends with a cookie-authenticated request.
CSRF = {"Tether-CSRF": "1"}


def parse_set_cookie(resp: httpx.Response) -> dict[str, Any]:
    """The one refresh ``Set-Cookie`` of ``resp``: its value and attributes (names lowered;
    flag attributes map to True)."""
    headers = [h for h in resp.headers.get_list("set-cookie") if h.startswith(COOKIE + "=")]
    assert len(headers) == 1, resp.headers.get_list("set-cookie")
    first, *attributes = [part.strip() for part in headers[0].split(";")]
    cookie: dict[str, Any] = {"value": first.partition("=")[2]}
    for attribute in attributes:
        name, sep, value = attribute.partition("=")
        cookie[name.lower()] = value if sep else True
    return cookie


def no_set_cookie(resp: httpx.Response) -> bool:
    return not resp.headers.get_list("set-cookie")


def cors_headers(resp: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower().startswith("access-control-")}


def cookie_headers(
    token: str, origin: str | None = LOCAL_PAGE, csrf: bool = True
) -> dict[str, str]:
    headers = {"Cookie": f"{COOKIE}={token}"}
    if origin is not None:
        headers["Origin"] = origin
    if csrf:
        headers.update(CSRF)
    return headers


async def cookie_sign_up(
    http: httpx.AsyncClient, origin: str = LOCAL_PAGE, email: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sign up in cookie mode from a page on ``origin``: (body, cookie)."""
    resp = await http.post(
        "/auth/signup",
        json={"email": email or new_email(), "password": PASSWORD, "cookie": True},
        headers={"Origin": origin},
    )
    assert resp.status_code == 201, resp.text
    return resp.json(), parse_set_cookie(resp)


async def cookie_refresh(
    http: httpx.AsyncClient, token: str, body: dict[str, Any] | None = None, **kwargs: Any
) -> httpx.Response:
    if body is None:
        return await http.post("/auth/refresh", headers=cookie_headers(token, **kwargs))
    return await http.post("/auth/refresh", json=body, headers=cookie_headers(token, **kwargs))


def session_of(access_token: str) -> str:
    claims = jwt.decode(access_token, options={"verify_signature": False})
    return str(claims["sid"])


@pytest.fixture
def server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory(env={**MANY_SIGNUPS, "TETHER_SESSION_INACTIVE_TTL": "600"})


# ----------------------------------------------------------------------------- CORS


def test_only_plain_http_loopback_origins_may_have_a_cookie_without_secure() -> None:
    loopback = [
        "http://localhost",
        "http://localhost:5173",
        "http://127.0.0.1:8000",
        "http://[::1]:3000",
    ]
    for origin in loopback:
        assert is_loopback_http(origin), origin
    for origin in (
        "https://localhost:5173",  # gets Secure: it can
        "http://localhost.evil.example",
        "http://127.0.0.1.evil.example:80",
        "http://evil.example@localhost:80",
        "http://localhost:port",
        "http://10.0.0.1:8000",
        "http://[::2]:80",
        "null",
        "",
    ):
        assert not is_loopback_http(origin), origin
    # The default list: the port wildcard, and "self" from the Host header.
    default = ("self", "http://localhost:*", "http://127.0.0.1:*")
    assert origin_allowed("http://localhost:1", None, default)
    assert origin_allowed("http://127.0.0.1:8000", "127.0.0.1:8000", ("self",))
    assert origin_allowed("http://10.1.2.3:8000", "10.1.2.3:8000", ("self",))
    assert origin_allowed("http://[::1]:8000", "[::1]:8000", ("self",))
    assert not origin_allowed("https://api.example", "other.example", default)
    # A name in Host proves nothing (DNS rebinding): "self" by name is TETHER_PUBLIC_URL's.
    assert not origin_allowed("https://api.example", "api.example", default)
    assert not origin_allowed("http://evil.example:8000", "evil.example:8000", default)
    assert origin_allowed("https://anything.example", None, ("*",))
    # Only "*" is a wildcard: an IPv6 origin's brackets are literal, not a character class.
    v6 = ("http://[::1]:*", "https://[2001:db8::1]")
    assert origin_allowed("http://[::1]:5173", None, v6)
    assert origin_allowed("https://[2001:db8::1]", None, v6)
    assert not origin_allowed("http://1:5173", None, v6)
    assert not origin_allowed("https://app.example", None, ("https://app?example",))


PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type,tether-csrf",
}


async def test_a_preflight_from_an_allowed_origin_is_answered_and_others_get_no_cors_headers(
    server: ServerProcess,
) -> None:
    async with client_for(server) as http:
        for origin in (LOCAL_PAGE, "http://127.0.0.1:3000", server.base_url):
            resp = await http.options("/auth/signin", headers={**PREFLIGHT, "Origin": origin})
            assert resp.status_code == 200, (origin, resp.text)
            assert resp.headers["access-control-allow-origin"] == origin
            assert resp.headers["access-control-allow-credentials"] == "true"
            allowed = {
                h.strip().lower() for h in resp.headers["access-control-allow-headers"].split(",")
            }
            assert {"content-type", "authorization", "tether-csrf", "tether-refresh"} <= allowed
            assert "POST" in resp.headers["access-control-allow-methods"]
            assert "origin" in resp.headers["vary"].lower()

        for origin in (EVIL_PAGE, "http://localhost.evil.example", "null"):
            resp = await http.options("/auth/signin", headers={**PREFLIGHT, "Origin": origin})
            assert_error(resp, 403, "origin_not_allowed")
            assert cors_headers(resp) == {}, origin

        # The other auth paths and the JWKS take part too.
        for path in ("/auth/signup", "/auth/refresh", "/auth/signout", "/auth/signout-all"):
            resp = await http.options(path, headers={**PREFLIGHT, "Origin": LOCAL_PAGE})
            assert resp.status_code == 200, path
        jwks = await http.get("/.well-known/jwks.json", headers={"Origin": LOCAL_PAGE})
        assert jwks.status_code == 200
        assert jwks.headers["access-control-allow-origin"] == LOCAL_PAGE
        assert "origin" in jwks.headers["vary"].lower()
        jwks = await http.get("/.well-known/jwks.json", headers={"Origin": EVIL_PAGE})
        assert jwks.status_code == 200 and cors_headers(jwks) == {}
        # Paths outside the API take no part.
        resp = await http.options("/healthz", headers={**PREFLIGHT, "Origin": LOCAL_PAGE})
        assert resp.status_code == 405 and cors_headers(resp) == {}


async def test_answers_and_errors_carry_cors_headers_for_allowed_origins_only(
    server: ServerProcess,
) -> None:
    async with client_for(server) as http:
        ok = await http.post(
            "/auth/signup",
            json={"email": new_email(), "password": PASSWORD},
            headers={"Origin": LOCAL_PAGE},
        )
        assert ok.status_code == 201
        assert ok.headers["access-control-allow-origin"] == LOCAL_PAGE
        assert ok.headers["access-control-allow-credentials"] == "true"
        # An error's code is readable by the page, and so is Retry-After.
        wrong = await http.post(
            "/auth/signin",
            json={"email": new_email(), "password": PASSWORD},
            headers={"Origin": LOCAL_PAGE},
        )
        assert_error(wrong, 401, "invalid_credentials")
        assert wrong.headers["access-control-allow-origin"] == LOCAL_PAGE
        assert "retry-after" in wrong.headers["access-control-expose-headers"].lower()

        evil = await http.post(
            "/auth/signin",
            json={"email": new_email(), "password": PASSWORD},
            headers={"Origin": EVIL_PAGE},
        )
        assert_error(evil, 401, "invalid_credentials")
        assert cors_headers(evil) == {}


async def test_a_strict_origin_list_and_the_star(server_factory: ServerFactory) -> None:
    strict = server_factory(env={"TETHER_ALLOWED_ORIGINS": APP_PAGE})
    async with client_for(strict) as http:
        resp = await http.options("/auth/signin", headers={**PREFLIGHT, "Origin": APP_PAGE})
        assert resp.status_code == 200
        resp = await http.options("/auth/signin", headers={**PREFLIGHT, "Origin": LOCAL_PAGE})
        assert_error(resp, 403, "origin_not_allowed")

    # "*" with credentials: the answer names the Origin (a browser refuses a literal "*" for a
    # request made with credentials), also for a request that carries no cookie yet.
    star = server_factory(env={"TETHER_ALLOWED_ORIGINS": "*"})
    async with client_for(star) as http:
        resp = await http.options("/auth/signin", headers={**PREFLIGHT, "Origin": EVIL_PAGE})
        assert resp.status_code == 200
        assert resp.headers["access-control-allow-origin"] == EVIL_PAGE
        resp = await http.post(
            "/auth/signin",
            json={"email": new_email(), "password": PASSWORD},
            headers={"Origin": EVIL_PAGE},
        )
        assert resp.headers["access-control-allow-origin"] == EVIL_PAGE
        assert resp.headers["access-control-allow-credentials"] == "true"


# ----------------------------------------------------------------------------- the cookie


async def test_cookie_mode_sets_an_httponly_strict_cookie_and_no_token_in_the_body(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        env={
            **MANY_SIGNUPS,
            "TETHER_SESSION_INACTIVE_TTL": "600",
            "TETHER_ALLOWED_ORIGINS": f"self,http://localhost:*,{APP_PAGE}",
        }
    )
    async with client_for(server) as http:
        email = new_email()
        body, cookie = await cookie_sign_up(http, email=email)
        assert body["refreshToken"] is None
        assert body["accessToken"] and body["userId"] and body["sessionId"]
        assert cookie["value"].startswith("rt1.")
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Strict"
        assert cookie["path"] == "/auth"
        # Max-Age follows the session: here its inactivity limit, 600 s.
        assert 590 <= int(cookie["max-age"]) <= 600
        assert "secure" not in cookie  # a page on http://localhost: the only exception
        assert "domain" not in cookie  # host-only

        # A page on an https origin gets Secure; sign-in, and the header form of the request.
        resp = await http.post(
            "/auth/signin",
            json={"email": email, "password": PASSWORD},
            headers={"Origin": APP_PAGE, "Tether-Refresh": "cookie"},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["refreshToken"] is None
        secure = parse_set_cookie(resp)
        assert secure["secure"] is True and secure["httponly"] is True
        assert secure["samesite"] == "Strict" and secure["path"] == "/auth"
        # Not a browser (no Origin): Secure stays.
        resp = await http.post(
            "/auth/signin", json={"email": email, "password": PASSWORD, "cookie": True}
        )
        assert parse_set_cookie(resp)["secure"] is True

        for bad in ({"cookie": "yes"}, {"cookie": 1}):
            resp = await http.post(
                "/auth/signin", json={"email": email, "password": PASSWORD, **bad}
            )
            assert_error(resp, 400, "invalid_request")
        resp = await http.post(
            "/auth/signin",
            json={"email": email, "password": PASSWORD},
            headers={"Tether-Refresh": "body"},
        )
        assert_error(resp, 400, "invalid_request")


async def test_no_cookie_is_set_for_a_page_on_an_origin_not_allowed(
    server: ServerProcess,
) -> None:
    # A form on another site could post JSON-looking text/plain to sign a browser in to the
    # attacker's account (login CSRF): a cookie-mode request from an Origin not allowed is
    # refused before anything happens.
    async with client_for(server) as http:
        email = new_email()
        resp = await http.post(
            "/auth/signup",
            json={"email": email, "password": PASSWORD, "cookie": True},
            headers={"Origin": EVIL_PAGE},
        )
        assert_error(resp, 403, "origin_not_allowed")
        assert no_set_cookie(resp)
        # No account was made: the same address signs up fine from an allowed page.
        _, cookie = await cookie_sign_up(http, email=email)
        resp = await http.post(
            "/auth/signin",
            content=f'{{"email": "{email}", "password": "{PASSWORD}", "cookie": true}}',
            headers={"Origin": EVIL_PAGE, "Content-Type": "text/plain"},
        )
        assert_error(resp, 403, "origin_not_allowed")
        assert no_set_cookie(resp)
        resp = await http.post(
            "/auth/refresh",
            json={"refreshToken": None},
            headers={
                **cookie_headers(cookie["value"], origin=EVIL_PAGE),
                "Tether-Refresh": "cookie",
            },
        )
        assert_error(resp, 403, "origin_not_allowed")


async def test_a_body_token_works_as_before_and_can_move_into_the_cookie(
    server: ServerProcess,
) -> None:
    async with client_for(server) as http:
        resp = await http.post(
            "/auth/signup",
            json={"email": new_email(), "password": PASSWORD},
            headers={"Origin": LOCAL_PAGE},
        )
        assert resp.status_code == 201 and no_set_cookie(resp)
        token = resp.json()["refreshToken"]
        assert token.startswith("rt1.")
        resp = await http.post("/auth/refresh", json={"refreshToken": token})
        assert resp.status_code == 200 and no_set_cookie(resp)
        token = resp.json()["refreshToken"]
        assert token.startswith("rt1.")
        # A body token with "cookie": true: the next token goes into the cookie.
        resp = await http.post(
            "/auth/refresh",
            json={"refreshToken": token, "cookie": True},
            headers={"Origin": LOCAL_PAGE},
        )
        assert resp.status_code == 200
        assert resp.json()["refreshToken"] is None
        moved = parse_set_cookie(resp)["value"]
        assert (await cookie_refresh(http, moved)).status_code == 200
        # A body token beats the cookie, and needs no CSRF header.
        other = await http.post("/auth/signup", json={"email": new_email(), "password": PASSWORD})
        resp = await http.post(
            "/auth/refresh",
            json={"refreshToken": other.json()["refreshToken"]},
            headers={"Cookie": f"{COOKIE}=junk"},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["sessionId"] == other.json()["sessionId"]


async def test_refresh_from_the_cookie_rotates_and_sets_the_new_cookie(
    server: ServerProcess,
) -> None:
    async with client_for(server) as http:
        body, cookie = await cookie_sign_up(http)
        resp = await cookie_refresh(http, cookie["value"])  # no body at all
        assert resp.status_code == 200, resp.text
        refreshed = resp.json()
        assert refreshed["refreshToken"] is None
        assert refreshed["sessionId"] == body["sessionId"]
        assert session_of(refreshed["accessToken"]) == body["sessionId"]
        assert resp.headers["cache-control"] == "no-store"
        new = parse_set_cookie(resp)
        assert new["value"] != cookie["value"] and new["value"].startswith("rt1.")
        assert new["httponly"] is True and new["samesite"] == "Strict"
        assert new["path"] == "/auth" and 590 <= int(new["max-age"]) <= 600
        # The new cookie refreshes in turn ("{}" as the body is the same as none).
        resp = await cookie_refresh(http, new["value"], body={})
        assert resp.status_code == 200, resp.text
        assert parse_set_cookie(resp)["value"] != new["value"]


async def test_a_cookie_request_without_the_csrf_header_or_an_allowed_origin_is_refused(
    server: ServerProcess,
) -> None:
    async with client_for(server) as http:
        _, cookie = await cookie_sign_up(http)
        token = cookie["value"]
        missing_csrf = await cookie_refresh(http, token, csrf=False)
        assert_error(missing_csrf, 403, "csrf_required")
        wrong_csrf = await http.post(
            "/auth/refresh", headers={**cookie_headers(token, csrf=False), "Tether-CSRF": "yes"}
        )
        assert_error(wrong_csrf, 403, "csrf_required")
        assert_error(await cookie_refresh(http, token, origin=EVIL_PAGE), 403, "origin_not_allowed")
        assert_error(await cookie_refresh(http, token, origin=None), 403, "origin_not_allowed")
        for path in ("/auth/signout", "/auth/signout-all"):
            assert_error(
                await http.post(path, headers=cookie_headers(token, csrf=False)),
                403,
                "csrf_required",
            )
            assert_error(
                await http.post(path, headers=cookie_headers(token, origin=EVIL_PAGE)),
                403,
                "origin_not_allowed",
            )
        # Nothing was rotated or ended, and the cookie was left alone: it still refreshes,
        # as the current token (a new token, not the reuse window's replay).
        resp = await cookie_refresh(http, token)
        assert resp.status_code == 200, resp.text
        assert parse_set_cookie(resp)["value"] != token


async def test_cookie_reuse_after_the_window_ends_the_session_and_clears_the_cookie(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(env={**MANY_SIGNUPS, "TETHER_REFRESH_REUSE_WINDOW": "0"})
    async with client_for(server) as http:
        body, cookie = await cookie_sign_up(http)
        first = cookie["value"]
        resp = await cookie_refresh(http, first)
        assert resp.status_code == 200
        second = parse_set_cookie(resp)["value"]

        reused = await cookie_refresh(http, first)
        assert_error(reused, 401, "refresh_reused")
        cleared = parse_set_cookie(reused)
        assert cleared["value"] == "" and cleared["max-age"] == "0"
        assert cleared["path"] == "/auth"
        # The whole session ended: the newest cookie and the access token are dead too.
        gone = await cookie_refresh(http, second)
        assert_error(gone, 401, "refresh_invalid")
        assert parse_set_cookie(gone)["max-age"] == "0"
        resp = await http.post(
            "/auth/signout", headers={"Authorization": f"Bearer {body['accessToken']}"}
        )
        assert_error(resp, 401, "invalid_token")


async def test_the_reuse_window_and_retry_key_apply_to_the_cookie(
    server_factory: ServerFactory,
) -> None:
    # Within the window: the previous cookie yields the same new cookie (two tabs at once).
    windowed = server_factory(env={**MANY_SIGNUPS, "TETHER_REFRESH_REUSE_WINDOW": "30"})
    async with client_for(windowed) as http:
        _, cookie = await cookie_sign_up(http)
        one = await cookie_refresh(http, cookie["value"])
        two = await cookie_refresh(http, cookie["value"])
        assert one.status_code == two.status_code == 200
        assert parse_set_cookie(one)["value"] == parse_set_cookie(two)["value"]

    # Window 0: a response lost mid-refresh (its Set-Cookie never arrived, so the browser still
    # holds the previous cookie) is retried safely with the same retryKey.
    strict = server_factory(env={**MANY_SIGNUPS, "TETHER_REFRESH_REUSE_WINDOW": "0"})
    async with client_for(strict) as http:
        _, cookie = await cookie_sign_up(http)
        retry = {"retryKey": secrets.token_urlsafe(24)}
        lost = await cookie_refresh(http, cookie["value"], body=retry)
        again = await cookie_refresh(http, cookie["value"], body=retry)
        assert lost.status_code == again.status_code == 200, again.text
        assert parse_set_cookie(lost)["value"] == parse_set_cookie(again)["value"]
        assert_error(await cookie_refresh(http, cookie["value"]), 401, "refresh_reused")


async def test_sign_out_from_the_cookie_ends_the_session_and_clears_the_cookie(
    server: ServerProcess,
) -> None:
    async with client_for(server) as http:
        email = new_email()
        body, cookie = await cookie_sign_up(http, email=email)
        resp = await http.post("/auth/signout", headers=cookie_headers(cookie["value"]))
        assert resp.status_code == 204, resp.text
        cleared = parse_set_cookie(resp)
        assert cleared["value"] == "" and cleared["max-age"] == "0" and cleared["path"] == "/auth"
        assert_error(await cookie_refresh(http, cookie["value"]), 401, "refresh_invalid")
        resp = await http.post(
            "/auth/signout", headers={"Authorization": f"Bearer {body['accessToken']}"}
        )
        assert_error(resp, 401, "invalid_token")
        # Again with the dead cookie: refused, and the cookie is cleared once more.
        again = await http.post("/auth/signout", headers=cookie_headers(cookie["value"]))
        assert_error(again, 401, "refresh_invalid")
        assert parse_set_cookie(again)["max-age"] == "0"

        # Sign-out everywhere from the cookie ends the user's other sessions, not others'.
        signin = {"email": email, "password": PASSWORD}
        elsewhere = (await http.post("/auth/signin", json=signin)).json()
        resp = await http.post(
            "/auth/signin", json={**signin, "cookie": True}, headers={"Origin": LOCAL_PAGE}
        )
        here = parse_set_cookie(resp)["value"]
        bystander = (
            await http.post("/auth/signup", json={"email": new_email(), "password": PASSWORD})
        ).json()
        resp = await http.post("/auth/signout-all", headers=cookie_headers(here))
        assert resp.status_code == 204, resp.text
        assert parse_set_cookie(resp)["max-age"] == "0"
        resp = await http.post("/auth/refresh", json={"refreshToken": elsewhere["refreshToken"]})
        assert_error(resp, 401, "refresh_invalid")
        assert_error(await cookie_refresh(http, here), 401, "refresh_invalid")
        resp = await http.post("/auth/refresh", json={"refreshToken": bystander["refreshToken"]})
        assert resp.status_code == 200

        # A bearer sign-out from a browser that holds the cookie clears it too.
        body, cookie = await cookie_sign_up(http)
        resp = await http.post(
            "/auth/signout",
            headers={
                "Authorization": f"Bearer {body['accessToken']}",
                "Cookie": f"{COOKIE}={cookie['value']}",
            },
        )
        assert resp.status_code == 204
        assert parse_set_cookie(resp)["max-age"] == "0"


async def test_a_sign_out_with_an_expired_access_token_still_ends_the_cookies_session(
    server_factory: ServerFactory,
) -> None:
    # The browser client sends its access token and the cookie; a tab left alone past the
    # access token's lifetime still holds a live session in the cookie, which sign-out must end
    # (and clear): the page cannot remove an HttpOnly cookie itself.
    server = server_factory(
        env={**MANY_SIGNUPS, "TETHER_ACCESS_TTL": "2", "TETHER_CLOCK_LEEWAY": "0"}
    )
    async with client_for(server) as http:
        for path in ("/auth/signout", "/auth/signout-all"):
            body, cookie = await cookie_sign_up(http)
            await asyncio.sleep(3.5)  # past exp (2 s) with no leeway, however slow the machine
            resp = await http.post(
                path,
                headers={
                    "Authorization": f"Bearer {body['accessToken']}",
                    **cookie_headers(cookie["value"]),
                },
            )
            assert resp.status_code == 204, (path, resp.text)
            assert parse_set_cookie(resp)["max-age"] == "0"
            assert_error(await cookie_refresh(http, cookie["value"]), 401, "refresh_invalid")


async def test_sign_out_everywhere_needs_the_sessions_current_cookie(
    server_factory: ServerFactory,
) -> None:
    # A token older than the previous one cannot end the user's other sessions.
    server = server_factory(env={**MANY_SIGNUPS, "TETHER_REFRESH_REUSE_WINDOW": "0"})
    async with client_for(server) as http:
        email = new_email()
        _, cookie = await cookie_sign_up(http, email=email)
        tokens = [cookie["value"]]
        for _ in range(2):
            resp = await cookie_refresh(http, tokens[-1])
            tokens.append(parse_set_cookie(resp)["value"])
        other = (
            await http.post("/auth/signin", json={"email": email, "password": PASSWORD})
        ).json()
        resp = await http.post("/auth/signout-all", headers=cookie_headers(tokens[0]))
        assert_error(resp, 401, "refresh_invalid")
        resp = await http.post("/auth/refresh", json={"refreshToken": other["refreshToken"]})
        assert resp.status_code == 200, resp.text
        # The previous token may (it is the browser's cookie when a response was lost).
        resp = await http.post("/auth/signout-all", headers=cookie_headers(tokens[1]))
        assert resp.status_code == 204, resp.text
        assert_error(await cookie_refresh(http, tokens[2]), 401, "refresh_invalid")


async def test_a_refresh_with_neither_a_body_token_nor_a_cookie_is_refresh_invalid(
    server: ServerProcess,
) -> None:
    async with client_for(server) as http:
        for kwargs in ({}, {"json": {}}, {"json": {"refreshToken": None}}):
            resp = await http.post("/auth/refresh", headers=CSRF, **kwargs)
            assert_error(resp, 401, "refresh_invalid")
            assert no_set_cookie(resp)
        resp = await http.post("/auth/signout", headers={"Origin": LOCAL_PAGE, **CSRF})
        assert_error(resp, 401, "invalid_token")


# ----------------------------------------------------------------------------- files


async def test_the_client_module_and_the_demo_page_are_served(server: ServerProcess) -> None:
    async with client_for(server) as http:
        resp = await http.get("/tether.js")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/javascript")
        assert re.search(r"export \{[^}]*\bTetherClient\b", resp.text), resp.text[-300:]
        # Any page may import it (a module script is fetched in CORS mode).
        assert resp.headers["access-control-allow-origin"] == "*"
        etag = resp.headers["etag"]
        again = await http.get("/tether.js", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""

        page = await http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "/tether.js" in page.text


async def test_a_user_application_gets_the_client_but_not_the_demo_page(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(app="tests.apps.reactive_app:app")
    async with client_for(server) as http:
        assert (await http.get("/tether.js")).status_code == 200
        assert_error(await http.get("/"), 404, "not_found")
