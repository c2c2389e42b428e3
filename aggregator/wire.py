"""Wire: cheaper response handling through botocore's public hooks (filled in by issue 7).

`install(session)` registers, on one aiobotocore session, the handlers that make ListJobs cheap
to parse. Every client created from the session afterwards inherits them.
"""

from __future__ import annotations

from aiobotocore.session import AioSession

__all__ = ["install"]


def install(session: AioSession) -> None:
    """Register the wire optimisations on `session` (none yet)."""
