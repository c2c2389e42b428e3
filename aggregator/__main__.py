"""`python -m aggregator` is the `snowball-aggregator` command."""

import sys

from .launch import main

sys.exit(main())
