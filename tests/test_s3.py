"""S3: the same layout, order and retention in a bucket, against moto's S3 server on loopback
(real aiobotocore clients over HTTP; no AWS account)."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import io
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
from aiobotocore.session import AioSession

from aggregator.errors import OutputError
from aggregator.records import JobRecord
from aggregator.s3 import S3Store, parse_s3_url
from aggregator.snapshot import Store, diff_command, manifest_path, new_snapshot_id, open_store

from .conftest import SandboxFactory, make_settings

MiB = 1 << 20
A = "111111111111"
PARTITIONS = [{"account_id": A, "region": "eu-west-1", "status": "ok"}]


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """moto's S3 (and friends) on 127.0.0.1, a free port, for this module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
async def bucket(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A fresh bucket; S3 clients reach moto through the standard AWS_ENDPOINT_URL_S3."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_url)
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    name = f"inventory-{secrets.token_hex(4)}"
    async with AioSession().create_client("s3") as s3:
        await s3.create_bucket(Bucket=name)
    yield name


async def objects(bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under `prefix`, by key relative to it."""
    out: dict[str, bytes] = {}
    async with AioSession().create_client("s3") as s3:
        async for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            for item in page.get("Contents", ()):
                answer = await s3.get_object(Bucket=bucket, Key=item["Key"])
                async with answer["Body"] as body:
                    out[item["Key"][len(prefix) :]] = await body.read()
    return out


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def sid(n: int) -> str:
    return f"20261128T{15 + n // 60:02d}{n % 60:02d}00Z-{n:04x}"


def records(snapshot_id: str, states: dict[str, str], description: str = "") -> list[JobRecord]:
    return [
        JobRecord.from_json_dict(
            {
                "account_id": A,
                "job_id": job_id,
                "job_state": state,
                "description": description or None,
                "regions": ["eu-west-1"],
                "snapshot_id": snapshot_id,
                "observed_at": "2026-11-28T15:00:03Z",
            }
        )
        for job_id, state in sorted(states.items())
    ]


async def write(store: Store, snapshot_id: str, states: dict[str, str], **kw: Any) -> Any:
    previous = await store.latest_manifest()
    return await store.write(
        snapshot_id,
        records(snapshot_id, states, **kw),
        {"status": "complete", "partition_status": PARTITIONS},
        previous=previous,
    )


def snapshot_ids(keys: Any) -> list[str]:
    return sorted(
        k.rsplit("/", 1)[1].removesuffix(".manifest.json")
        for k in keys
        if k.endswith(".manifest.json")
    )


def test_s3_urls_are_checked() -> None:
    """A bucket name S3 would refuse is reported before any request."""
    assert parse_s3_url("s3://my-bucket") == ("my-bucket", "")
    assert parse_s3_url("s3://my.bucket/a/b/") == ("my.bucket", "a/b")
    for bad in ("s3://", "s3://UPPER/x", "s3://ab", "s3://a..b/x", "s3://ok-bucket/a//b"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)
    # Names S3 refuses too, and prefixes no key could hold (a control character, as for a
    # local directory; longer than a key may be, with our file names under it).
    for bad in ("s3://bkt.-x/y", "s3://bkt-.x/y", "s3://192.168.1.1/x"):
        with pytest.raises(ValueError, match="is not a valid S3 bucket name"):
            parse_s3_url(bad)
    for bad in ("s3://bkt/x\ny", "s3://bkt/x\x00", "s3://bkt/x\x7f"):
        with pytest.raises(ValueError, match="control character"):
            parse_s3_url(bad)
    assert parse_s3_url("s3://1.2.3.4.example/x") == ("1.2.3.4.example", "x")
    # An @ is a user:secret@ only with a colon before it; else the bucket name is just wrong.
    with pytest.raises(ValueError, match="'my_bucket' in 's3://my_bucket/x@y' is not a valid"):
        parse_s3_url("s3://my_bucket/x@y")


async def test_layout_and_write_order_match_a_directory(bucket: str, tmp_path: Path) -> None:
    """The same objects as the local layout under the prefix; data, manifest and change file
    land before LATEST, which is written last."""
    landed: list[tuple[str, str]] = []

    def note(params: dict[str, Any], model: Any, **_: Any) -> None:
        if model.name in ("PutObject", "CompleteMultipartUpload"):
            landed.append((model.name, params["Key"]))

    async with open_store(f"s3://{bucket}/inv/prod") as store:
        assert isinstance(store, S3Store)
        store.client.meta.events.register("provide-client-params.s3.*", note)
        await store.check_writable()
        first = await write(store, sid(0), {"A": "New", "B": "New"})
        landed.clear()
        second = await write(store, sid(1), {"A": "Complete", "C": "New"})
        assert store.locate(second.data_path) == f"s3://{bucket}/inv/prod/{second.data_path}"
    async with open_store(tmp_path) as local:
        await write(local, sid(0), {"A": "New", "B": "New"})
        await write(local, sid(1), {"A": "Complete", "C": "New"})
    stored = await objects(bucket, "inv/prod/")
    on_disk = tree(tmp_path)
    assert on_disk.pop(".LATEST.lock") == b""  # a directory's lock on LATEST; S3 has none
    assert stored.keys() == on_disk.keys()
    for key in stored:
        if not key.endswith(".manifest.json"):
            assert stored[key] == on_disk[key], key
    assert [k for _, k in landed] == [
        f"inv/prod/{second.data_path}",
        f"inv/prod/{second.manifest_path}",
        f"inv/prod/{second.changes_path}",
        "inv/prod/LATEST",
    ]
    assert stored["LATEST"] == second.manifest_path.encode() + b"\n"
    async with AioSession().create_client("s3") as s3:
        head = await s3.head_object(Bucket=bucket, Key=f"inv/prod/{second.manifest_path}")
    assert head["Metadata"] == {
        "snapshot-id": second.snapshot_id,
        "previous-snapshot-id": first.snapshot_id,
    }, "prune reads a manifest's links with a HEAD"
    manifest = orjson.loads(stored[second.manifest_path])
    assert manifest["previous_snapshot_id"] == first.snapshot_id
    assert manifest["changes"]["counts"]["job_removed"] == 1


async def test_large_objects_go_up_in_parts(bucket: str) -> None:
    """Above the threshold the data file is a multipart upload (several parts in flight),
    completed only at the end; its digest and records read back intact."""
    calls: list[str] = []
    states = {f"J{i:06d}": "New" for i in range(14_000)}
    async with S3Store(
        f"s3://{bucket}/big", multipart_threshold=5 * MiB, part_size=5 * MiB, max_uploads=2
    ) as store:
        store.client.meta.events.register(
            "provide-client-params.s3.*", lambda model, **_: calls.append(model.name)
        )
        written = await write(store, sid(0), states, description="x" * 600)
        manifest = await store.latest_manifest()
        assert manifest is not None
        back = [r.job_id async for r in store.read_records(manifest)]
    assert back == sorted(states)
    assert written.bytes > 10 * MiB
    assert calls.count("CreateMultipartUpload") == 1 and calls.count("UploadPart") >= 2
    assert calls.count("CompleteMultipartUpload") == 1
    stored = await objects(bucket, "big/")
    assert hashlib.sha256(stored[written.data_path]).hexdigest() == written.sha256


async def test_gzip_and_previous_snapshot_read_back_from_s3(bucket: str) -> None:
    """A second store (a second run) reads the previous snapshot back from S3, gzip or not,
    and computes the changes from it."""
    async with open_store(f"s3://{bucket}/gz", compress="gzip") as store:
        await write(store, sid(0), {"A": "New", "B": "New"})
    async with open_store(f"s3://{bucket}/gz", compress="gzip") as store:
        previous = await store.latest_manifest()
        assert previous is not None and previous["data"]["path"].endswith(".jsonl.gz")
        assert [r.job_id async for r in store.read_records(previous)] == ["A", "B"]
        second = await write(store, sid(1), {"A": "Complete"})
    stored = await objects(bucket, "gz/")
    events = gzip.decompress(stored[second.changes_path]).splitlines()
    assert [orjson.loads(e)["event"] for e in events] == ["state_changed", "job_removed"]
    assert gzip.decompress(stored[second.data_path]).count(b"\n") == 1


async def test_retention_on_s3(bucket: str) -> None:
    """Exactly `retain` snapshots stay, the newest; an unpublished snapshot and uploads that
    crashed runs left are cleaned up; LATEST's snapshot and newer uploads are kept."""
    url = f"s3://{bucket}/keep"
    async with open_store(url, debris_age=0) as store:
        for n in range(4):
            await write(store, sid(n), {"A": "New", f"J{n}": "New"})  # a crash before prune
    async with open_store(url, debris_age=0) as store:
        pruned = await store.prune(2)
    assert pruned.expired == (sid(0), sid(1))
    assert snapshot_ids(await objects(bucket, "keep/")) == [sid(2), sid(3)]

    async with AioSession().create_client("s3") as s3:
        old = await s3.create_multipart_upload(
            Bucket=bucket, Key=f"keep/snapshots/date=2026-11-28/{sid(1)}.jsonl"
        )
        new = await s3.create_multipart_upload(
            Bucket=bucket, Key=f"keep/snapshots/date=2026-11-28/{sid(9)}.jsonl"
        )
        async with open_store(url, debris_age=0) as store:
            latest = (await objects(bucket, "keep/"))["LATEST"]
            await write(store, sid(4), {"A": "Complete"})
            await s3.put_object(Bucket=bucket, Key="keep/LATEST", Body=latest)  # crash
            await write(store, sid(5), {"A": "Complete"})
            pruned = await store.prune(2)
        uploads = await s3.list_multipart_uploads(Bucket=bucket, Prefix="keep/")
    assert pruned.orphaned == (sid(4),)
    assert snapshot_ids(await objects(bucket, "keep/")) == [sid(3), sid(5)]
    left = {u["UploadId"] for u in uploads.get("Uploads", ())}
    assert old["UploadId"] not in left and new["UploadId"] in left


async def test_prune_on_s3_removes_the_objects_of_old_shard_runs(bucket: str) -> None:
    """On S3 too, a sharded run's objects (`<prefix>/shards/run=<id>/...`) go once all are
    older than the start of the oldest snapshot kept; an object under `shards/` outside a run
    folder, and the same run's objects under another prefix, stay."""
    old_run = ("shards/run=r1/shard=0-of-2/LATEST", "shards/run=r1/shard=1-of-2/x.jsonl")
    async with AioSession().create_client("s3") as s3:
        for key in (*(f"sh/{k}" for k in old_run), "sh/shards/notes.txt", f"other/{old_run[0]}"):
            await s3.put_object(Bucket=bucket, Key=key, Body=b"x\n")
    later = datetime.now(UTC) + timedelta(hours=2)  # snapshots that start after those objects
    ids = [new_snapshot_id(later), new_snapshot_id(later + timedelta(minutes=1))]
    async with open_store(
        f"s3://{bucket}/sh", debris_age=0, clock=lambda: time.time() + 60
    ) as store:
        for snapshot_id in ids:
            await write(store, snapshot_id, {"A": "New"})
        pruned = await store.prune(1)
    assert pruned.shard_runs == ("r1",) and pruned.expired == (ids[0],)
    assert [k for k in await objects(bucket, "sh/") if k.startswith("shards/")] == [
        "shards/notes.txt"
    ]
    assert list(await objects(bucket, "other/")) == [old_run[0]]


async def test_prune_aborts_an_upload_only_once_it_is_old(bucket: str) -> None:
    """An upload of a snapshot whose id sorts before LATEST's may still be in progress (a
    writer whose clock is behind): prune aborts it only once it started `debris_age` ago; it
    aborted it at once, failing that writer. Uploads of a pruned shard run's folder go too."""
    url = f"s3://{bucket}/young"
    soon = datetime.now(UTC) + timedelta(hours=2)  # snapshots that start after the uploads
    async with open_store(url) as store:
        for n in (0, 1):
            await write(store, new_snapshot_id(soon + timedelta(minutes=n)), {"A": "New"})
    keys = [f"young/snapshots/date=2026-11-28/{sid(1)}.jsonl", "young/shards/run=r1/shard=0-of-2/x"]
    async with AioSession().create_client("s3") as s3:
        started = [await s3.create_multipart_upload(Bucket=bucket, Key=key) for key in keys]
        await put_raw(bucket, "young/shards/run=r1/shard=0-of-2/LATEST", b"x\n")

        async def left() -> set[str]:
            listed = await s3.list_multipart_uploads(Bucket=bucket, Prefix="young/")
            return {u["UploadId"] for u in listed.get("Uploads", ())}

        def initiated_now(parsed: dict[str, Any], **_: Any) -> None:
            for upload in parsed.get("Uploads", ()):  # moto answers a fixed date in 2010
                upload["Initiated"] = now

        now = datetime.now(UTC)
        async with open_store(url) as store:
            store.client.meta.events.register("after-call.s3.ListMultipartUploads", initiated_now)
            await store.prune(1)
        assert {u["UploadId"] for u in started} <= await left()
        later = time.time() + 4 * 3600  # everything is old now
        async with open_store(url, clock=lambda: later) as store:
            store.client.meta.events.register("after-call.s3.ListMultipartUploads", initiated_now)
            pruned = await store.prune(1)
        assert pruned.shard_runs == ("r1",) and not {u["UploadId"] for u in started} & await left()


async def test_latest_put_by_another_writer_in_between_is_never_overwritten(bucket: str) -> None:
    """LATEST is replaced by a conditional PUT (If-Match the ETag read): a writer that
    publishes between this write's read of LATEST and its PUT (here: injected through
    botocore's public `provide-client-params` event, right before the PUT) makes the PUT fail
    with 412, so this snapshot is not published (a transient error), the other writer's
    LATEST stays, and this snapshot's change file is withdrawn (its events overlap theirs)."""
    url = f"s3://{bucket}/race"
    theirs = b"snapshots/date=2026-11-28/" + sid(9).encode() + b".manifest.json\n"
    raced: list[str] = []

    async def other_writer_publishes(params: dict[str, Any], **_: Any) -> None:
        if params["Key"].endswith("/LATEST") and "IfMatch" in params and not raced:
            raced.append(params["IfMatch"])
            async with AioSession().create_client("s3") as s3:
                await s3.put_object(Bucket=bucket, Key=params["Key"], Body=theirs)

    async with open_store(url) as store:
        await write(store, sid(1), {"A": "New"})
        store.client.meta.events.register(
            "provide-client-params.s3.PutObject", other_writer_publishes
        )
        with pytest.raises(OutputError, match="not published") as lost:
            await write(store, sid(2), {"A": "Done"})
    assert lost.value.transient and raced
    stored = await objects(bucket, "race/")
    assert stored["LATEST"] == theirs
    assert [k for k in stored if k.startswith("changes/")] == [
        f"changes/date=2026-11-28/{sid(1)}.jsonl"
    ]
    assert f"snapshots/date=2026-11-28/{sid(2)}.manifest.json" in stored  # left for prune


async def test_a_latest_put_retried_after_it_landed_is_still_published(bucket: str) -> None:
    """botocore retries a PUT of LATEST that S3 had applied (its answer lost): the retry's
    If-Match no longer holds and S3 answers 412, but LATEST names this snapshot, so the write
    is published, not reported as lost to another writer. (The lost answer is simulated
    through botocore's public `needs-retry` event: one retry after the real 200.)"""
    url = f"s3://{bucket}/retry"
    retried: list[int] = []

    def lose_the_answer_once(response: Any, request_dict: dict[str, Any], **_: Any) -> Any:
        landed = response is not None and response[0].status_code == 200
        if landed and request_dict["url_path"].endswith("/LATEST") and not retried:
            retried.append(1)
            return 0  # retry at once
        return None

    async with open_store(url) as store:
        await write(store, sid(1), {"A": "New"})
        store.client.meta.events.register("needs-retry.s3.PutObject", lose_the_answer_once)
        written = await write(store, sid(2), {"A": "Done"})
        assert retried and written.snapshot_id == sid(2)
        assert (await store.latest_manifest() or {})["snapshot_id"] == sid(2)


async def put_raw(bucket: str, key: str, body: bytes) -> None:
    """What another process (or S3 itself, before its answer was lost) writes."""
    async with AioSession().create_client("s3") as s3:
        await s3.put_object(Bucket=bucket, Key=key, Body=body)


def is_latest_put(request: Any) -> bool:
    return bool(request.method == "PUT" and request.url.split("?")[0].endswith("/LATEST"))


async def test_a_latest_put_that_landed_but_timed_out_is_published(bucket: str) -> None:
    """Every answer to the PUT of LATEST is lost (read timeouts, through botocore's retries)
    though the first one landed: LATEST names this snapshot, so the write is published, not
    an error saying the previous snapshot stays LATEST."""
    from botocore.exceptions import ReadTimeoutError

    url = f"s3://{bucket}/timeout"

    async def land_then_time_out(request: Any, **_: Any) -> None:
        if is_latest_put(request):
            if not landed:
                landed.append(request.url)
                await put_raw(bucket, "timeout/LATEST", manifest_path(sid(2)).encode() + b"\n")
            raise ReadTimeoutError(endpoint_url=request.url)

    landed: list[str] = []
    async with open_store(url, max_attempts=1) as store:  # (botocore's retries wait real time)
        await write(store, sid(1), {"A": "New"})
        store.client.meta.events.register("before-send.s3.PutObject", land_then_time_out)
        written = await write(store, sid(2), {"A": "Done"})
        assert landed and written.snapshot_id == sid(2)
        assert (await store.latest_manifest() or {})["snapshot_id"] == sid(2)


async def test_a_cancellation_while_latest_is_replaced_on_s3_lets_it_finish(bucket: str) -> None:
    """A cancellation (SIGTERM, the daemon's shutdown deadline) that comes while the PUT of
    LATEST is in flight waits for its answer: the run published, so it reports its snapshot
    instead of "cancelled, the previous snapshot stays LATEST"."""
    url = f"s3://{bucket}/cancel"
    reached, release = asyncio.Event(), asyncio.Event()

    async def land_then_wait(request: Any, **_: Any) -> None:
        if is_latest_put(request) and not reached.is_set():
            await put_raw(bucket, "cancel/LATEST", manifest_path(sid(2)).encode() + b"\n")
            reached.set()
            await release.wait()

    async with open_store(url) as store:
        await write(store, sid(1), {"A": "New"})
        store.client.meta.events.register("before-send.s3.PutObject", land_then_wait)
        task = asyncio.create_task(write(store, sid(2), {"A": "Done"}))
        await reached.wait()
        task.cancel()
        release.set()
        written = await task
        assert written.snapshot_id == sid(2) and not task.cancelled()
        assert (await store.latest_manifest() or {})["snapshot_id"] == sid(2)


def answer_latest(status: int, code: str, message: str) -> Any:
    """A `before-call` handler that answers any request for LATEST with that error, as S3
    would (botocore's own hook for stubbed answers); other keys go to the server."""

    class Answer:
        status_code = status
        headers: ClassVar[dict[str, str]] = {}

    def answer(params: dict[str, Any], **_: Any) -> Any:
        if params["url_path"].endswith("/LATEST"):
            error = {"Code": code, "Message": message}
            return Answer(), {"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}
        return None

    return answer


async def test_a_conflicting_latest_write_says_what_happened(bucket: str) -> None:
    """S3's 409 ConditionalRequestConflict (another conditional write in flight) with LATEST
    still on the previous snapshot: a transient error that says so, where it used to say that
    LATEST names X, not X. The write in flight may be our own (a PUT botocore retried) and
    land, so the change file stays: it is withdrawn only once another snapshot is LATEST."""

    conflict = answer_latest(409, "ConditionalRequestConflict", "try again (injected)")
    async with open_store(f"s3://{bucket}/conflict") as store:
        await write(store, sid(1), {"A": "New"})
        store.client.meta.events.register("before-call.s3.PutObject", conflict)
        with pytest.raises(OutputError) as info:
            await write(store, sid(2), {"A": "Done"})
        assert info.value.transient
        message = str(info.value)
        assert "conflicted with another write in flight (ConditionalRequestConflict)" in message
        assert f"LATEST still names {sid(1)}" in message
        assert (await store.latest_manifest() or {})["snapshot_id"] == sid(1)
    assert f"conflict/changes/date=2026-11-28/{sid(2)}.jsonl" in await objects(bucket)


async def test_an_s3_error_that_echoes_secrets_is_redacted(bucket: str) -> None:
    """An S3-compatible store or a proxy that echoes the request in its error message (session
    token, signature, a URL with credentials) never gets them into the one-line error, which
    is also cut to a few hundred characters."""
    token, signature = "FQoGZXIvYXdzSESSIONTOKENSECRET", "7f16d1cafe0123456789abcdef"

    class Denied:
        status_code = 403
        headers: ClassVar[dict[str, str]] = {}

    def echo(**_: Any) -> Any:
        message = (
            f"The request signature we calculated does not match. x-amz-security-token:{token}"
            f" Authorization=AWS4-HMAC-SHA256 Credential=AKIA/x, Signature={signature} via "
            f"https://user:hunter2@proxy.example/ {'x' * 2000}"
        )
        error = {"Code": "SignatureDoesNotMatch", "Message": message}
        return Denied(), {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 403}}

    async with open_store(f"s3://{bucket}/echo") as store:
        store.client.meta.events.register("before-call.s3.PutObject", echo)
        with pytest.raises(OutputError) as info:
            await store.check_writable()
    message = str(info.value)
    assert "SignatureDoesNotMatch" in message and len(message) < 600
    assert token not in message and signature not in message and "hunter2" not in message


async def test_a_get_of_a_missing_latest_answered_403_is_a_first_run(bucket: str) -> None:
    """S3 answers a GetObject of a key that is not there with 403, not 404, unless the
    caller may list the bucket for that request (a ListBucket grant limited by `s3:prefix`,
    as the shipped IAM policy has it, may not count): the store lists the key, and a LATEST
    that is not there is a first run, not "access denied". Once LATEST exists, a 403 on it
    is an error again."""

    deny_latest = answer_latest(403, "AccessDenied", "Access Denied (injected)")
    async with open_store(f"s3://{bucket}/first") as store:
        store.client.meta.events.register("before-call.s3.GetObject", deny_latest)
        assert await store.latest_manifest() is None
        await write(store, sid(1), {"A": "New"})
        with pytest.raises(OutputError, match="cannot read LATEST: AccessDenied"):
            await store.latest_manifest()


async def test_missing_bucket_is_a_clear_output_error(bucket: str) -> None:
    """Writing to a bucket that does not exist fails early with the S3 error code."""
    async with open_store(f"s3://{bucket}-missing/x") as store:
        with pytest.raises(OutputError, match=r"s3://.*-missing/x: cannot write.*NoSuchBucket"):
            await store.check_writable()
        with pytest.raises(OutputError, match="cannot read LATEST: NoSuchBucket"):
            await store.latest_manifest()
    with pytest.raises(RuntimeError, match="not open"):
        _ = S3Store(f"s3://{bucket}/x").client


async def test_a_missing_bucket_is_permanent_and_an_unreachable_endpoint_transient(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong location (NoSuchBucket) is an OutputError the CLI exits 2 for; an endpoint
    that refuses connections is `transient` (exit 1: a later run may succeed)."""
    async with open_store(f"s3://{bucket}-missing/x") as store:
        with pytest.raises(OutputError) as wrong:
            await store.check_writable()
    assert not wrong.value.transient
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    async with open_store(f"s3://{bucket}/x", max_attempts=1) as store:
        with pytest.raises(OutputError) as down:
            await store.check_writable()
    assert down.value.transient and "cannot write" in str(down.value)


async def test_two_runs_to_s3_read_the_previous_snapshot_back(
    make_sandbox: SandboxFactory, bucket: str
) -> None:
    """End to end: the aggregator writes to s3://, and the second run, with a failed account,
    carries that account's jobs forward as stale from the snapshot it reads back from S3."""
    from aggregator.sandbox import Faults
    from aggregator.service import run_once

    from .test_schemas import validate_location

    sb = await make_sandbox(accounts=3, seed=8, max_jobs=10, regions=("eu-west-1", "us-east-1"))
    settings = make_settings(
        sb.account_ids,
        regions={"names": ["eu-west-1", "us-east-1"]},
        output={"directory": f"s3://{bucket}/runs", "compress": "gzip", "retain": 2},
    )
    first = await run_once(settings)
    assert first.status == "complete" and str(first.data_path).startswith(f"s3://{bucket}/runs/")
    failing = sb.account_ids[1]
    sb.faults = dataclasses.replace(Faults(), deny_list_jobs=frozenset({failing}))
    second = await run_once(settings)
    assert second.status == "partial"
    expected_stale = [j for j in sb.truth() if j["account_id"] == failing]
    assert second.stale == len(expected_stale) > 0
    stored = await objects(bucket, "runs/")
    manifest = orjson.loads(stored[stored["LATEST"].decode().strip()])
    assert manifest["previous_snapshot_id"] == first.snapshot_id
    lines = gzip.decompress(stored[manifest["data"]["path"]]).splitlines()
    got = sorted((r["account_id"], r["job_id"], r["stale"]) for r in map(orjson.loads, lines))
    want = sorted((j["account_id"], j["job_id"], j["account_id"] == failing) for j in sb.truth())
    assert got == want
    counts = manifest["changes"]["counts"]
    assert counts["job_went_stale"] == len(expected_stale) and counts["job_removed"] == 0
    sb.faults = Faults()
    third = await run_once(settings)
    assert third.status == "complete"
    assert snapshot_ids(await objects(bucket, "runs/")) == sorted(
        [second.snapshot_id, third.snapshot_id]
    )
    validate_location(await objects(bucket, "runs/"))
    out = io.BytesIO()
    await diff_command(f"s3://{bucket}/runs", second.snapshot_id, third.snapshot_id, out=out)
    kinds = {orjson.loads(line)["event"] for line in out.getvalue().splitlines()}
    assert kinds == {"job_recovered"}


async def test_the_output_bucket_is_written_with_the_hub_profile(
    make_sandbox: SandboxFactory, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `[partitions.aws] profile` set and no credentials in the environment, the S3
    output is written with that profile's credentials, as AssumeRole is: the hub's."""
    from aggregator.service import run_once

    sb = await make_sandbox(accounts=2, seed=9, max_jobs=5, regions=("eu-west-1",))
    config = tmp_path / "aws-config"
    config.write_text(
        "[profile inventory-hub]\n"
        f"aws_access_key_id = {sb.hub_access_key_id}\n"
        f"aws_secret_access_key = {sb.hub_secret_access_key}\n"
        "region = us-east-1\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    settings = make_settings(
        sb.account_ids,
        regions={"names": ["eu-west-1"]},
        partitions={"aws": {"profile": "inventory-hub"}},
        output={"directory": f"s3://{bucket}/hub"},
    )
    summary = await run_once(settings)
    assert summary.status == "complete"
    monkeypatch.setenv("AWS_PROFILE", "inventory-hub")  # to read it back here
    assert "LATEST" in await objects(bucket, "hub/")


async def test_a_failed_part_cancels_the_other_part_uploads(bucket: str) -> None:
    """When one part of a multipart upload fails, the parts still in flight are cancelled and
    awaited before the upload is aborted: none is sent after the abort, none is left running."""
    import asyncio

    release = asyncio.Event()
    late: list[int] = []
    calls: list[str] = []

    async def upload_part(params: dict[str, Any], **_: Any) -> dict[str, Any] | None:
        if params["PartNumber"] == 1:
            return {**params, "Bucket": f"{bucket}-gone"}  # moto answers NoSuchBucket
        await release.wait()  # the other parts are still uploading when part 1 fails
        late.append(params["PartNumber"])
        return None

    def abort_upload(**_: Any) -> None:
        calls.append("AbortMultipartUpload")
        release.set()

    states = {f"J{i:06d}": "New" for i in range(14_000)}
    async with S3Store(
        f"s3://{bucket}/torn", multipart_threshold=5 * MiB, part_size=5 * MiB, max_uploads=4
    ) as store:
        events = store.client.meta.events
        events.register("provide-client-params.s3.UploadPart", upload_part)
        events.register("provide-client-params.s3.AbortMultipartUpload", abort_upload)
        with pytest.raises(OutputError, match="cannot write the snapshot: NoSuchBucket"):
            await store.write(
                sid(0), records(sid(0), states, description="x" * 600), {}, changes=False
            )
        left = [
            t for t in asyncio.all_tasks() if not t.done() and "_upload_part" in repr(t.get_coro())
        ]
        assert left == [] and late == [], "a part upload outlived the abort"
        assert calls == ["AbortMultipartUpload"]
        assert await store.latest_manifest() is None
    async with AioSession().create_client("s3") as s3:
        uploads = await s3.list_multipart_uploads(Bucket=bucket, Prefix="torn/")
    assert not uploads.get("Uploads") and await objects(bucket, "torn/") == {}


async def test_a_prune_that_cannot_read_a_manifest_is_a_warning(
    make_sandbox: SandboxFactory, bucket: str
) -> None:
    """Prune reads the manifests' links (HEAD) several at a time; one that failed (403) came
    out wrapped in an ExceptionGroup that no handler expects: a traceback, exit 1, for a run
    whose snapshot was published. It is the prune warning now, as any failed prune."""
    from structlog.testing import capture_logs

    from aggregator.service import run_once

    class Denied:
        status_code = 403
        headers: ClassVar[dict[str, str]] = {}

    def deny(**_: Any) -> Any:  # botocore's before-call: this answer instead of the request
        error = {"Code": "AccessDenied", "Message": "Access Denied (injected)"}
        return Denied(), {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 403}}

    url = f"s3://{bucket}/heads"
    sb = await make_sandbox(accounts=2, seed=9, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]}, output={"retain": 1})
    for _ in range(2):
        await run_once(settings, output=url)
    session = AioSession()
    session.register("before-call.s3.HeadObject", deny)
    with capture_logs() as logs:
        summary = await run_once(settings, output=url, hub_session=session)
    assert summary.status == "complete" and summary.exit_code == 0
    warnings = [e for e in logs if e["event"] == "snapshot.prune_failed"]
    assert len(warnings) == 1 and "cannot read a manifest: AccessDenied" in warnings[0]["error"]
    stored = await objects(bucket, "heads/")
    assert stored["LATEST"].decode().strip().endswith(f"{summary.snapshot_id}.manifest.json")


async def test_merge_warns_when_prune_fails(make_sandbox: SandboxFactory, bucket: str) -> None:
    """A prune that fails after the merged snapshot is written is a warning, as for `run`: the
    merge returns its own status (exit code 0 here, not 2), LATEST names the merged snapshot
    and the snapshot that prune could not delete is left for the next prune."""
    from structlog.testing import capture_logs

    from aggregator.service import run_once
    from aggregator.shards import Shard, merge_run

    url = f"s3://{bucket}/merged"
    old = "20200101T000000Z-0000"
    async with open_store(url) as store:
        await write(store, old, {"A": "New"})
    sb = await make_sandbox(accounts=6, seed=9, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    for i in range(2):
        await run_once(settings, output=url, shard=Shard(i, 2, "r1"))
    session = AioSession()
    session.register(  # moto answers NoSuchBucket: prune cannot delete the expired snapshot
        "provide-client-params.s3.DeleteObjects",
        lambda params, **_: {**params, "Bucket": f"{bucket}-gone"},
    )
    with capture_logs() as logs:
        result = await merge_run(url, "r1", 2, retain=1, store_options={"session": session})
    assert result.status == "complete" and result.exit_code == 0 and not result.already_merged
    warnings = [e for e in logs if e["event"] == "snapshot.prune_failed"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert "cannot delete old snapshots: NoSuchBucket" in warnings[0]["error"]
    stored = await objects(bucket, "merged/")
    assert stored["LATEST"].decode().strip() == result.written.manifest_path
    own = [k for k in stored if not k.startswith("shards/")]
    assert snapshot_ids(own) == [old, result.written.snapshot_id]
