"""``python -m client watch|call|login …``: the client commands of ``tether`` on their own."""

import sys

from client.cli import main

sys.exit(main())
