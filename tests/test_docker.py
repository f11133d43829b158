"""What the Docker image promises, read from ``Dockerfile`` and ``docker-compose.yml``.

No Docker engine runs the tests, so the image is checked from its text: every directory the
server writes to in a container exists in the image and belongs to the user it runs as (a fresh
named volume takes the owner of the directory it is mounted over; a root-owned ``/keys`` made
the server fail with ``OSError … keys.json.lock``), and the example application is in it.
``docker-compose config`` validates the compose file where it is installed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def _runtime_user(instructions: list[tuple[str, str]]) -> str:
    users = [args.strip() for keyword, args in instructions if keyword == "USER"]
    assert users, "the image must not run as root"
    return users[-1]


def _prepared_directories(instructions: list[tuple[str, str]], user: str) -> set[str]:
    """Directories a RUN before the last USER both creates (mkdir) and gives to ``user``."""
    made: set[str] = set()
    owned: set[str] = set()
    last_user = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "USER")
    for keyword, args in instructions[:last_user]:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            words = shlex.split(command)
            if not words:
                continue
            operands = [w for w in words[1:] if not w.startswith("-")]
            if words[0] == "mkdir":
                made.update(operands)
            elif words[0] == "chown" and operands and operands[0].split(":")[0] == user:
                owned.update(operands[1:])
    return made & owned


def _written_directories(instructions: list[tuple[str, str]]) -> set[str]:
    """Where the server writes: the image's TETHER_DATA_DIR, and in docker-compose.yml the
    directory of TETHER_KEYS_FILE / TETHER_DATA_DIR and every volume a Tether service mounts."""
    dirs: set[str] = set()
    for keyword, args in instructions:
        match = re.fullmatch(r"TETHER_DATA_DIR[= ](\S+)", args.strip())
        if keyword == "ENV" and match:
            dirs.add(match.group(1))
    compose = (REPO / "docker-compose.yml").read_text()
    for match in re.finditer(r"TETHER_KEYS_FILE:\s*(\S+)", compose):
        dirs.add(str(PurePosixPath(match.group(1)).parent))
    for match in re.finditer(r"TETHER_DATA_DIR:\s*(\S+)", compose):
        dirs.add(match.group(1))
    # Volumes of the services built from this Dockerfile (`build: .`), up to the next service.
    for service in re.finditer(r"(?ms)^  [\w-]+:.*?(?=^  [\w-]+:|^\S|\Z)", compose):
        if re.search(r"^\s+build:\s*\.\s*$", service.group(0), re.M):
            for volume in re.finditer(r"^\s+-\s+[\w.-]+:(/[^:\s]*)", service.group(0), re.M):
                dirs.add(volume.group(1))
    return dirs


def test_every_directory_the_server_writes_belongs_to_its_user() -> None:
    instructions = _instructions()
    user = _runtime_user(instructions)
    written = _written_directories(instructions)
    assert {"/data", "/keys"} <= written  # what this test reads today
    missing = written - _prepared_directories(instructions, user)
    assert not missing, f"not created and chowned to {user} in the Dockerfile: {sorted(missing)}"


def test_the_image_carries_the_example_application() -> None:
    copies = [args.split() for keyword, args in _instructions() if keyword == "COPY"]
    assert any(parts[0] == "examples" for parts in copies), copies
    assert (REPO / "examples" / "todos.py").is_file()


def test_docker_compose_accepts_the_compose_file() -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        # CI installs Debian's docker-compose (.ci/install-compose): there, its absence fails.
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("CI must validate docker-compose.yml, but docker-compose is not installed")
        pytest.skip("docker-compose is not installed (bash .ci/install-compose)")
    result = subprocess.run(
        [compose, "-f", str(REPO / "docker-compose.yml"), "config", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
