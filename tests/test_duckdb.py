"""DuckDB reads the output directly: hive-partitioned snapshots and change files through
`read_json` globs give the sandbox truth, and the README's queries run."""

from __future__ import annotations

import gzip
import re
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import orjson

from aggregator.records import JobRecord
from aggregator.service import run_once
from aggregator.snapshot import open_store

from .conftest import SandboxFactory, make_settings

ROOT = Path(__file__).resolve().parent.parent
REGIONS = ("eu-west-1", "us-east-1", "us-west-2")

# The README's DuckDB queries, for an output directory `var/demo/` (the tests substitute theirs).
MACROS = """
CREATE OR REPLACE MACRO records(path) AS TABLE
SELECT * FROM read_json(path, hive_partitioning = true, columns = {
  account_id: 'VARCHAR', job_id: 'VARCHAR', job_state: 'VARCHAR', job_type: 'VARCHAR',
  snowball_type: 'VARCHAR', is_master: 'BOOLEAN', creation_date: 'VARCHAR',
  description: 'VARCHAR', regions: 'VARCHAR[]', snapshot_id: 'VARCHAR',
  observed_at: 'VARCHAR', last_seen: 'VARCHAR', stale: 'BOOLEAN'});
CREATE OR REPLACE MACRO events(path) AS TABLE
SELECT * FROM read_json(path, hive_partitioning = true, columns = {
  account_id: 'VARCHAR', event: 'VARCHAR', from_state: 'VARCHAR', job_id: 'VARCHAR',
  observed_at: 'VARCHAR', previous_observed_at: 'VARCHAR', previous_snapshot_id: 'VARCHAR',
  snapshot_id: 'VARCHAR', to_state: 'VARCHAR'});
"""
LATEST = """
SET VARIABLE manifest = 'var/demo/' || trim((SELECT content FROM read_text('var/demo/LATEST')), chr(10));
SET VARIABLE latest = (SELECT 'var/demo/' || data.path FROM read_json(getvariable('manifest')));
"""  # noqa: E501
BY_STATE_PER_ACCOUNT = """
SELECT account_id, job_state, count(*) AS jobs
FROM records(getvariable('latest'))
GROUP BY ALL ORDER BY account_id, jobs DESC;
"""
PER_DEVICE_TYPE = """
SELECT snowball_type, count(*) AS jobs
FROM records(getvariable('latest'))
GROUP BY ALL ORDER BY jobs DESC;
"""
CREATED_PER_MONTH = """
SELECT date_trunc('month', creation_date::TIMESTAMP) AS month, count(*) AS jobs
FROM records(getvariable('latest'))
GROUP BY ALL ORDER BY month;
"""
HISTORY = """
SELECT date, snapshot_id, job_state, count(*) AS jobs
FROM records('var/demo/snapshots/*/[0-9]*.jsonl*')
GROUP BY ALL ORDER BY snapshot_id, jobs DESC;
"""
TIME_IN_STATE = """
WITH transitions AS (
  SELECT account_id, job_id, to_state AS state, observed_at::TIMESTAMP AS since
  FROM events('var/demo/changes/*/[0-9]*.jsonl*')
  WHERE event IN ('job_added', 'state_changed', 'job_removed')  -- a recovery in a new state
), spans AS (                                                     -- is a state_changed too
  SELECT state, since,
         lead(since) OVER (PARTITION BY account_id, job_id ORDER BY since) AS until
  FROM transitions
)
SELECT state, count(*) AS spans, avg(until - since) AS mean_time, max(until - since) AS longest
FROM spans
WHERE state IS NOT NULL AND until IS NOT NULL
GROUP BY state ORDER BY mean_time DESC;
"""


def read_events(root: Path) -> list[dict[str, Any]]:
    out = []
    for path in root.glob("changes/*/[0-9]*.jsonl*"):
        body = path.read_bytes()
        if path.suffix == ".gz":
            body = gzip.decompress(body)
        out.extend(orjson.loads(line) for line in body.splitlines())
    return out


def plain_files(root: Path) -> list[Path]:
    return list(root.glob("*/*/*.jsonl"))


def sql(query: str, root: Path) -> str:
    return query.replace("var/demo/", f"{root.as_posix()}/")


def run(con: duckdb.DuckDBPyConnection, script: str, root: Path) -> list[tuple[Any, ...]]:
    """Execute each statement of `script` (for `root`); rows of the last one."""
    rows: list[tuple[Any, ...]] = []
    for statement in sql(script, root).split(";\n"):
        if statement.strip():
            rows = con.execute(statement).fetchall()
    return rows


async def three_runs(make_sandbox: SandboxFactory, section: dict[str, Any], **kw: Any) -> Any:
    """Three runs with state changes, an addition and a removal between them; `section` is
    the `[output]` table, `kw` go to run_once."""
    sb = await make_sandbox(accounts=4, seed=19, max_jobs=15, regions=REGIONS)
    settings = make_settings(sb.account_ids, regions={"names": list(REGIONS)}, output=section)
    for n in range(3):
        if n:
            jobs = sorted(j["job_id"] for j in sb.truth() if j["account_id"] == sb.account_ids[0])
            sb.set_job_state(sb.account_ids[0], jobs[0], f"State{n}")
            sb.remove_job(sb.account_ids[0], jobs[-1])
            sb.add_job(sb.account_ids[1], "us-west-2", job_state="New")
        summary = await run_once(settings, **kw)
        assert summary.status == "complete"
    return sb, summary


