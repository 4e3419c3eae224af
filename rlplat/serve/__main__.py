"""``python -m rlplat.serve``: see ``rlplat.serve.cli``."""

import sys

from rlplat.serve.cli import main

sys.exit(main())
