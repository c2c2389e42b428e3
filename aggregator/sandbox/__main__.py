"""``python -m aggregator.sandbox``: serve the fake AWS endpoint (see ``command.py``)."""

import sys

from .command import main

sys.exit(main())
