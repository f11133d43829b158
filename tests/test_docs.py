"""The docs stay true: every setting and every code the server defines is documented, the
README's examples run against a real server, and what the docs say the server serves (the
published keys), the Makefile does and one e-mail's password agree with the code."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
from tether.protocol import (
    AuthErrorCode,
    CloseCode,
    ErrorCode,
    FunctionErrorCode,
    HTTPCode,
    MutationErrorCode,
    SessionEndReason,
)
from tether.server.settings import Settings

from tests.harness import REPO_ROOT, ServerProcess

DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
MAKEFILE = REPO_ROOT / "Makefile"


def test_every_setting_is_in_docs_settings() -> None:
    text = (DOCS / "settings.md").read_text()
    missing = [var for var, _, _ in Settings.documented() if f"`{var}`" not in text]
    assert missing == []


def test_every_code_is_in_docs_protocol() -> None:
    text = (DOCS / "protocol.md").read_text()
    vocabularies = (
        HTTPCode,
        AuthErrorCode,
        ErrorCode,
        FunctionErrorCode,
        MutationErrorCode,
        SessionEndReason,
    )
    codes = [c.value for vocabulary in vocabularies for c in vocabulary]
    missing = [code for code in codes if f"`{code}`" not in text]
    assert missing == []
    closes = [str(int(c)) for c in CloseCode]
    assert [c for c in closes if f"| {c} |" not in text] == []


# ---------------------------------------------------------------------------------- keys.md


def doc_table(text: str, header: str) -> dict[str, str]:
    """The rows of the Markdown table whose first header cell is ``header``: each backticked
    name of the first column (``x``, ``y`` is two) with the second column."""
    start = text.index(f"| {header} |")
    rows: dict[str, str] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        first, second = (cell.strip() for cell in line.strip("|").split("|", 1))
        for name in re.findall(r"`([^`]+)`", first):
            rows[name] = second.strip(" |")
    return rows


async def test_keys_md_lists_exactly_the_fields_the_server_publishes(
    server_factory: Callable[..., ServerProcess],
) -> None:
    text = (DOCS / "keys.md").read_text()
    published = text[text.index("## Published keys") :]
    server = server_factory()
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        jwks = await http.get("/.well-known/jwks.json")
        discovery = await http.get("/.well-known/openid-configuration")
    assert jwks.status_code == discovery.status_code == 200

    jwk_fields = doc_table(published, "JWK field")
    [key] = jwks.json()["keys"]
    assert set(key) == set(jwk_fields)
    for name, value in jwk_fields.items():
        if re.fullmatch(r"`[^`]+`", value):  # a literal: the value served
            assert key[name] == value.strip("`"), name
    [cache_control] = re.findall(r"`Cache-Control: ([^`]+)`", published)
    assert jwks.headers["cache-control"] == cache_control

    doc_fields = doc_table(published, "discovery field")
    config = discovery.json()
    assert set(config) == set(doc_fields)
    assert config["jwks_uri"] == server.base_url + "/.well-known/jwks.json"
    assert config["token_endpoint"] == server.base_url + "/auth/refresh"
    assert "served without a `Cache-Control` header" in published
    assert "cache-control" not in discovery.headers
