"""``python -m mpsearch.cli``: the ``mpsearch`` command."""

import sys

from . import main

sys.exit(main())
