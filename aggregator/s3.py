"""S3: the snapshot layout under a bucket prefix (`output.directory = "s3://bucket/prefix"`).

Same layout, order and guarantees as a directory (see snapshot.py), with S3's own atomicity: an
object appears whole or not at all. An object up to `multipart_threshold` is one PutObject;
a larger one goes up as a multipart upload (parts of `part_size`, at most `max_uploads` in
flight) that is completed only once every part is in, so the data, manifest and change objects
land first and the LATEST object last. An upload left behind by a crash is aborted by `prune`
(a bucket lifecycle rule `AbortIncompleteMultipartUpload` is a good backstop).

The client is created the ordinary way from the hub session: credentials follow the standard
chain, and the endpoint honours `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`) and a profile's
`services` section. Permissions needed on the prefix: s3:PutObject, s3:GetObject,
s3:ListBucket, s3:DeleteObject, s3:AbortMultipartUpload (and, for `prune` to find uploads that
crashed runs left, s3:ListBucketMultipartUploads; without it that cleanup is skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from .errors import OutputError, redact, watch_signed_tokens
from .snapshot import (
    ARTIFACT_RE,
    LATEST,
    READ_CHUNK,
    NotPublishedError,
    Pruned,
    Sink,
    Store,
    latest_snapshot_id,
    manifest_path,
    to_the_end,
)

__all__ = ["MAX_PREFIX", "S3Store", "parse_s3_url"]

log = structlog.get_logger()

MiB = 1 << 20
_MIN_PART = 5 * MiB  # S3's minimum size of every part but the last
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_ADDRESS = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}", re.ASCII)
# The longest prefix an output URL may have (checked where one is configured: config.py). An
# S3 key is at most 1,024 bytes, and the longest key the store writes below the prefix is a
# sharded run's manifest: `/shards/run=<64>/shard=<n>-of-<n>/snapshots/date=<10>/<id>` +
# `.manifest.json`, about 160 bytes.
MAX_PREFIX = 800
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix"); ValueError if malformed."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3://bucket/prefix URL")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    # Not echoed: what precedes the @ may be a key and its secret (`user:secret@`), which may
    # hold a "/" (so the bucket is then only part of it). An @ in the prefix of a valid bucket
    # is a key's.
    if "@" in bucket or (
        "@" in url and ":" in url[len("s3://") : url.rindex("@")] and not _BUCKET.fullmatch(bucket)
    ):
        raise ValueError("an s3:// URL carries no credentials (user:secret@bucket is refused)")
    if (
        not _BUCKET.fullmatch(bucket)
        or ".." in bucket
        or ".-" in bucket
        or "-." in bucket
        or _IP_ADDRESS.fullmatch(bucket)
    ):
        raise ValueError(
            f"{bucket!r} in {url!r} is not a valid S3 bucket name "
            "(3-63 lowercase letters, digits, dots and hyphens, not an IP address)"
        )
    if any(ord(c) < 32 or c == "\x7f" for c in prefix):  # as for a local directory
        raise ValueError(f"{url!r} holds a control character (a NUL, a newline...)")
    prefix = prefix.strip("/")
    if "//" in prefix:
        raise ValueError(f"{url!r}: the prefix has an empty path segment")
    return bucket, prefix


class _Errors:
    """`with _Errors(location, action):` turns botocore and connection errors into
    OutputError naming the location, the action and the S3 error code."""

    def __init__(self, location: str, action: str) -> None:
        self.location = location
        self.action = action

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = error.get("Code") or "Unknown"
            message = " ".join(str(error.get("Message") or "").split())
            reason = f"{code}: {message}" if message else str(code)
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            transient = status >= 500 or status == 429 or code in _TRANSIENT_CODES
        elif isinstance(exc, BotoCoreError | aiohttp.ClientError | OSError):
            reason = " ".join(str(exc).split()) or type(exc).__name__
            transient = isinstance(exc, _TRANSIENT_ERRORS)
        else:
            return
        reason = redact(reason)  # an S3-compatible store or a proxy may echo the request
        if len(reason) > _MAX_REASON:
            reason = reason[: _MAX_REASON - 3] + "..."
        raise OutputError(
            f"{self.location}: cannot {self.action}: {reason}", transient=transient
        ) from exc


_MAX_REASON = 400


# S3 answers and transport failures that a later run may not see.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        "NoSuchUpload",  # our upload aborted meanwhile (by a prune elsewhere): try again later
    }
)
_TRANSIENT_ERRORS = (
    EndpointConnectionError,
    ConnectionClosedError,
    ReadTimeoutError,
    ConnectTimeoutError,
    aiohttp.ClientError,
    ConnectionError,
    TimeoutError,
)


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _MISSING


def _denied(exc: ClientError) -> bool:
    """A 403 (a HEAD's has no body: its code is the status)."""
    return str(exc.response.get("Error", {}).get("Code")) in {"AccessDenied", "403", "Forbidden"}


class _S3Sink(Sink):
    """A buffered object: one PutObject at publish, or a multipart upload once the body
    passes the threshold (parts upload while the rest is still being produced)."""

    def __init__(
        self, store: S3Store, key: str, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        self._store = store
        self._key = key
        self._type = content_type
        self._metadata = dict(metadata)
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: dict[int, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._next_part = 1

    async def write(self, data: bytes) -> None:
        self._buf += data
        store = self._store
        if self._upload_id is None and len(self._buf) > store.multipart_threshold:
            with store.errors("write the snapshot"):
                answer = await store.client.create_multipart_upload(
                    Bucket=store.bucket,
                    Key=self._key,
                    ContentType=self._type,
                    Metadata=self._metadata,
                )
            self._upload_id = answer["UploadId"]
        if self._upload_id is not None:
            while len(self._buf) >= store.part_size:
                await self._send(bytes(self._buf[: store.part_size]))
                del self._buf[: store.part_size]

    async def _send(self, body: bytes) -> None:
        """Upload one part in the background, keeping at most `max_uploads` in flight."""
        await self._reap(self._store.max_uploads - 1)
        number, self._next_part = self._next_part, self._next_part + 1
        self._tasks.append(asyncio.create_task(self._upload_part(number, body)))

    async def _reap(self, keep: int) -> None:
        """Wait until at most `keep` part uploads are in flight, raising the first failure.
        A task leaves `_tasks` only once it is done and its outcome taken, so after a failure
        the uploads still running stay there for `abort` to cancel and await."""
        while len(self._tasks) > keep:
            done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in self._tasks[:]:
                if task in done:
                    self._tasks.remove(task)
                    task.result()

    async def _upload_part(self, number: int, body: bytes) -> None:
        store = self._store
        with store.errors("write the snapshot"):
            answer = await store.client.upload_part(
                Bucket=store.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
            )
        self._parts[number] = answer["ETag"]

    async def seal(self) -> None:
        if self._upload_id is None:
            return  # one PutObject at publish
        if self._buf:
            await self._send(bytes(self._buf))
            self._buf.clear()
        await self._reap(0)

    async def publish(self) -> None:
        store = self._store
        with store.errors("write the snapshot"):
            if self._upload_id is None:
                await store.client.put_object(
                    Bucket=store.bucket,
                    Key=self._key,
                    Body=bytes(self._buf),
                    ContentType=self._type,
                    Metadata=self._metadata,
                )
            else:
                await store.client.complete_multipart_upload(
                    Bucket=store.bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={
                        "Parts": [
                            {"ETag": e, "PartNumber": n} for n, e in sorted(self._parts.items())
                        ]
                    },
                )
        self._buf = bytearray()

    async def abort(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._buf = bytearray()
        if self._upload_id is not None:
            store = self._store
            with store.errors("abort an upload"):
                await store.client.abort_multipart_upload(
                    Bucket=store.bucket, Key=self._key, UploadId=self._upload_id
                )
            self._upload_id = None


_TEXT = "text/plain; charset=utf-8"


def _content_type(rel: str) -> str:
    if rel.endswith(".gz"):
        return "application/gzip"
    if rel.endswith(".jsonl"):
        return "application/x-ndjson"
    if rel.endswith(".json"):
        return "application/json"
    return _TEXT


class S3Store(Store):
    """Snapshots under `s3://bucket/prefix`.

    Keyword options (besides `compress` and `gzip_level`): `session` (an AioSession for the
    credentials; default: a new one, i.e. the standard chain), `region_name` (default: the
    session's), `multipart_threshold` (bytes above which an object is uploaded in parts;
    default 16 MiB), `part_size` (default 8 MiB, at least 5 MiB), `max_uploads` (parts in
    flight per object; default 4), `max_attempts` (per request, botocore's standard retry
    mode; default 5).
    """

    def __init__(
        self,
        url: str,
        *,
        session: AioSession | None = None,
        region_name: str | None = None,
        multipart_threshold: int = 16 * MiB,
        part_size: int = 8 * MiB,
        max_uploads: int = 4,
        max_attempts: int = 5,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.bucket, self.prefix = parse_s3_url(url)
        self.location = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        if part_size < _MIN_PART:
            raise ValueError(f"part_size must be at least 5 MiB, got {part_size}")
        if max_uploads < 1:
            raise ValueError(f"max_uploads must be >= 1, got {max_uploads}")
        self.multipart_threshold = max(multipart_threshold, part_size)
        self.part_size = part_size
        self.max_uploads = max_uploads
        self._session = session
        self._region = region_name
        self._attempts = max_attempts
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The aiobotocore S3 client (only while the store is open)."""
        if self._client is None:
            raise RuntimeError("S3Store is not open (use `async with`)")
        return self._client

    def errors(self, action: str) -> _Errors:
        return _Errors(self.location, action)

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def locate(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self._key(rel)}" if rel else self.location

    async def _open_backend(self) -> None:
        stack = contextlib.AsyncExitStack()
        session = self._session or AioSession()
        watch_signed_tokens(session)  # a store or a proxy that quotes the request: masked
        config = AioConfig(retries={"mode": "standard", "total_max_attempts": self._attempts})
        with self.errors("connect"):
            self._client = await stack.enter_async_context(
                session.create_client("s3", region_name=self._region, config=config)
            )
        self._stack = stack

    async def _close_backend(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _check_writable(self) -> None:
        key = self._key(".write-probe")
        with self.errors("write to the output location"):
            await self.client.put_object(Bucket=self.bucket, Key=key, Body=b"")
            await self.client.delete_object(Bucket=self.bucket, Key=key)

    async def _open(self, rel: str, metadata: Mapping[str, str] | None = None) -> Sink:
        return _S3Sink(self, self._key(rel), _content_type(rel), metadata or {})

    async def _read_previous_id(self, snapshot_id: str) -> str | None:
        """From the manifest object's metadata (a HEAD, not the whole manifest), falling back
        to reading it for manifests written without that metadata."""
        key = self._key(manifest_path(snapshot_id))
        with self.errors("read a manifest"):
            try:
                head = await self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _missing(exc) or (
                    _denied(exc) and await self._absent(manifest_path(snapshot_id))
                ):
                    return None
                raise
        links = head.get("Metadata") or {}
        if links.get("snapshot-id") == snapshot_id:
            return links.get("previous-snapshot-id") or None
        return await super()._read_previous_id(snapshot_id)

    async def _publish(self, snapshot_id: str, previous_id: str | None, latest: bytes) -> None:
        """`Store._publish` as one atomic step: LATEST is read with its ETag and replaced by a
        conditional PUT (`If-Match` that ETag, or `If-None-Match: *` when there is none), so
        a writer that published in between makes this PUT fail instead of being overwritten.
        An endpoint that does not implement conditional writes (some S3-compatible stores)
        gets the plain PUT, as `Store._publish` does it."""
        key = self._key(LATEST)
        with self.errors("read LATEST"):
            try:
                answer = await self.client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if not (_missing(exc) or (_denied(exc) and await self._absent(LATEST))):
                    raise
                rel, condition = None, {"IfNoneMatch": "*"}
            else:
                async with answer["Body"] as body:
                    rel = (await body.read()).decode("utf-8", "replace").strip()
                etag = answer.get("ETag")
                condition = {"IfMatch": etag} if etag else {}
        current = latest_snapshot_id(rel)
        if current != previous_id:
            raise self._not_published(snapshot_id, previous_id, current)
        try:
            # From here LATEST may move: a cancellation (SIGTERM, a shutdown deadline) waits
            # for the answer, so that a run that published never reports itself cancelled.
            await to_the_end(self._replace_latest(key, latest, condition, snapshot_id, previous_id))
        except OutputError as exc:
            if not exc.transient:
                raise
            # A PUT that S3 applied but whose answer was lost (a timeout, a reset) is published
            # all the same; LATEST says so. (A re-read that fails too leaves the error as is.)
            try:
                named = latest_snapshot_id(await self._latest_rel())
            except OutputError:
                raise exc from None
            if named != snapshot_id:
                raise

    async def _replace_latest(
        self,
        key: str,
        latest: bytes,
        condition: dict[str, str],
        snapshot_id: str,
        previous_id: str | None,
    ) -> None:
        with self.errors("write LATEST"):
            put = {"Bucket": self.bucket, "Key": key, "Body": latest, "ContentType": _TEXT}
            try:
                await self.client.put_object(**put, **condition)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code"))
                if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    # Another writer, or botocore retrying our own PUT that S3 had applied
                    # (its answer lost): LATEST says which.
                    named = latest_snapshot_id(await self._latest_rel())
                    if named == snapshot_id:
                        return
                    if named == previous_id:  # 409: another conditional write was in flight
                        raise NotPublishedError(
                            f"{self.location}: snapshot {snapshot_id} was written but not "
                            f"published: replacing LATEST conflicted with another write in "
                            f"flight ({code}); LATEST still names {previous_id or 'nothing'}, "
                            "which the next run starts from",
                            lost=False,  # the write in flight may be our own, and land
                        ) from None
                    raise self._not_published(snapshot_id, previous_id, named) from None
                if code not in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
                    raise
                log.warning("s3.conditional_write_unsupported", code=code)
                await self.client.put_object(**put)

    async def _read(self, rel: str) -> bytes | None:
        with self.errors(f"read {rel}"):
            try:
                answer = await self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
            except ClientError as exc:
                if _missing(exc) or (_denied(exc) and await self._absent(rel)):
                    return None
                raise
            async with answer["Body"] as body:
                data: bytes = await body.read()
                return data

    async def _absent(self, rel: str) -> bool:
        """Whether `rel` is not there, by listing it: S3 answers a GetObject of a key that does
        not exist with 403, not 404, unless the caller may list the bucket for that request,
        and a ListBucket grant limited by `s3:prefix` (as the shipped IAM policy has it) may
        not count for a GetObject. False when the listing is refused too (then the 403
        stands)."""
        key = self._key(rel)
        try:
            listed = await self.client.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1)
        except ClientError:
            return False
        return not any(item.get("Key") == key for item in listed.get("Contents") or ())

    async def _stream(self, rel: str) -> AsyncIterator[bytes]:
        with self.errors(f"read {rel}"):
            try:
                answer = await self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
            except ClientError as exc:
                if _missing(exc):
                    raise OutputError(f"{self.locate(rel)}: missing") from exc
                raise
            async with answer["Body"] as body:
                while chunk := await body.read(READ_CHUNK):
                    yield chunk

    async def _list(self) -> dict[str, float]:
        return await self._listed("snapshots/", "changes/")

    async def _list_shards(self) -> dict[str, float]:
        return await self._listed("shards/")

    async def _listed(self, *tops: str) -> dict[str, float]:
        """The objects under the `tops` prefixes (relative to the location), with the time
        each was last modified (epoch seconds)."""
        out: dict[str, float] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        with self.errors("list the output location"):
            for top in tops:
                async for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(top)):
                    for o in page.get("Contents", ()):
                        out[self._rel(o["Key"])] = o["LastModified"].timestamp()
        return out

    async def _delete(self, rels: Sequence[str]) -> None:
        for batch in _chunks(list(rels), 1000):
            with self.errors("delete old snapshots"):
                answer = await self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._key(r)} for r in batch], "Quiet": True},
                )
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise OutputError(
                    f"{self.location}: cannot delete old snapshots: {first.get('Code')}: "
                    f"{first.get('Key')} (and {len(errors) - 1} more)"
                )

    async def prune(self, retain: int) -> Pruned:
        """As `Store.prune`, and abort multipart uploads that crashed runs left behind."""
        pruned = await super().prune(retain)
        latest_rel = await self._latest_rel()
        found = ARTIFACT_RE.fullmatch(latest_rel or "")
        if found is not None:
            try:
                await self._abort_stale_uploads(found["id"], pruned.shard_runs)
            except OutputError as exc:  # e.g. no s3:ListBucketMultipartUploads: best effort
                log.info("snapshot.upload_cleanup_skipped", error=str(exc))
        return pruned

    async def _abort_stale_uploads(self, latest: str, shard_runs: Sequence[str] = ()) -> None:
        """Abort the uploads of snapshots older than `latest`, and those under the folders of
        `shard_runs` (pruned), once they started `debris_age` ago: a writer elsewhere may
        still be uploading a snapshot whose id sorts first (its clock is behind ours)."""
        started_before = self._clock() - self._debris_age
        doomed_runs = {f"shards/run={run}/" for run in shard_runs}
        paginator = self.client.get_paginator("list_multipart_uploads")
        with self.errors("list multipart uploads"):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key("")):
                for upload in page.get("Uploads", ()):
                    rel = self._rel(upload["Key"])
                    m = ARTIFACT_RE.fullmatch(rel)
                    stale = (m is not None and m["id"] < latest) or any(
                        rel.startswith(run) for run in doomed_runs
                    )
                    initiated = upload.get("Initiated")
                    if not stale or (initiated and initiated.timestamp() > started_before):
                        continue
                    await self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    log.info("snapshot.upload_aborted", key=upload["Key"])


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
