"""The HTTP authentication API (``/auth/signup``, ``/auth/signin``, ``/auth/refresh``,
``/auth/signout``, ``/auth/signout-all``), from the client side.

Every failure raises :class:`~tether.client.errors.AuthError` with the server's code. A server that
cannot be reached, or answers 5xx without a code, raises code ``network`` or ``unavailable``:
both are passing (:attr:`AuthError.transient`), never a sign-out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from tether.client.errors import AuthError
from tether.client.token_store import StoredSession

#: Seconds one HTTP request may take.
DEFAULT_HTTP_TIMEOUT = 10.0


def http_base_url(url: str) -> str:
    """The HTTP base URL of a server named by its ``/sync`` URL (or by an HTTP URL).

    ``ws://host:8000/sync`` → ``http://host:8000``; ``wss://host/tether/sync`` →
    ``https://host/tether``; an ``http(s)://`` URL is returned without a trailing slash.
    """
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https"):
        raise ValueError(f"not a ws://, wss://, http:// or https:// URL: {url!r}")
    path = parts.path.rstrip("/")
    if parts.scheme in ("ws", "wss") and path.endswith("/sync"):
        path = path[: -len("/sync")]
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class AuthAPI:
    """The auth API of a deployment reachable at one or more base URLs.

    A request that cannot reach one URL (connection refused, timeout) is tried at the next;
    an answer from any instance, success or error, is final.
    """

    def __init__(self, base_urls: str | Sequence[str], *, timeout: float = DEFAULT_HTTP_TIMEOUT):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("at least one URL is needed")
        self.base_urls = [http_base_url(u) for u in urls]
        self.timeout = timeout
        self._next = 0

    async def sign_up(self, email: str, password: str) -> StoredSession:
        """Create an account and sign in (``email_taken``, ``invalid_request`` …)."""
        return _session(await self._post("/auth/signup", {"email": email, "password": password}))

    async def sign_in(self, email: str, password: str) -> StoredSession:
        """Sign in (``invalid_credentials``; ``rate_limited`` with ``retry_after``)."""
        return _session(await self._post("/auth/signin", {"email": email, "password": password}))

    async def refresh(self, refresh_token: str, retry_key: str | None = None) -> StoredSession:
        """Rotate a refresh token over HTTP (``refresh_invalid``, ``refresh_reused``,
        ``unavailable``)."""
        body: dict[str, Any] = {"refreshToken": refresh_token}
        if retry_key is not None:
            body["retryKey"] = retry_key
        return _session(await self._post("/auth/refresh", body))

    async def sign_out(self, access_token: str, *, everywhere: bool = False) -> None:
        """End this session (``everywhere``: every session of the user) on every instance."""
        path = "/auth/signout-all" if everywhere else "/auth/signout"
        await self._post(path, None, token=access_token)

    async def _post(
        self, path: str, body: dict[str, Any] | None, *, token: str | None = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        last: Exception | None = None
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            for _ in range(len(self.base_urls)):
                base = self.base_urls[self._next]
                try:
                    response = await http.post(base + path, json=body, headers=headers)
                except httpx.TransportError as exc:
                    last = exc
                    self._next = (self._next + 1) % len(self.base_urls)
                    continue
                return _answer(response)
        raise AuthError("network", f"no server reachable: {last}", status=0)


def _answer(response: httpx.Response) -> dict[str, Any]:
    if response.status_code == 204:
        return {}
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if 200 <= response.status_code < 300 and isinstance(doc, dict):
        return doc
    retry_after: float | None = None
    header = response.headers.get("retry-after")
    if header is not None:
        try:
            retry_after = float(header)
        except ValueError:
            retry_after = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        code, message = doc["error"], str(doc.get("message", ""))
    elif response.status_code >= 500:
        code, message = "unavailable", f"HTTP {response.status_code}"
    else:
        code, message = "invalid_response", f"HTTP {response.status_code}"
    raise AuthError(code, message, status=response.status_code, retry_after=retry_after)


def _session(doc: dict[str, Any]) -> StoredSession:
    try:
        return StoredSession.from_tokens(doc, received_at=time.time())
    except (KeyError, TypeError, ValueError):
        raise AuthError("invalid_response", "the token response is incomplete") from None


async def sign_up(url: str, email: str, password: str) -> StoredSession:
    """Create an account on the server at ``url`` (its ``/sync`` or HTTP URL)."""
    return await AuthAPI(url).sign_up(email, password)


async def sign_in(url: str, email: str, password: str) -> StoredSession:
    """Sign in on the server at ``url`` (its ``/sync`` or HTTP URL)."""
    return await AuthAPI(url).sign_in(email, password)
