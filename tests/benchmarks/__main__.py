"""`python -m tests.benchmarks`: run the suite and print the table (see suite.py)."""

from .suite import main

raise SystemExit(main())
