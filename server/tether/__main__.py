"""``python -m tether …``: the same program as the ``tether`` command."""

from tether.cli import main

raise SystemExit(main())
