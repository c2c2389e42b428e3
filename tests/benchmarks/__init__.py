"""Benchmarks (issue 7): `python -m tests.benchmarks` (`make bench`), not part of `make test`."""
