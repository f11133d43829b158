"""``python -m server …``: the same program as the ``tether`` command."""

from server.cli import main

raise SystemExit(main())
