"""Clients: a bounded pool of Snowball clients, reused across cycles.

By default (`shared=True` in the service) there is one client per (partition, region), made
from the broker's member session, and every account's requests go through it: the account is
chosen per request by the credentials bound to the calling task (see credentials.py). Making a
botocore client costs milliseconds of CPU and a hundred KB; a large organisation would need
one per (account, region), tens of thousands per cycle. The stock switch keeps the plain way:
one client per (account, region) from the account's own session.

Clients are created the ordinary way from an aiobotocore session, so endpoint settings follow
the SDK conventions: `AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_SNOWBALL` and the profile's
`services` section all apply. botocore's own
retries are off (see retry.py).

The pool keeps at most `capacity` clients; beyond that the least recently used idle client is
closed. A client in use is never closed under its user. A daemon keeps the pool (and so its
connections) from one cycle to the next.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .accounts import Account
from .credentials import (
    CredentialBroker,
    bound_credentials,
    client_config,
    last_signed_credentials,
)
from .plan import Partition
from .records import Page

if TYPE_CHECKING:
    from .direct import DirectSender

__all__ = ["ClientPool", "PartitionClients"]


class _Slot:
    __slots__ = ("client", "context", "doomed", "session", "users")

    def __init__(self, client: Any, context: Any, session: Any) -> None:
        self.client = client
        self.context = context
        self.session = session
        self.users = 0
        self.doomed = False


class ClientPool:
    """Snowball clients keyed by (account_id, region); an async context manager.

    Keyword options: `broker` (the CredentialBroker that gives account sessions), `timeout`
    (connect and read timeout per request, seconds), `capacity=256` (clients kept open),
    `http_session_cls=None` (aiobotocore's default, or the shared pool's class),
    `shared=False` (True: one client per (partition, region) serves every account, each
    request signed with its account's credentials through `bound_credentials`; False: one
    client per (account, region), each from its account's own session, as stock usage does).
    """

    def __init__(
        self,
        *,
        broker: CredentialBroker,
        timeout: float,
        capacity: int = 256,
        http_session_cls: Any = None,
        shared: bool = False,
    ) -> None:
        self.shared = shared
        self._http_session_cls = http_session_cls
        self._broker = broker
        self._timeout = timeout
        self._capacity = max(1, capacity)
        self._slots: OrderedDict[tuple[str, str], _Slot] = OrderedDict()
        self._open = False
        self.created = 0

    async def __aenter__(self) -> ClientPool:
        if self._open:
            raise RuntimeError("ClientPool is already open")
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        slots = list(self._slots.values())
        self._slots.clear()
        for slot in slots:
            await _close(slot)

    def __len__(self) -> int:
        return len(self._slots)

    def lease(self, account: Account, region: str) -> _Lease:
        """Borrow the client for (account, region), creating it (and the session) if needed:
        `async with pool.lease(account, region) as client:`."""
        return _Lease(self, account, region)

    async def _acquire(self, account: Account, region: str) -> tuple[_Slot, Any]:
        """The slot lent to a lease, counted as in use, and its credentials binding."""
        if not self._open:
            raise RuntimeError("ClientPool is not open")
        credentials = None
        if self.shared:
            # Assumes the role on first use, so a denied role fails here as AssumeRole.
            credentials = await self._broker.credentials_for(account)
            key = (account.partition, region)
        else:
            key = (account.account_id, region)
        slot = self._slots.get(key)
        if slot is None:
            if self.shared:
                session = self._broker.member_session
            else:
                session = await self._broker.session_for(account)
            context = session.create_client(
                "snowball",
                region_name=region,
                config=client_config(
                    timeout=self._timeout,
                    http_session_cls=self._http_session_cls,
                    fixed_user_agent=self.shared,
                ),
            )
            client = await context.__aenter__()
            slot = self._slots.get(key)
            if slot is None:  # nobody created it while we awaited
                slot = self._slots[key] = _Slot(client, context, session)
                self.created += 1
            else:
                await context.__aexit__(None, None, None)
        self._slots.move_to_end(key)
        slot.users += 1
        binding = None
        if credentials is not None:
            broker, fallback = self._broker, credentials
            binding = bound_credentials(lambda: broker.current_credentials(account, fallback))
            binding.__enter__()
        return slot, binding

    async def _release(self, slot: _Slot, binding: Any) -> None:
        if binding is not None:
            binding.__exit__(None, None, None)
        slot.users -= 1
        if slot.doomed and slot.users == 0:
            await _close(slot)
        if len(self._slots) > self._capacity:
            await self._evict()

    def session_of(self, client: Any) -> Any:
        """The account session `client` was made from (None if the pool no longer has it)."""
        return next((s.session for s in self._slots.values() if s.client is client), None)

    async def forget_session(self, session: Any) -> None:
        """Close every client made from `session` (its credentials expired); clients in use
        are closed when their user gives them back."""
        # Taken out all at once, before the first close yields: a renewal of the same account
        # running meanwhile finds none of them (`session_of` is None) instead of racing us.
        doomed = [self._slots.pop(k) for k, s in list(self._slots.items()) if s.session is session]
        for slot in doomed:
            slot.doomed = True
        for slot in doomed:
            if slot.users == 0:
                await _close(slot)

    async def _evict(self) -> None:
        while len(self._slots) > self._capacity:
            victim = next((k for k, s in self._slots.items() if s.users == 0), None)
            if victim is None:
                return
            await _close(self._slots.pop(victim))


class _Lease:
    """`async with pool.lease(account, region) as client:` (a class rather than an async
    generator: one is entered per request)."""

    __slots__ = ("_account", "_binding", "_pool", "_region", "_slot")

    def __init__(self, pool: ClientPool, account: Account, region: str) -> None:
        self._pool = pool
        self._account = account
        self._region = region
        self._slot: _Slot | None = None
        self._binding: Any = None

    async def __aenter__(self) -> Any:
        self._slot, self._binding = await self._pool._acquire(self._account, self._region)
        return self._slot.client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            await self._pool._release(slot, self._binding)


async def _close(slot: _Slot) -> None:
    context, slot.context = slot.context, None
    if context is not None:
        await context.__aexit__(None, None, None)


class PartitionClients:
    """The `ClientSource` of one partition: leases from the pool, page by page."""

    def __init__(
        self, *, pool: ClientPool, broker: CredentialBroker, sender: DirectSender | None = None
    ) -> None:
        self._pool = pool
        self._broker = broker
        self._sender = sender

    def lease(
        self, partition: Partition, region: str
    ) -> contextlib.AbstractAsyncContextManager[Any]:
        return self._pool.lease(partition.account, region)

    async def list_jobs(self, client: Any, params: dict[str, Any], account_id: str) -> Page | None:
        """One ListJobs page of `account_id` on a leased client (None: a 200 without
        `JobListEntries`), through the direct path's prepared request when there is a
        sender (see direct.py)."""
        if self._sender is not None:
            return await self._sender.list_jobs(client, params, account_id)
        return Page.from_response(account_id, await client.list_jobs(**params))

    async def renew_unrecognized(self, partition: Partition, client: Any) -> bool:
        """`client`'s keys were not recognised: whether asking again may help. Yes if another
        partition of the account renewed them meanwhile (ask with the new ones), or if this is
        the account's first such renewal this cycle (renewed now, as `renew` does); no once
        the keys of that renewal were refused too (a denial: renewing on every page of every
        region would multiply AssumeRoles)."""
        if self._pool.shared:
            current = self._broker.still_current(partition.account, last_signed_credentials())
        else:
            current = self._pool.session_of(client) is not None
        if not current:
            return True
        if not self._broker.first_unrecognized(partition.account):
            return False
        await self.renew(partition, client)
        return True

    async def renew(self, partition: Partition, client: Any) -> None:
        """`client` met expired credentials: assume the role again, once per account.

        Partitions of the same account that hit the expiry together renew only once: the
        session is dropped only if it is still the one `client` was made from (with shared
        clients: the credentials are dropped only if they are still the ones this task's last
        request was signed with).
        """
        if self._pool.shared:
            self._broker.forget_credentials(partition.account, last_signed_credentials())
            return
        session = self._pool.session_of(client)
        if session is None:
            return  # another partition already renewed this account
        self._broker.forget(partition.account, session)
        await self._pool.forget_session(session)
