"""What ``pip install`` puts on a machine: one import package, ``tether``, with the public API
at its top, the Lua scripts and the type marker.

The wheel is built from the working tree as ``pip`` builds it for a user (an isolated build
with the build backend of ``pyproject.toml``), then read: its file list, and its code imported
from a plain directory, not from the editable install the tests otherwise use.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("tether-*.whl")
    return built


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_the_wheel_installs_exactly_one_top_level_package(wheel: Path) -> None:
    tops = {name.split("/", 1)[0] for name in _names(wheel)}
    dist_info = {top for top in tops if top.endswith((".dist-info", ".data"))}
    assert tops - dist_info == {"tether"}
    with zipfile.ZipFile(wheel) as archive:
        (top_level,) = [n for n in archive.namelist() if n.endswith("top_level.txt")] or [None]
        if top_level is not None:
            assert archive.read(top_level).decode().split() == ["tether"]


def test_the_wheel_carries_every_subsystem_its_scripts_and_the_type_marker(wheel: Path) -> None:
    names = set(_names(wheel))
    for expected in [
        "tether/__init__.py",
        "tether/__main__.py",
        "tether/protocol.py",
        "tether/py.typed",
        "tether/server/app.py",
        "tether/server/auth/service.py",
        "tether/server/auth/lua/session_rotate.lua",
        "tether/server/auth/lua/session_end.lua",
        "tether/server/auth/lua/rate_limit.lua",
        "tether/server/data/store.py",
        "tether/server/data/lua/commit.lua",
        "tether/server/data/lua/read.lua",
        "tether/server/realtime/core.py",
        "tether/server/redis/connection.py",
        "tether/client/connection.py",
        "tether/client/__main__.py",
        # What `tether serve` gives browsers: the client module and the demo page.
        "tether/server/static/tether.js",
        "tether/server/static/index.html",
    ]:
        assert expected in names, expected
    # Every Python file of the source tree is in the wheel (a subpackage missing from
    # pyproject's package list would be left out silently).
    for root in (REPO / "server", REPO / "client"):
        for source in root.rglob("*.py"):
            assert source.relative_to(root).as_posix() in names, source
    assert not any("tests/" in name or name.startswith(("server/", "client/")) for name in names)


def test_the_public_api_imports_from_the_built_wheel(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    code = (
        "import tether\n"
        "from tether import App, Context, FunctionError, TetherClient\n"
        "from tether.protocol import CloseCode\n"
        "import tether.server.app, tether.server.cli\n"
        # The browser files load from the installed package (as `tether serve` reads them).
        "from tether.server.browser import browser_routes\n"
        "assert len(browser_routes(demo=True)) == 2\n"
        "print(tether.__file__)\n"
    )
    # The extracted wheel comes first on sys.path, ahead of the editable install's finder.
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "site" / "tether" / "__init__.py")
    # ``tether`` and ``python -m tether`` are one program.
    help_text = subprocess.run(
        [sys.executable, "-m", "tether", "--help"],
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_text.returncode == 0, help_text.stderr
    for command in ("serve", "watch", "call", "login"):
        assert command in help_text.stdout


def test_the_oldest_constraints_pin_every_lower_bound_of_pyproject() -> None:
    """``.ci/oldest.txt`` (``make test-oldest``, run by CI) pins each runtime dependency at the
    lowest version ``pyproject.toml`` admits, so that lower bound is one the tests ran."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lower: dict[str, Version] = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        bounds = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert len(bounds) == 1, f"{line}: give exactly one lower bound (>=)"
        lower[canonicalize_name(requirement.name)] = Version(bounds[0])
    pinned: dict[str, Version] = {}
    for raw in (REPO / ".ci" / "oldest.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pinned[canonicalize_name(requirement.name)] = Version(spec.version)
    assert pinned == lower
