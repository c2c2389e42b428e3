"""The fake AWS endpoint: STS, Organizations and Snowball ListJobs on loopback, with faults.

Real, unmodified botocore clients talk to it over HTTP (``endpoint_url=sandbox.url``), so the
test suite, the ``demo`` command and the benchmarks exercise the same code path as production::

    async with Sandbox(fleet=FleetSpec(accounts=20, seed=7)) as sb:
        client = session.create_client("sts", endpoint_url=sb.url, ...)
        sb.truth()   # what a correct aggregator must produce
"""

from .faults import Faults
from .fleet import FleetSpec
from .protocols import cbor_model_path
from .server import Sandbox, Stats

__all__ = ["Faults", "FleetSpec", "Sandbox", "Stats", "cbor_model_path"]
