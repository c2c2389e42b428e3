"""Clients: the Snowball clients one partition uses, created the ordinary way, closed after.

Clients come from the member account's aiobotocore session (see credentials.py), so endpoint
settings follow the SDK conventions: `AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_SNOWBALL` and the
profile's `services` section all apply. botocore's retries are off (see retry.py).
"""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any

from .credentials import CredentialBroker, client_config
from .plan import Partition

__all__ = ["PartitionClients"]


class PartitionClients:
    """Opens a Snowball client per region on first use and closes them all on exit.

    Keyword options: `broker` (the run's CredentialBroker), `timeout` (connect and read
    timeout of each request, seconds).
    """

    def __init__(self, *, broker: CredentialBroker, timeout: float) -> None:
        self._broker = broker
        self._timeout = timeout
        self._stack: contextlib.AsyncExitStack | None = None
        self._clients: dict[str, Any] = {}
        self.created = 0

    async def __aenter__(self) -> PartitionClients:
        if self._stack is not None:
            raise RuntimeError("PartitionClients is already open")
        self._stack = contextlib.AsyncExitStack()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._clients.clear()
        if stack is not None:
            await stack.aclose()

    async def client(self, partition: Partition, region: str) -> Any:
        """The client for `region` in the partition's account (assumes the role if needed)."""
        client = self._clients.get(region)
        if client is None:
            if self._stack is None:
                raise RuntimeError("PartitionClients is not open")
            session = await self._broker.session_for(partition.account)
            client = await self._stack.enter_async_context(
                session.create_client(
                    "snowball", region_name=region, config=client_config(timeout=self._timeout)
                )
            )
            self.created += 1
            self._clients[region] = client
        return client

    async def renew(self, partition: Partition) -> None:
        """Expired credentials: assume the role again and recreate this partition's clients."""
        self._broker.forget(partition.account)
        old, self._clients = self._clients, {}
        for client in old.values():
            await client.close()
