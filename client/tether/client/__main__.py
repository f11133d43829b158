"""``python -m tether.client query|watch|call|login …``: the client commands of ``tether`` on their
own."""

import sys

from tether.client.cli import main

sys.exit(main())