def check_against_truth(root: Path, truth: list[dict[str, Any]], summary: Any) -> None:
    con = duckdb.connect()
    run(con, MACROS, root)
    run(con, LATEST, root)
    by_state = Counter({(a, s): n for a, s, n in run(con, BY_STATE_PER_ACCOUNT, root)})
    assert by_state == Counter((j["account_id"], j["job_state"]) for j in truth)
    by_account = con.execute(
        "SELECT account_id, count(*) FROM read_json(getvariable('latest')) GROUP BY ALL"
    ).fetchall()
    assert dict(by_account) == Counter(j["account_id"] for j in truth)
    devices = dict(run(con, PER_DEVICE_TYPE, root))
    assert devices == Counter(j["snowball_type"] for j in truth)
    months = run(con, CREATED_PER_MONTH, root)
    assert sum(n for _, n in months) == len(truth)
    assert [m for m, _ in months] == sorted(m for m, _ in months)

    # Every retained snapshot through one hive-partitioned glob: the `date` column is the
    # partition, and the newest snapshot's counts are the truth's. The glob skips the hidden
    # temporary files of a write in progress (or a crashed one), torn JSON included.
    for folder in ("snapshots", "changes"):
        day = next((root / folder).glob("date=*"))
        (day / f".{summary.snapshot_id}.jsonl.4242.deadbeef.tmp").write_bytes(b'{"torn": ')
    history = run(con, HISTORY, root)
    assert {str(d) for d, *_ in history} == {f"{s[0:4]}-{s[4:6]}-{s[6:8]}" for _, s, *_ in history}
    assert len({s for _, s, *_ in history}) == 3
    newest = Counter({st: n for _, s, st, n in history if s == summary.snapshot_id})
    assert newest == Counter(j["job_state"] for j in truth)

    # The change files: one glob, counts equal to what the manifests say.
    events = dict(
        con.execute(
            sql(
                "SELECT event, count(*) FROM read_json('var/demo/changes/*/[0-9]*.jsonl*', "
                "hive_partitioning = true) GROUP BY ALL",
                root,
            )
        ).fetchall()
    )
    expected: Counter[str] = Counter()
    for manifest in root.glob("snapshots/*/*.manifest.json"):
        expected.update(orjson.loads(manifest.read_bytes())["changes"]["counts"])
    assert events == {k: n for k, n in expected.items() if n}
    # Time in state: these runs are under a second apart, so events of one job can share a
    # timestamp and their order is then arbitrary; still, spans are only ever closed by a
    # later event of the job, and none is negative.
    spans = run(con, TIME_IN_STATE, root)
    closing = sum(
        1
        for e in read_events(root)
        if e["event"] in ("state_changed", "job_removed") and e["from_state"] is not None
    )
    assert 0 < sum(count for _, count, *_ in spans) <= closing
    assert all(state is not None and longest.total_seconds() >= 0 for state, _, _, longest in spans)


async def test_duckdb_counts_equal_the_sandbox_truth(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Jobs by state and by account (newest snapshot), per device type, per month, the
    history across snapshots and the change events all agree with the sandbox."""
    sb, summary = await three_runs(make_sandbox, {}, output=tmp_path)
    check_against_truth(tmp_path, sb.truth(), summary)


async def test_duckdb_reads_gzip_output_the_same_way(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """With `output.compress = "gzip"` the same globs and queries give the same answers."""
    sb, summary = await three_runs(make_sandbox, {"directory": str(tmp_path), "compress": "gzip"})
    assert not plain_files(tmp_path)
    check_against_truth(tmp_path, sb.truth(), summary)


async def test_the_readme_duckdb_queries_run(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    """Every ```sql block of the README that reads the output runs against a real output."""
    await three_runs(make_sandbox, {}, output=tmp_path)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```sql\n(.*?)```", readme, flags=re.S) if "read_" in b]
    assert blocks, "the README shows DuckDB queries"
    con = duckdb.connect()
    for block in blocks:
        run(con, block, tmp_path)


def test_the_readme_defines_the_typed_readers_these_tests_use() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert MACROS.strip() in readme


async def test_the_typed_readers_keep_values_that_first_appear_late(tmp_path: Path) -> None:
    """25,000 jobs whose first 24,990 have no description nor creation date: `read_json` on
    its own (DuckDB 1.x and 2.0) types both columns from the first 20,480 lines as null and
    loses the last ten values without an error; the README's `records` macro reads them, and
    `events` reads a first change file (all `job_added`, `from_state` null) with its columns
    typed."""
    snapshot_id = "20261128T150000Z-abcd"
    records = [
        JobRecord(
            "111111111111",
            f"JID{i:06d}",
            "New",
            "IMPORT",
            "EDGE",
            False,
            None if i < 24_990 else "2024-01-01T00:00:00.000Z",
            None if i < 24_990 else f"late {i}",
            ("eu-west-1",),
            snapshot_id,
            "2026-11-28T15:00:03Z",
            "2026-11-28T15:00:03Z",
            False,
        )
        for i in range(25_000)
    ]
    async with open_store(tmp_path) as store:
        written = await store.write(snapshot_id, records, {"status": "complete"})
    data = (tmp_path / written.data_path).as_posix()
    con = duckdb.connect()
    query = "SELECT count(*), count(description), count(creation_date) FROM {}"
    run(con, MACROS, tmp_path)
    assert con.execute(query.format(f"records('{data}')")).fetchall() == [(25_000, 10, 10)]
    changes = (tmp_path / str(written.changes_path)).as_posix()
    described = con.execute(f"DESCRIBE SELECT * FROM events('{changes}')").fetchall()
    types = {name: kind for name, kind, *_ in described}
    assert types["from_state"] == types["to_state"] == "VARCHAR"
