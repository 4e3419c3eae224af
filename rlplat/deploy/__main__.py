"""``python -m rlplat.deploy``: the same as ``rlplat-deploy``."""

import sys

from rlplat.deploy.cli import main

sys.exit(main())
