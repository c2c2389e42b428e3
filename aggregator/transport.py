"""Transport: one aiohttp connection pool (and one TLS context) shared by all our clients.

Stock aiobotocore gives every client its own aiohttp session, connector and TLS context, and
building that context loads the CA bundle: about 15 ms of CPU per client, and one pool of idle
connections per client. We make a client per (account, region), thousands per cycle, so they
share instead: `shared_session_class()` returns an `AIOHTTPSession` subclass for aiobotocore's
documented `AioConfig(http_session_cls=...)` option whose instances all draw from one
`SharedPool`. aiobotocore's own request code, proxy support and error mapping stay in use; the
subclass only decides which aiohttp session a client sends through, and that it never follows
a redirect: botocore's own send does not (a 3xx is the service's answer, handled by botocore),
while aiohttp by default would re-send the signed request, session token included, to whatever
address the answer names, and hand its answer back as the service's.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

import aiohttp
from aiobotocore.httpsession import AIOHTTPSession

__all__ = ["SharedPool", "shared_session_class"]


class SharedPool:
    """aiohttp sessions keyed by the settings that make them differ (proxy, TLS, timeout).

    Keyword options: `limit` (connections open at once across all clients; default 100).
    Closed, with every connection, by its owner (an async context manager).
    """

    def __init__(self, *, limit: int = 100) -> None:
        self.limit = limit
        self.sessions: dict[tuple[Any, ...], aiohttp.ClientSession] = {}
        self.lock = asyncio.Lock()

    async def __aenter__(self) -> SharedPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            await session.close()


class _NoRedirects:
    """An aiohttp session as aiobotocore uses one (`request`), with redirects not followed."""

    __slots__ = ("session",)

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        kwargs["allow_redirects"] = False
        return self.session.request(method, url, **kwargs)


def shared_session_class(pool: SharedPool) -> type[AIOHTTPSession]:
    """An `http_session_cls` whose instances send through `pool`'s shared sessions."""

    class SharedHTTPSession(AIOHTTPSession):  # type: ignore[misc]
        async def _get_session(self, proxy_url: str | None) -> Any:
            key = (proxy_url, self._verify, self._cert_file, self._key_file, self._timeout)
            session = pool.sessions.get(key)
            if session is None:
                async with pool.lock:
                    session = pool.sessions.get(key)
                    if session is None:
                        self._max_pool_connections = pool.limit
                        connector = await self._create_connector(proxy_url)
                        session = aiohttp.ClientSession(
                            connector=connector,
                            timeout=self._timeout,
                            skip_auto_headers={"CONTENT-TYPE"},
                            auto_decompress=False,
                        )
                        pool.sessions[key] = session
            return _NoRedirects(session)

    return SharedHTTPSession
