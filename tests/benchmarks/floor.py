"""The CPU floor: raw SigV4-signed aiohttp requests whose bodies orjson parses.

No SDK at all: the least any client must do per page (sign, send, receive, decode), so its CPU
per page is the floor the issue measures the aggregator against. It runs the same plan as the
aggregator (AssumeRole per account, every (account, region) chain paginated in order, the same
global concurrency and per-partition rate) and dedupes job ids, but writes no snapshot.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import time
import urllib.parse
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

__all__ = ["Floor"]

_TARGET = "AWSIESnowballJobManagementService.ListJobs"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


class _Signer:
    """SigV4 for one set of keys; signing keys cached per (day, region, service)."""

    def __init__(self, access_key: str, secret_key: str, token: str | None) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.token = token
        self._keys: dict[tuple[str, str, str], bytes] = {}

    def sign(
        self, host: str, region: str, service: str, headers: dict[str, str], body: bytes
    ) -> dict[str, str]:
        amz_date = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        headers = {**headers, "host": host, "x-amz-date": amz_date}
        if self.token:
            headers["x-amz-security-token"] = self.token
        names = sorted(headers)
        canonical = "\n".join(
            (
                "POST",
                "/",
                "",
                *(f"{name}:{headers[name]}" for name in names),
                "",
                ";".join(names),
                hashlib.sha256(body).hexdigest(),
            )
        )
        scope = f"{day}/{region}/{service}/aws4_request"
        to_sign = (
            f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n"
            + hashlib.sha256(canonical.encode()).hexdigest()
        )
        key = self._keys.get((day, region, service))
        if key is None:
            key = _hmac(_hmac(_hmac(("AWS4" + self.secret_key).encode(), day), region), service)
            key = self._keys[(day, region, service)] = _hmac(key, "aws4_request")
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        del headers["host"]
        return headers


def _xml_value(text: str, tag: str) -> str:
    start = text.index(f"<{tag}>") + len(tag) + 2
    return text[start : text.index(f"</{tag}>", start)]


class _Window:
    """At most `rate` requests in any 1-second window (the aggregator's pacing, simplified)."""

    def __init__(self, rate: float) -> None:
        self.count = max(1, int(rate))
        self.period = self.count / rate
        self.log: collections.deque[float] = collections.deque()

    async def acquire(self) -> None:
        while True:
            now = time.monotonic()
            while self.log and now - self.log[0] >= self.period:
                self.log.popleft()
            if len(self.log) < self.count:
                self.log.append(now)
                return
            await asyncio.sleep(self.period - (now - self.log[0]))


class Floor:
    """Runs the plan with raw requests. Keyword options as for the aggregator's limits."""

    def __init__(
        self,
        *,
        url: str,
        hub_keys: tuple[str, str],
        role_name: str,
        max_concurrency: int,
        requests_per_second: float,
    ) -> None:
        self.url = url.rstrip("/") + "/"
        self.host = urllib.parse.urlsplit(url).netloc
        self.hub = _Signer(*hub_keys, None)
        self.role_name = role_name
        self.gate = asyncio.Semaphore(max_concurrency)
        self.workers = 4 * max_concurrency
        self.rate = requests_per_second
        self.requests = 0
        self.pages = 0
        self.jobs: set[tuple[str, str]] = set()
        self._http: aiohttp.ClientSession | None = None

    async def _post(self, headers: dict[str, str], body: bytes) -> bytes:
        assert self._http is not None
        async with self.gate:
            self.requests += 1
            async with self._http.post(self.url, data=body, headers=headers) as response:
                data = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
                return data

    async def _assume(self, account_id: str) -> _Signer:
        form = urllib.parse.urlencode(
            {
                "Action": "AssumeRole",
                "Version": "2011-06-15",
                "RoleArn": f"arn:aws:iam::{account_id}:role/{self.role_name}",
                "RoleSessionName": "floor",
            }
        ).encode()
        headers = self.hub.sign(
            self.host,
            "us-east-1",
            "sts",
            {"content-type": "application/x-www-form-urlencoded; charset=utf-8"},
            form,
        )
        text = (await self._post(headers, form)).decode()
        return _Signer(
            _xml_value(text, "AccessKeyId"),
            _xml_value(text, "SecretAccessKey"),
            _xml_value(text, "SessionToken"),
        )

    async def list_jobs(self, signer: _Signer, region: str, token: str | None) -> Any:
        params: dict[str, Any] = {"MaxResults": 100}
        if token is not None:
            params["NextToken"] = token
        body = orjson.dumps(params)
        headers = signer.sign(
            self.host,
            region,
            "snowball",
            {"content-type": "application/x-amz-json-1.1", "x-amz-target": _TARGET},
            body,
        )
        return orjson.loads(await self._post(headers, body))

    async def _partition(self, account_id: str, signer: _Signer, region: str) -> None:
        window = _Window(self.rate)
        token = None
        while True:
            await window.acquire()
            page = await self.list_jobs(signer, region, token)
            self.pages += 1
            for entry in page["JobListEntries"]:
                self.jobs.add((account_id, entry["JobId"]))
            token = page.get("NextToken")
            if not token:
                return

    async def __aenter__(self) -> Floor:
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    async def round_trip(self, account_id: str, region: str, n: int = 40) -> float:
        """Seconds of one sequential first-page request (the chain's per-page floor)."""
        signer = await self._assume(account_id)
        await self.list_jobs(signer, region, None)
        started = time.perf_counter()
        for _ in range(n):
            await self.list_jobs(signer, region, None)
        return (time.perf_counter() - started) / n

    async def run(self, account_ids: Sequence[str], regions: Sequence[str]) -> None:
        """Every (account, region) chain, accounts interleaved like the aggregator's plan."""
        signers: dict[str, asyncio.Task[_Signer]] = {}
        plan = iter([(a, r) for r in regions for a in account_ids])

        async def worker() -> None:
            for account_id, region in plan:
                task = signers.get(account_id)
                if task is None:
                    task = signers[account_id] = asyncio.ensure_future(self._assume(account_id))
                await self._partition(account_id, await asyncio.shield(task), region)

        async with asyncio.TaskGroup() as tg:
            for _ in range(min(self.workers, len(account_ids) * len(regions))):
                tg.create_task(worker())
