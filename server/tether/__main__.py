"""``python -m tether …``: the same program as the ``tether`` command."""

from tether.server.cli import main

raise SystemExit(main())
