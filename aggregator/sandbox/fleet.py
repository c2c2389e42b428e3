"""The sandbox's world: a seeded fleet of accounts, each with Snowball job lists.

Job lists are generated lazily, on first use, from an RNG seeded by (seed, account, home region),
so a fleet of 10,000 accounts costs nothing until it is listed and the same seed always yields
the same jobs whatever the order of access. Each job keeps its ``ListJobs`` entry pre-encoded
as a JSON fragment, so a page is a join of bytes.

The four US regions of an account share one job list, as the real API documents: ``ListJobs``
in any of them returns the jobs of all four.
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import random
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import cbor2
import orjson

__all__ = [
    "HUB_ACCOUNT_ID",
    "US_REGIONS",
    "Fleet",
    "FleetSpec",
    "Job",
    "JobList",
    "OrgAccount",
    "snowball_regions",
]

HUB_ACCOUNT_ID = "123456789012"
US_REGIONS: tuple[str, ...] = ("us-east-1", "us-east-2", "us-west-1", "us-west-2")
US_LIST = "us"

_FIRST_ACCOUNT = 200_000_000_000
_EPOCH_START_MS = 1_451_606_400_000  # 2016-01-01T00:00:00Z
_EPOCH_END_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

# Values newer than botocore's model: a client must keep them verbatim.
_UNIX_EPOCH = dt.datetime(1970, 1, 1)  # naive on purpose: isoformat() then adds no offset
_UTC_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

UNKNOWN_JOB_STATES = ("FutureState", "WithDrone")
UNKNOWN_JOB_TYPES = ("FUTURE_TYPE",)
UNKNOWN_SNOWBALL_TYPES = ("V9_NEW", "EDGE_QUANTUM")

_WORDS = (
    "Import",
    "Export",
    "Archive",
    "Backup",
    "Migration",
    "Photos",
    "Genomics",
    "Logs",
    "Edge",
    "Cluster",
    "Tape",
    "Media",
)
_NASTY_DESCRIPTIONS = (
    'Données 📦 — "quoted" \\ back\\slash',
    "東京データセンター移行 🚚 第2便",
    "emoji 😀🎉🧊\ttab and trailing space ",
    "line one\nline two\r\nline three",
    "<xml attr='x'> & \"ampersand\" </xml>",
    "line\u2028separator, paragraph\u2029separator",
    "数据迁移批次 " * 80,
    "Ελληνικά, русский, עברית, العربية",
)


def _iso_ms(ms: int) -> str:
    """Format epoch milliseconds as ISO 8601 UTC with milliseconds."""
    stamp = _UNIX_EPOCH + dt.timedelta(milliseconds=ms)
    return stamp.isoformat(timespec="milliseconds") + "Z"


@functools.cache
def snowball_regions(partition: str) -> tuple[str, ...]:
    """Every region botocore lists for snowball in ``partition``."""
    import botocore.session

    regions = botocore.session.get_session().get_available_regions("snowball", partition)
    return tuple(sorted(str(region) for region in regions))


@functools.cache
def _model_enums() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """JobState, JobType and SnowballType values from botocore's snowball model."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("snowball")
    return (
        tuple(model.shape_for("JobState").enum),
        tuple(model.shape_for("JobType").enum),
        tuple(model.shape_for("SnowballType").enum),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetSpec:
    """The shape of the fake organisation.

    Options (all keyword-only):
      accounts: number of member accounts (default 25); ids are ``200000000000 + i``.
      seed: RNG seed (default 0); the same seed always yields the same fleet and jobs.
      regions: home regions of the jobs; None (default) = every region botocore lists for
        snowball in ``partition``. ListJobs in any other region answers an empty list.
      partition: ``aws`` (default), ``aws-cn``, ``aws-us-gov``...; role ARNs must use it.
      external_id: when set, AssumeRole must send exactly this ExternalId (default None).
      suspended: how many accounts are SUSPENDED in Organizations (default 0, chosen by the
        seed); AssumeRole into them is denied and their jobs are not part of the truth.
      max_jobs: cap on the generated jobs per (account, home region) (default 2500).
      jobs: exact job counts per (account_id, home region), overriding the generator; a
        US region's jobs join the account's shared US list (default: none).
      role_name: when set, AssumeRole only accepts this role name (default None = any).
    """

    accounts: int = 25
    seed: int = 0
    regions: tuple[str, ...] | None = None
    partition: str = "aws"
    external_id: str | None = None
    suspended: int = 0
    max_jobs: int = 2500
    jobs: Mapping[tuple[str, str], int] = field(default_factory=dict)
    role_name: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.accounts <= 100_000_000_000:
            raise ValueError(f"accounts must be between 0 and 1e11, got {self.accounts}")
        if not 0 <= self.suspended <= self.accounts:
            raise ValueError(f"suspended must be between 0 and accounts, got {self.suspended}")
        if self.max_jobs < 0:
            raise ValueError(f"max_jobs must be >= 0, got {self.max_jobs}")
        if self.regions is not None and not self.regions:
            raise ValueError("regions must not be empty (use None for every region)")
        for key, count in self.jobs.items():
            if count < 0:
                raise ValueError(f"jobs[{key!r}] must be >= 0, got {count}")


class Job(NamedTuple):
    """One job; a NamedTuple rather than a dataclass to keep 10^5..10^6 of them lean.

    ``entry`` is the ``JobListEntry`` pre-encoded as a JSON object; every other field of the
    job (type, device, description...) lives only there.
    """

    job_id: str
    created_ms: int
    home_region: str
    entry: bytes


def _listing_order(job: Job) -> tuple[int, str]:
    """Newest first, then JobId."""
    return (-job.created_ms, job.job_id)


def _encode_entry(
    *,
    job_id: str,
    state: str,
    job_type: str,
    snowball_type: str,
    is_master: bool,
    created_ms: int,
    description: str | None,
) -> bytes:
    entry: dict[str, object] = {
        "JobId": job_id,
        "JobState": state,
        "IsMaster": is_master,
        "JobType": job_type,
        "SnowballType": snowball_type,
        "CreationDate": created_ms / 1000,
    }
    if description is not None:
        entry["Description"] = description
    # orjson over-allocates its output; a copy keeps 10^5 entries at their real size.
    return bytes(memoryview(orjson.dumps(entry)))


def _cbor_entry(entry: bytes) -> bytes:
    """Re-encode a JSON ``JobListEntry`` as CBOR, CreationDate as a tag-1 epoch."""
    fields = orjson.loads(entry)
    fields["CreationDate"] = cbor2.CBORTag(1, float(fields["CreationDate"]))
    return bytes(cbor2.dumps(fields))


class JobList:
    """The jobs that ListJobs returns for one account in one region (or the US group).

    Mutable: ``version`` increases with every change, which invalidates page tokens.
    """

    __slots__ = (
        "_cbor",
        "_entries",
        "account_id",
        "churned",
        "home_regions",
        "jobs",
        "key",
        "version",
    )

    def __init__(
        self, account_id: str, key: str, home_regions: tuple[str, ...], jobs: list[Job]
    ) -> None:
        self.account_id = account_id
        self.key = key
        self.home_regions = home_regions
        self.churned = 0
        self.jobs: list[Job] = []
        self._entries: list[bytes] = []
        self._cbor: list[bytes] | None = None
        self.version = 0
        self._replace(sorted(jobs, key=_listing_order))

    def _replace(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self._entries = [job.entry for job in jobs]
        self._cbor = None

    def __len__(self) -> int:
        return len(self.jobs)

    def json_page(self, offset: int, limit: int) -> tuple[bytes, int]:
        """Comma-joined JSON entries from ``offset`` and how many there are."""
        entries = self._entries[offset : offset + limit]
        return b",".join(entries), len(entries)

    def cbor_page(self, offset: int, limit: int) -> tuple[bytes, int]:
        """Concatenated CBOR entries from ``offset`` and how many there are."""
        if self._cbor is None:
            self._cbor = [_cbor_entry(entry) for entry in self._entries]
        entries = self._cbor[offset : offset + limit]
        return b"".join(entries), len(entries)

    def insert(self, job: Job) -> None:
        """Add a job in listing order and bump the version."""
        jobs = list(self.jobs)
        keys = [_listing_order(j) for j in jobs]
        jobs.insert(bisect.bisect_left(keys, _listing_order(job)), job)
        self._replace(jobs)
        self.version += 1

    def update(self, index: int, job: Job) -> None:
        """Replace the job at ``index`` (same id and date) and bump the version."""
        jobs = list(self.jobs)
        jobs[index] = job
        self._replace(jobs)
        self.version += 1

    def pop(self, index: int) -> Job:
        """Remove the job at ``index`` and bump the version."""
        jobs = list(self.jobs)
        job = jobs.pop(index)
        self._replace(jobs)
        self.version += 1
        return job

    def index_of(self, job_id: str) -> int | None:
        for index, job in enumerate(self.jobs):
            if job.job_id == job_id:
                return index
        return None


@dataclass(frozen=True, slots=True)
class OrgAccount:
    """One account as Organizations ListAccounts shows it."""

    account_id: str
    status: str
    entry: bytes


def _job_count(rng: random.Random, max_jobs: int) -> int:
    """Heavy-tailed: mostly 0-5 jobs, sometimes tens or hundreds, rarely up to max_jobs."""
    u = rng.random()
    if u < 0.90:
        n = rng.randint(0, 5)
    elif u < 0.99:
        n = rng.randint(6, 50)
    elif u < 0.999:
        n = rng.randint(100, 400)
    else:
        n = rng.randint(max_jobs // 4, max_jobs)
    return min(n, max_jobs)


def _job_id(bits: int) -> str:
    """``JID`` + a version-4 UUID made of 128 random bits (faster than ``uuid.UUID``)."""
    bits = (bits & ~(0xF000 << 64) | (0x4000 << 64)) & ~(0xC000 << 48) | (0x8000 << 48)
    h = f"{bits:032x}"
    return f"JID{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _description(rng: random.Random) -> str | None:
    u = rng.random()
    if u < 0.30:
        return None
    if u < 0.85:
        return f"{rng.choice(_WORDS)} {rng.choice(_WORDS)} {rng.randint(1, 999)}"
    if u < 0.97:
        return rng.choice(_NASTY_DESCRIPTIONS)
    return ""


class Fleet:
    """The mutable world behind one sandbox: accounts, job lists, Organizations entries."""

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.regions: tuple[str, ...] = (
            tuple(spec.regions) if spec.regions is not None else snowball_regions(spec.partition)
        )
        self.account_ids: tuple[str, ...] = tuple(
            str(_FIRST_ACCOUNT + i) for i in range(spec.accounts)
        )
        self._account_set = frozenset(self.account_ids)
        self.us_regions: tuple[str, ...] = tuple(r for r in self.regions if r in US_REGIONS)
        org_rng = random.Random(f"{spec.seed}:organizations")
        self.suspended: frozenset[str] = frozenset(org_rng.sample(self.account_ids, spec.suspended))
        for account_id, region in spec.jobs:
            if account_id not in self._account_set:
                raise ValueError(f"jobs override names unknown account {account_id!r}")
            if region not in self.regions:
                raise ValueError(f"jobs override names region {region!r} not in the fleet")
        states, types, devices = _model_enums()
        self._states = states
        self._types = types
        self._devices = devices
        self._lists: dict[tuple[str, str], JobList] = {}
        self.org_accounts: tuple[OrgAccount, ...] = tuple(
            self._org_account(org_rng, account_id) for account_id in self.account_ids
        )

    def _org_account(self, rng: random.Random, account_id: str) -> OrgAccount:
        status = "SUSPENDED" if account_id in self.suspended else "ACTIVE"
        index = int(account_id) - _FIRST_ACCOUNT
        joined_ms = rng.randrange(_EPOCH_START_MS, _EPOCH_END_MS)
        partition = self.spec.partition
        entry = {
            "Id": account_id,
            "Arn": f"arn:{partition}:organizations::{HUB_ACCOUNT_ID}:account/o-sandbox0000/"
            f"{account_id}",
            "Email": f"sandbox+{account_id}@example.com",
            "Name": f"sandbox-{index:05d}",
            "Status": status,
            "State": status,
            "JoinedMethod": "CREATED" if rng.random() < 0.7 else "INVITED",
            "JoinedTimestamp": joined_ms / 1000,
        }
        return OrgAccount(account_id, status, bytes(memoryview(orjson.dumps(entry))))

    def has_account(self, account_id: str) -> bool:
        return account_id in self._account_set

    def list_key(self, region: str) -> str | None:
        """The job list a region reads: ``us`` for the US group, None outside the fleet."""
        if region in self.us_regions:
            return US_LIST
        if region in self.regions:
            return region
        return None

    def job_list(self, account_id: str, region: str) -> JobList | None:
        """The list ListJobs in ``region`` returns, None if there is none (empty answer)."""
        key = self.list_key(region)
        if key is None or account_id not in self._account_set:
            return None
        found = self._lists.get((account_id, key))
        if found is None:
            found = self._generate(account_id, key)
        return found

    def job_lists(self, account_id: str) -> Iterator[JobList]:
        """Every job list of an account (generating them as needed)."""
        keys = ([US_LIST] if self.us_regions else []) + [
            r for r in self.regions if r not in US_REGIONS
        ]
        for key in keys:
            found = self.job_list(account_id, self.us_regions[0] if key == US_LIST else key)
            if found is not None:
                yield found

    def _generate(self, account_id: str, key: str) -> JobList:
        homes = self.us_regions if key == US_LIST else (key,)
        jobs: list[Job] = []
        for home in homes:
            jobs.extend(self._generate_home(account_id, home))
        job_list = JobList(account_id, key, homes, jobs)
        self._lists[(account_id, key)] = job_list
        return job_list

    def _generate_home(self, account_id: str, home: str) -> list[Job]:
        spec = self.spec
        rng = random.Random(f"{spec.seed}:{account_id}:{home}")
        count = spec.jobs.get((account_id, home))
        if count is None:
            count = _job_count(rng, spec.max_jobs)
        states, types, devices = self._states, self._types, self._devices
        span = _EPOCH_END_MS - _EPOCH_START_MS
        jobs = []
        # Hot loop (10^5..10^6 jobs per fleet): one float draws several choices.
        for _ in range(count):
            job_id = _job_id(rng.getrandbits(128))
            u = rng.random()
            v = rng.random()
            pick = UNKNOWN_JOB_STATES if u < 0.02 else states
            state = pick[int(v * len(pick))]
            pick = UNKNOWN_JOB_TYPES if u > 0.99 else types
            job_type = pick[int(u * 7919 % 1 * len(pick))]
            pick = UNKNOWN_SNOWBALL_TYPES if 0.5 < u < 0.52 else devices
            device = pick[int(v * 104729 % 1 * len(pick))]
            created_ms = _EPOCH_START_MS + int(rng.random() * span)
            entry = _encode_entry(
                job_id=job_id,
                state=state,
                job_type=job_type,
                snowball_type=device,
                is_master=job_type == "EXPORT" and v * 31 % 1 < 0.3,
                created_ms=created_ms,
                description=_description(rng),
            )
            jobs.append(Job(job_id, created_ms, home, entry))
        return jobs

    # --- mutation -------------------------------------------------------------------------

    def add_job(
        self,
        account_id: str,
        region: str,
        *,
        job_id: str | None = None,
        job_state: str = "New",
        job_type: str = "IMPORT",
        snowball_type: str = "EDGE",
        is_master: bool = False,
        creation_date: dt.datetime | None = None,
        description: str | None = None,
        rng: random.Random | None = None,
    ) -> str:
        """Add a job whose home is ``region``; returns its JobId.

        A naive ``creation_date`` is taken as UTC; it is kept to the millisecond.
        """
        job_list = self.job_list(account_id, region)
        if job_list is None:
            raise KeyError(f"no job list for account {account_id!r} in region {region!r}")
        if job_id is None:
            job_id = _job_id((rng or random.Random()).getrandbits(128))
        elif any(other.index_of(job_id) is not None for other in self.job_lists(account_id)):
            raise ValueError(f"account {account_id} already has a job {job_id!r}")
        if creation_date is None:
            creation_date = dt.datetime.now(dt.UTC)
        elif creation_date.tzinfo is None:
            creation_date = creation_date.replace(tzinfo=dt.UTC)
        # Exact integer milliseconds (truncated), free of float rounding.
        created_ms = (creation_date - _UTC_EPOCH) // dt.timedelta(milliseconds=1)
        entry = _encode_entry(
            job_id=job_id,
            state=job_state,
            job_type=job_type,
            snowball_type=snowball_type,
            is_master=is_master,
            created_ms=created_ms,
            description=description,
        )
        job_list.insert(Job(job_id, created_ms, region, entry))
        return job_id

    def _find(self, account_id: str, job_id: str) -> tuple[JobList, int]:
        if account_id not in self._account_set:
            raise KeyError(f"unknown account {account_id!r}")
        for job_list in self.job_lists(account_id):
            index = job_list.index_of(job_id)
            if index is not None:
                return job_list, index
        raise KeyError(f"no job {job_id!r} in account {account_id!r}")

    def set_job_state(self, account_id: str, job_id: str, state: str) -> None:
        """Change a job's JobState."""
        job_list, index = self._find(account_id, job_id)
        set_state(job_list, index, state)

    def remove_job(self, account_id: str, job_id: str) -> None:
        """Delete a job."""
        job_list, index = self._find(account_id, job_id)
        job_list.pop(index)

    def churn(self, job_list: JobList, region: str, rng: random.Random) -> None:
        """Change a list while a client pages through it: add a job or move one's state."""
        if job_list.jobs and rng.random() < 0.5:
            index = rng.randrange(len(job_list.jobs))
            set_state(job_list, index, rng.choice(self._states))
        else:
            home = region if region in job_list.home_regions else job_list.home_regions[0]
            self.add_job(
                job_list.account_id,
                home,
                job_state="New",
                job_type=rng.choice(self._types),
                snowball_type=rng.choice(self._devices),
                description="added while listing",
                rng=rng,
            )
        job_list.churned += 1

    # --- truth ----------------------------------------------------------------------------

    def truth(
        self,
        *,
        disabled_regions: Mapping[str, Collection[str]] | None = None,
        accounts: Collection[str] | None = None,
    ) -> list[dict[str, object]]:
        """The expected deduplicated inventory, sorted by (account_id, job_id).

        Suspended accounts are left out, and so is a job that no enabled region returns.
        """
        disabled_regions = disabled_regions or {}
        wanted = self.account_ids if accounts is None else sorted(set(accounts))
        records: list[dict[str, object]] = []
        for account_id in wanted:
            if account_id not in self._account_set or account_id in self.suspended:
                continue
            off = disabled_regions.get(account_id, ())
            for job_list in self.job_lists(account_id):
                regions = sorted(r for r in job_list.home_regions if r not in off)
                if not regions:
                    continue
                for job in job_list.jobs:
                    records.append(_record(account_id, job, regions))
        records.sort(key=lambda record: (record["account_id"], record["job_id"]))
        return records


def set_state(job_list: JobList, index: int, state: str) -> None:
    """Rewrite one job's JobState in place (bumps the list version)."""
    job = job_list.jobs[index]
    fields = orjson.loads(job.entry)
    fields["JobState"] = state
    job_list.update(index, job._replace(entry=bytes(memoryview(orjson.dumps(fields)))))


def _record(account_id: str, job: Job, regions: list[str]) -> dict[str, object]:
    fields = orjson.loads(job.entry)
    return {
        "account_id": account_id,
        "creation_date": _iso_ms(job.created_ms),
        "description": fields.get("Description"),
        "home_region": job.home_region,
        "is_master": fields["IsMaster"],
        "job_id": job.job_id,
        "job_state": fields["JobState"],
        "job_type": fields["JobType"],
        "regions": regions,
        "snowball_type": fields["SnowballType"],
    }
