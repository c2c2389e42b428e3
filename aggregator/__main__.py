"""`python -m aggregator` is the `snowball-aggregator` command."""

import sys

from .cli import main

sys.exit(main())
