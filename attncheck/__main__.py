"""``python -m attncheck``: the same as the ``attncheck`` command."""

import sys

from attncheck.cli import main

sys.exit(main())
