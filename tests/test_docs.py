"""The docs stay true: every setting and every code the server defines is documented, the
README's examples run against a real server, and what the docs say the server serves (the
published keys), the Makefile does and one e-mail's password agree with the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
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


# ---------------------------------------------------------------------------------- examples


def fenced_blocks(text: str, language: str) -> list[str]:
    """The bodies of the ```LANGUAGE blocks of ``text``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def runnable_blocks(path: Path) -> list[str]:
    """The Python blocks of ``path`` marked ``<!-- runnable -->``."""
    parts = path.read_text().split("<!-- runnable -->")[1:]
    return [fenced_blocks(part, "python")[0] for part in parts]


#: Where the docs pair an e-mail with a password: JSON bodies, keyword arguments, the
#: ``EMAIL, PASSWORD = …`` of the examples, and ``TETHER_PASSWORD='…' tether login … --email``.
_CREDENTIALS = (
    re.compile(r'"email":\s*"(?P<email>[^"]+)",\s*"password":\s*"(?P<password>[^"]+)"'),
    re.compile(r'email="(?P<email>[^"]+)",\s*password="(?P<password>[^"]+)"'),
    re.compile(r'EMAIL, PASSWORD = "(?P<email>[^"]+)", "(?P<password>[^"]+)"'),
    re.compile(r"TETHER_PASSWORD='(?P<password>[^']+)' tether login[^\n]*--email (?P<email>\S+)"),
)


def test_one_email_has_one_password_across_the_readme_and_the_docs() -> None:
    """A reader who signs up with the README's curl and then runs docs/client.md's example
    (or the other way round) must not meet ``invalid_credentials``."""
    passwords: dict[str, set[str]] = {}
    for path in (README, *sorted(DOCS.glob("*.md"))):
        for pattern in _CREDENTIALS:
            for match in pattern.finditer(path.read_text()):
                passwords.setdefault(match["email"], set()).add(match["password"])
    assert passwords["ada@example.com"], "the patterns above no longer find the examples"
    assert {email: p for email, p in passwords.items() if len(p) > 1} == {}


def test_the_readme_curl_session_and_python_example_run(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The README's curl session, then its Python example, against one real server, as a
    reader runs them: the example signs in as the user the curl session signed up."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    server = server_factory()
    readme = README.read_text()
    [curl] = [block for block in fenced_blocks(readme, "sh") if "curl" in block]
    curl = curl.replace("http://127.0.0.1:8000", server.base_url).replace("/tmp/", f"{tmp_path}/")
    shell = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", curl],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shell.returncode == 0, shell.stderr
    assert "}204\n" in shell.stdout, shell.stdout  # the sign-out's status, after a JSON body
    assert json.loads(shell.stdout.strip().splitlines()[-1])["keys"], shell.stdout

    [example] = runnable_blocks(README)
    assert "ws://127.0.0.1:8000/sync" in example
    example = example.replace("ws://127.0.0.1:8000/sync", server.ws_url)
    python = subprocess.run(
        [sys.executable, "-c", example],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert python.returncode == 0, python.stderr
    signed_up, _ = json.JSONDecoder().raw_decode(shell.stdout)
    me, *values = python.stdout.splitlines()
    assert me == f"me: {{'userId': '{signed_up['userId']}'}}", python.stdout  # not anonymous
    assert values == ["0", "1", "2", "3"], python.stdout


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


@pytest.mark.parametrize(("alg", "table"), [("ES256", "JWK field"), ("RS256", "RSA JWK field")])
async def test_keys_md_lists_exactly_the_fields_the_server_publishes(
    server_factory: Callable[..., ServerProcess], alg: str, table: str
) -> None:
    text = (DOCS / "keys.md").read_text()
    published = text[text.index("## Published keys") :]
    server = server_factory(env={"TETHER_SIGNING_ALGORITHM": alg})
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        jwks = await http.get("/.well-known/jwks.json")
        discovery = await http.get("/.well-known/openid-configuration")
    assert jwks.status_code == discovery.status_code == 200

    jwk_fields = doc_table(published, table)
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


# ---------------------------------------------------------------------------------- Makefile


def make_recipe(target: str) -> list[str]:
    """The command lines of ``target`` in the Makefile."""
    lines = MAKEFILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_make_bench_runs_every_benchmark_but_chaos_with_flags_it_has() -> None:
    scripts = {p.name for p in (REPO_ROOT / "bench").glob("*.py")} - {"common.py", "chaos.py"}
    ran: dict[str, list[str]] = {}
    for line in make_recipe("bench"):
        match = re.fullmatch(r"\$\(BIN\)/python bench/(\w+\.py)(.*)", line)
        assert match, line
        ran[match[1]] = re.findall(r"--[\w-]+", match[2])
    assert set(ran) == scripts
    for script, flags in ran.items():
        usage = subprocess.run(
            [sys.executable, f"bench/{script}", "--help"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert [f for f in flags if not re.search(rf"{f}\b", usage)] == [], script


def test_make_says_what_it_does_while_it_installs(tmp_path: Path) -> None:
    """``make run`` on a fresh clone spends a minute installing: it says so first."""
    dry = subprocess.run(
        ["make", "-n", "run", f"VENV={tmp_path / 'venv'}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "creating" in dry and "first run takes about a minute" in dry
    assert dry.index("first run takes about a minute") < dry.index("-m venv")
