"""The docs stay true: every setting and every code the server defines is documented."""

from __future__ import annotations

from pathlib import Path

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

DOCS = Path(__file__).resolve().parent.parent / "docs"


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
