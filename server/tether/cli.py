"""The ``tether`` command (also ``python -m tether``): the server's commands and the client's.

::

    tether serve | keys rotate | sessions revoke      tether.server.cli
    tether query | watch | call | login               tether.client.cli

Each side owns its commands and neither imports the other: the command is composed here, in
the package root, which may import both. Exit codes: 0 success, 1 a runtime failure, 2 a usage
or configuration error.
"""

from __future__ import annotations

from tether.client.cli import add_client_commands
from tether.server import cli as server_cli

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run ``tether`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    return server_cli.main(argv, more_commands=(add_client_commands,))
