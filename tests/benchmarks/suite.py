"""The benchmark suite of issue 7: scenarios x tools, one table, and the lower bound.

Each scenario starts the sandbox in its own process (tests/benchmarks/sandbox.py), reads its
truth, and runs every tool in a fresh child process (tests/benchmarks/child.py) so that peak
RSS and CPU are the tool's own; the sandbox's CPU is read from its stats and shown apart.
Baselines run in the same invocation, so ratios hold on a noisy machine.

Lower bound per scenario, from the truth: the longest page chain x (latency + one raw round
trip), the per-partition rate limit (requests in order, at most `rps` in any second), and the
CPU floor (the raw aiohttp + orjson tool's CPU for the whole scenario); the largest wins.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .sandbox import SandboxProcess

__all__ = ["SCENARIOS", "Scenario", "main"]

_FOREIGN = ("AWS_", "SNOWBALL_AGGREGATOR_", "BOTO_")
FIRST_ACCOUNT = 200_000_000_000
SEED = 7
PAGE = 100
COMPARED = (
    "account_id",
    "job_id",
    "job_state",
    "job_type",
    "snowball_type",
    "is_master",
    "creation_date",
    "description",
    "regions",
)
TOOL_NAMES = {
    "ours": "aggregator",
    "ours-warm": "aggregator, 2nd cycle",
    "ours-next": "aggregator, next one-shot run",
    "botocore-send": "aggregator, direct=False",
    "stock": "aggregator, stock=True",
    "user": "boto3 thread-pool script",
    "floor": "raw aiohttp + orjson",
}


@dataclass(frozen=True)
class Scenario:
    """One world and the limits every tool runs under; `subsets` caps slow tools' accounts."""

    key: str
    title: str
    accounts: int
    regions: tuple[str, ...] | None  # None: every snowball region
    latency: float
    rps: float
    max_concurrency: int
    throttle_rps: float | None = None
    jobs: tuple[tuple[str, str, int], ...] = ()
    max_jobs: int = 2500
    subsets: dict[str, int] = field(default_factory=dict)
    tools: tuple[str, ...] | None = None  # None: every tool asked for; else those of them

    def setup(self) -> str:
        """One line: the world and the limits, for the table's footnotes."""
        world = f"{self.accounts} account(s) x " + (
            f"{len(self.regions)} region(s)" if self.regions else "every snowball region"
        )
        if self.jobs:
            world += ", " + ", ".join(f"{n:,} jobs in {r}" for _, r, n in self.jobs)
        world += f", seed {SEED}, latency {1000 * self.latency:g} ms"
        if self.throttle_rps is not None:
            world += f", sandbox throttles above {self.throttle_rps:g} req/s per partition"
        limits = f"max_concurrency {self.max_concurrency}, {self.rps:g} req/s per partition"
        return f"({self.key}) {world}; tools: {limits}; boto3 script: 32 threads"

    def sandbox_args(self) -> list[str]:
        args = ["--accounts", str(self.accounts), "--seed", str(SEED)]
        args += ["--max-jobs", str(self.max_jobs), "--latency", str(self.latency)]
        if self.regions:
            args += ["--regions", ",".join(self.regions)]
        if self.throttle_rps is not None:
            args += ["--throttle-rps", str(self.throttle_rps)]
        for account_id, region, n in self.jobs:
            args += ["--job", f"{account_id}:{region}:{n}"]
        return args


HUGE_ACCOUNT = Scenario(
    key="c",
    title="one huge account: 50,000 jobs in one region",
    accounts=1,
    regions=("eu-west-1",),
    latency=0.0,
    rps=1000.0,
    max_concurrency=64,
    jobs=((str(FIRST_ACCOUNT), "eu-west-1", 50_000),),
    max_jobs=50_000,
)

SCENARIOS = (
    Scenario(
        key="a",
        title="latency-bound: 200 accounts x all regions, 50 ms, 5 req/s per partition",
        accounts=200,
        regions=None,
        latency=0.05,
        rps=5.0,
        max_concurrency=256,
        throttle_rps=5.0,
        subsets={"stock": 50, "user": 100},
    ),
    Scenario(
        key="b",
        title="CPU-bound: 2,000 accounts x all regions, no latency",
        accounts=2000,
        regions=None,
        latency=0.0,
        rps=1000.0,
        max_concurrency=64,
        subsets={"stock": 50, "user": 50},
    ),
    HUGE_ACCOUNT,
    # (c) at (a)'s network latency: what the chain costs once a page takes a round trip over
    # a network rather than over loopback to a local process (only the raw floor and ours:
    # every tool spends ~25 s here).
    replace(
        HUGE_ACCOUNT,
        key="c50",
        title="one huge account at 50 ms latency: 50,000 jobs in one region",
        latency=0.05,
        tools=("ours",),
    ),
)
SNAPSHOT_RECORDS = 1_000_000
PROBE_FROM = 500  # accounts: bigger full-size runs are probed on a tenth first


@dataclass
class Row:
    """One line of the table. `wall`, `cpu` and `sandbox_cpu` are scaled to the full scenario
    when the tool ran on a subset (`scale` > 1); `pages`, `requests` and `jobs` are measured."""

    scenario: str
    tool: str
    accounts: int
    scale: float
    wall: float
    cpu: float
    sandbox_cpu: float | None
    pages: int
    requests: int
    rss_mb: float
    jobs: int
    missing: int | None
    duplicates: int | None
    wrong: int | None = None
    ratio: float | None = None
    status: str = "complete"
    notes: str = ""

    @property
    def cpu_ms_per_page(self) -> float:
        return 1000 * self.cpu / self.scale / self.pages if self.pages else 0.0


# --- truth ------------------------------------------------------------------------------


@dataclass
class Truth:
    """The compared fields of every expected record, and list sizes per (account, region)."""

    records: list[tuple[Any, ...]]
    sizes: Counter[tuple[str, str]]

    @classmethod
    def read(cls, records: Iterable[dict[str, Any]]) -> Truth:
        rows = []
        sizes: Counter[tuple[str, str]] = Counter()
        for record in records:
            rows.append(_key_fields(record))
            for region in record["regions"]:
                sizes[(record["account_id"], region)] += 1
        return cls(rows, sizes)

    def pages(self, account_ids: Sequence[str], regions: Sequence[str]) -> list[int]:
        """Pages of each (account, region) chain: an empty list is still one request."""
        return [self.chain(a, r) for a in account_ids for r in regions]

    def chain(self, account_id: str, region: str) -> int:
        """Pages of the (account, region) chain."""
        return max(1, math.ceil(self.sizes[(account_id, region)] / PAGE))


def _key_fields(record: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(tuple(sorted(record[k])) if k == "regions" else record.get(k) for k in COMPARED)


def _compare(expected: Iterable[tuple[Any, ...]], path: Path) -> tuple[int, int, int, int]:
    """(jobs written, missing, wrong, duplicates) of a JSON Lines output sorted by key."""
    seen: dict[tuple[str, str], tuple[Any, ...]] = {}
    duplicates = 0
    with open(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = _key_fields(json.loads(line))
            key = (row[0], row[1])
            if key in seen:
                duplicates += 1
            seen[key] = row
    missing = wrong = 0
    for row in expected:
        got = seen.get((row[0], row[1]))
        if got is None:
            missing += 1
        elif got != row:
            wrong += 1
    return len(seen), missing, wrong, duplicates


# --- lower bound ------------------------------------------------------------------------


def rate_bound(pages: int, step: float, rps: float) -> float:
    """Seconds for `pages` requests in order, each taking `step`, at most `rps` per second
    (a window of floor(rps) requests per floor(rps)/rps seconds, like the aggregator's)."""
    count = max(1, math.floor(rps))
    period = count / rps
    starts: list[float] = []
    for k in range(pages):
        t = starts[-1] + step if starts else 0.0
        if k >= count:
            t = max(t, starts[k - count] + period)
        starts.append(t)
    return starts[-1] + step


def first_run_order(account_ids: Sequence[str], regions: Sequence[str]) -> list[tuple[str, str]]:
    """The (account, region) partitions in the order the aggregator starts them on a first
    run (no previous manifest: US regions first, then accounts round-robin)."""
    from aggregator.accounts import Account, role_arn
    from aggregator.config import RegionsSettings
    from aggregator.plan import build_plan, longest_first

    accounts = [Account(a, role_arn(a, "bench")) for a in account_ids]
    plan = longest_first(build_plan(accounts, RegionsSettings(names=tuple(regions))), {})
    return [(p.account_id, p.region) for p in plan]


def discovery_bound(pages: Sequence[int], per_request: float, step: float, rps: float) -> float:
    """What a first run that asks its first pages in this order cannot beat: `pages[i]` is
    the chain length of the i-th partition started. The sandbox is one process, so its
    answers come at most one per `per_request` seconds of its CPU: the i-th first page is
    answered no earlier than (i + 1) x per_request, and the chain's other pages then take at
    least `rate_bound` of their own (later pages' sandbox time is left out: a lower bound)."""
    rest: dict[int, float] = {}
    worst = 0.0
    for i, n in enumerate(pages):
        if n not in rest:
            rest[n] = rate_bound(n - 1, step, rps) if n > 1 else 0.0
        worst = max(worst, (i + 1) * per_request + rest[n])
    return worst


@dataclass
class Bound:
    chain: float
    rate: float
    cpu: float
    longest_chain: int
    round_trip: float
    # A first run's bound given its plan order and the sandbox's measured CPU per request
    # (scenarios with a rate limit only; see `discovery_bound`); and that CPU per request.
    discovery: float | None = None
    sandbox_per_request: float | None = None

    @property
    def value(self) -> float:
        return max(self.chain, self.rate, self.cpu)

    @property
    def limited_by(self) -> str:
        # The rate bound never undercuts the chain; equal (up to rounding) means no pacing.
        terms = [("cpu", self.cpu), ("rate", self.rate), ("chain", self.chain)]
        if self.rate <= self.chain * 1.000001:
            terms.remove(("rate", self.rate))
        return max(terms, key=lambda term: term[1])[0]


# --- running ----------------------------------------------------------------------------


def _child(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-5:]
        raise RuntimeError(f"{spec['tool']} failed ({done.returncode}): {' | '.join(tail)}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _ids(n: int) -> list[str]:
    return [str(FIRST_ACCOUNT + i) for i in range(n)]


def run_scenario(
    scenario: Scenario,
    tools: Sequence[str],
    work: Path,
    *,
    scale: float,
    budget: float,
    log: Any,
) -> tuple[list[Row], Bound]:
    accounts = max(1, round(scenario.accounts * scale))
    with SandboxProcess(scenario.sandbox_args()) as sb:
        env = {
            # Nothing of the developer's AWS setup (profiles, endpoints, model paths) leaks in.
            **{k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN)},
            **sb.env,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        started = time.perf_counter()
        truth = Truth.read(sb.truth())  # also makes the sandbox generate every list now
        log(f"  truth: {len(truth.records):,} jobs ({time.perf_counter() - started:.1f} s)")
        if scenario.regions is None:
            from aggregator.config import snowball_regions

            regions: tuple[str, ...] = snowball_regions()
        else:
            regions = scenario.regions
        biggest = max(truth.sizes, key=truth.sizes.__getitem__)
        rows: list[Row] = []
        chains: dict[str, float] = {}

        def measure(tool: str, n: int) -> Row:
            ids = _ids(n)
            spec = {
                "tool": tool,
                "accounts": ids,
                "regions": list(scenario.regions) if scenario.regions else ["all"],
                "max_concurrency": scenario.max_concurrency,
                "requests_per_second": scenario.rps,
                "threads": 32,
                # Sequential first pages of the biggest list, within the sandbox's burst.
                "calibrate": [*biggest, 40 if scenario.throttle_rps is None else 4],
                "latency": scenario.latency,
                "output": str(work / f"{scenario.key}-{tool}-{n}"),
            }
            if tool == "ours-next":
                # A scheduled one-shot run (cron): a fresh process whose output already holds
                # the previous run's snapshot, so its plan is ordered by that manifest.
                spec["tool"] = "ours"
                _child(spec, env)
                time.sleep(1.1)  # the sandbox's token buckets refill, as between two runs
            before = sb.stats()
            log(f"  {tool}: {n} accounts ...")
            result = _child(spec, env)
            after = sb.stats()
            before = result.get("sandbox_before", before)  # ours-warm: after its first run
            if tool == "floor":
                chains["round_trip"] = result["round_trip"]
                jobs, missing, wrong, dups = result["jobs"], None, None, None
            else:
                chosen = set(ids)
                expected = (r for r in truth.records if r[0] in chosen)
                jobs, missing, wrong, dups = _compare(expected, Path(result["data_path"]))
            shutil.rmtree(spec["output"], ignore_errors=True)
            factor = accounts / n
            row = Row(
                scenario=scenario.key,
                tool=tool,
                accounts=n,
                scale=factor,
                wall=result["wall"] * factor,
                cpu=result["cpu"] * factor,
                sandbox_cpu=(after["cpu_seconds"] - before["cpu_seconds"]) * factor,
                pages=sum(truth.pages(ids, regions)),
                requests=after["total_requests"] - before["total_requests"],
                rss_mb=result["rss_mb"],
                jobs=jobs,
                missing=missing,
                duplicates=dups,
                wrong=wrong,
                status=result.get("status", "complete"),
            )
            log(
                f"    wall {row.wall:.2f} s, cpu {row.cpu:.2f} s, "
                f"{row.cpu_ms_per_page:.3f} ms/page, rss {row.rss_mb:.0f} MB"
            )
            return row

        chosen_tools = [t for t in tools if t != "floor"]
        if scenario.tools is not None:
            chosen_tools = [t for t in chosen_tools if t in scenario.tools]
        for tool in ["floor", *chosen_tools]:
            n = min(accounts, scenario.subsets.get(tool, accounts))
            if n == accounts >= PROBE_FROM and budget > 0 and tool != "floor":
                # A tenth first: a run projected to blow the time budget stays a tenth.
                probe = measure(tool, max(1, accounts // 10))
                if probe.wall > budget:
                    probe.notes = f"full run projected {probe.wall:.0f} s > {budget:.0f} s budget"
                    rows.append(probe)
                    continue
            rows.append(measure(tool, n))
        floor_cpu = next(r.cpu for r in rows if r.tool == "floor")
        round_trip = chains["round_trip"]
        all_pages = truth.pages(_ids(accounts), regions)
        longest = max(all_pages)
        step = scenario.latency + round_trip
        bound = Bound(
            chain=longest * step,
            rate=rate_bound(longest, step, scenario.rps),
            cpu=floor_cpu,
            longest_chain=longest,
            round_trip=round_trip,
        )
        measured = [r for r in rows if r.scale == 1 and r.requests and r.sandbox_cpu]
        if scenario.throttle_rps is not None and measured:
            # The sandbox's cheapest CPU per request in this scenario's full-size runs.
            per_request = min(r.sandbox_cpu / r.requests for r in measured if r.sandbox_cpu)
            order = first_run_order(_ids(accounts), regions)
            bound.sandbox_per_request = per_request
            bound.discovery = discovery_bound(
                [truth.chain(a, r) for a, r in order], per_request, step, scenario.rps
            )
        for row in rows:
            row.ratio = row.wall / bound.value if bound.value else None
        return rows, bound


def run_snapshot(work: Path, log: Any) -> list[Row]:
    """Two rows: a first write (no previous snapshot) and the steady state (a previous
    snapshot of as many records, 1% changed state, 0.5% added, 0.5% removed), both through
    the store a run writes with (see snapshot_bench.py)."""
    log(f"snapshot: writing {SNAPSHOT_RECORDS:,} records ...")
    result = _child(
        {"tool": "snapshot", "records": SNAPSHOT_RECORDS, "output": str(work / "snapshot")},
        dict(os.environ),
    )
    shutil.rmtree(work / "snapshot", ignore_errors=True)
    rows = []
    for tool, prefix, what in (
        ("Store.write, first", "first_", "no previous snapshot"),
        ("Store.write, steady", "", f"{result['changes']:,} change events"),
        ("Store.write, data only", "data_", "changes=False: data file and manifest"),
    ):
        wall, cpu = result[f"{prefix}wall"], result[f"{prefix}cpu"]
        rows.append(
            Row(
                scenario="snapshot",
                tool=tool,
                accounts=0,
                scale=1.0,
                wall=wall,
                cpu=cpu,
                sandbox_cpu=None,
                pages=0,
                requests=0,
                rss_mb=result["rss_mb"],
                jobs=result["records"],
                missing=None,
                duplicates=None,
                notes=f"{SNAPSHOT_RECORDS / wall:,.0f} records/s; {what}",
            )
        )
        log(f"    {tool}: wall {wall:.2f} s, cpu {cpu:.2f} s")
    return rows


# --- report -----------------------------------------------------------------------------

HEADER = (
    "scen",
    "tool",
    "accts",
    "wall s",
    "CPU s",
    "sbx CPU s",
    "CPU ms/page",
    "requests",
    "peak RSS MB",
    "jobs",
    "miss/dup",
    "x bound",
    "notes",
)


def _cells(row: Row) -> tuple[str, ...]:
    scaled = row.scale > 1
    mark = "~" if scaled else ""
    if row.missing is None:
        quality = "-"
    else:
        quality = f"{row.missing}/{row.duplicates}" + (f" ({row.wrong} wrong)" if row.wrong else "")
    notes = row.notes
    if scaled:
        notes = "; ".join(filter(None, (notes, f"wall and CPU x{row.scale:g}")))
    full = round(row.accounts * row.scale)
    return (
        row.scenario,
        TOOL_NAMES.get(row.tool, row.tool),
        (f"{row.accounts}/{full}" if scaled else str(full)) if row.accounts else "-",
        f"{mark}{row.wall:.2f}",
        f"{mark}{row.cpu:.2f}",
        "-" if row.sandbox_cpu is None else f"{mark}{row.sandbox_cpu:.2f}",
        f"{row.cpu_ms_per_page:.3f}" if row.pages else "-",
        f"{row.requests:,}" if row.requests else "-",
        f"{row.rss_mb:.0f}",
        f"{row.jobs:,}",
        quality,
        "-" if row.ratio is None else f"{row.ratio:.2f}",
        notes,
    )


def render(
    rows: Sequence[Row],
    bounds: dict[str, Bound],
    checks: Sequence[str],
    setups: Sequence[str] = (),
) -> str:
    table = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    numeric = {2, 3, 4, 5, 6, 7, 8, 9, 11}

    def fmt(line: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    out = [fmt(HEADER), "  ".join("-" * w for w in widths)]
    out += [fmt(line) for line in table[1:]]
    out.append("")
    for key, bound in bounds.items():
        out.append(
            f"lower bound ({key}) {bound.value:.2f} s = max(chain {bound.chain:.2f} s "
            f"[{bound.longest_chain} pages x (latency + {1000 * bound.round_trip:.2f} ms raw "
            f"round trip)], rate {bound.rate:.2f} s, CPU floor {bound.cpu:.2f} s): "
            f"{bound.limited_by}-bound"
        )
        if bound.discovery is not None and bound.sandbox_per_request is not None:
            out.append(
                f"first-run discovery bound ({key}) {bound.discovery:.2f} s: the aggregator's "
                f"first-run order of partitions, first pages answered at most one per "
                f"{1000 * bound.sandbox_per_request:.2f} ms (the sandbox's CPU per request), "
                f"then each chain at its rate"
            )
    out += ["", *setups]
    out += [
        "",
        "CPU s and CPU ms/page: the tool's process only (pages = ListJobs pages in the truth);",
        "sbx CPU s: the sandbox process during the run. requests: as counted by the sandbox",
        "(AssumeRole and retries included). miss/dup: truth jobs missing or with a wrong",
        "field / duplicate lines. accts 50/2000 and ~: the tool ran on the first 50 of the",
        "2000 accounts (a baseline too slow for the time budget); its wall and CPU are scaled",
        "linearly to the full scenario, requests, jobs and RSS are as measured on the subset.",
        "x bound: (scaled) wall / lower bound.",
        "",
        *checks,
    ]
    return "\n".join(out)


def _find(rows: Sequence[Row], scenario: str, tool: str) -> Row | None:
    return next((r for r in rows if r.scenario == scenario and r.tool == tool), None)


def check_targets(rows: Sequence[Row], bounds: dict[str, Bound]) -> list[str]:
    """The issue's "must show" lines, each PASS or FAIL with its numbers."""
    out = ["targets:"]

    def line(ok: bool, text: str) -> None:
        out.append(f"  [{'PASS' if ok else 'FAIL'}] {text}")

    ours, user = _find(rows, "a", "ours"), _find(rows, "a", "user")
    if ours and user and "a" in bounds:
        gain = user.wall / ours.wall
        line(gain >= 10, f"(a) wall {gain:.1f}x better than the boto3 script (>= 10x)")
        ratio = ours.wall / bounds["a"].value
        line(ratio <= 1.25, f"(a) wall {ratio:.2f}x the lower bound (<= 1.25x)")
    discovery = bounds["a"].discovery if "a" in bounds else None
    if ours and discovery:
        out.append(
            f"  [info] (a) first run: {ours.wall / discovery:.2f}x the first-run discovery "
            f"bound ({discovery:.2f} s)"
        )
    for tool, label in (("ours-warm", "2nd cycle"), ("ours-next", "next run")):
        later = _find(rows, "a", tool)
        if later and user and "a" in bounds:
            gain, ratio = user.wall / later.wall, later.wall / bounds["a"].value
            line(gain >= 10, f"(a, {label}) wall {gain:.1f}x better than the boto3 script (>= 10x)")
            line(ratio <= 1.25, f"(a, {label}) wall {ratio:.2f}x the lower bound (<= 1.25x)")
    ours, stock, floor = (
        _find(rows, "b", "ours"),
        _find(rows, "b", "stock"),
        _find(rows, "b", "floor"),
    )
    if ours and stock and floor:
        vs_stock = ours.cpu_ms_per_page / stock.cpu_ms_per_page
        line(vs_stock <= 1 / 3, f"(b) CPU/page {vs_stock:.2f}x stock aiobotocore (<= 0.33x)")
        vs_floor = ours.cpu_ms_per_page / floor.cpu_ms_per_page
        line(vs_floor <= 3, f"(b) CPU/page {vs_floor:.2f}x the raw floor (<= 3x)")
    for key in ("c", "c50"):
        ours = _find(rows, key, "ours")
        if not ours or key not in bounds:
            continue
        bound = bounds[key]
        line(ours.rss_mb < 250, f"({key}) peak RSS {ours.rss_mb:.0f} MB (< 250 MB)")
        line(
            ours.wall <= 1.25 * bound.chain,
            f"({key}) {ours.pages / ours.wall:.0f} pages/s vs the chain's "
            f"{bound.longest_chain / bound.chain:.0f} pages/s with raw round trips "
            f"({ours.wall / bound.chain:.2f}x the chain bound; <= 1.25x)",
        )
    for tool in ("Store.write, first", "Store.write, steady"):
        snap = _find(rows, "snapshot", tool)
        if snap:
            rate = snap.jobs / snap.wall
            line(rate >= 500_000, f"snapshot {tool[13:]} write {rate:,.0f} records/s (>= 500,000)")
    data = _find(rows, "snapshot", "Store.write, data only")
    if data:
        out.append(
            f"  [info] snapshot data file and manifest alone (no change feed): "
            f"{data.jobs / data.wall:,.0f} records/s"
        )
    correct = all(r.missing in (None, 0) and not r.duplicates and not r.wrong for r in rows)
    line(correct, "every tool's snapshot equals the sandbox truth (no missing/wrong/duplicate)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__)
    parser.add_argument("--scenarios", default="a,b,c,c50,snapshot", help="subset, e.g. a,c")
    parser.add_argument(
        "--tools",
        default="ours,ours-warm,ours-next,botocore-send,stock,user",
        help="besides the raw floor",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="fraction of each scenario's accounts (1.0)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=200.0,
        help="seconds a full-size run may take (projected from a tenth; 0 = no limit)",
    )
    parser.add_argument("--output", default="var/bench", help="where the JSON goes")
    args = parser.parse_args(argv)
    wanted = args.scenarios.split(",")
    tools = args.tools.split(",")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    rows: list[Row] = []
    bounds: dict[str, Bound] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="snowball-bench-") as tmp:
        work = Path(tmp)
        for scenario in SCENARIOS:
            if scenario.key not in wanted:
                continue
            log(f"scenario {scenario.key}: {scenario.title}")
            scenario_rows, bound = run_scenario(
                scenario, tools, work, scale=args.scale, budget=args.budget, log=log
            )
            rows += scenario_rows
            bounds[scenario.key] = bound
        if "snapshot" in wanted:
            rows += run_snapshot(work, log)
    elapsed = time.perf_counter() - started
    checks = check_targets(rows, bounds)
    setups = [s.setup() for s in SCENARIOS if s.key in wanted]
    text = render(rows, bounds, checks, setups)
    print(text)
    print(f"\n(suite took {elapsed:.0f} s)")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    document = {
        "started_at": stamp,
        "seconds": elapsed,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "scale": args.scale,
        "scenarios": {s.key: s.title for s in SCENARIOS if s.key in wanted},
        "bounds": {k: {**asdict(b), "value": b.value} for k, b in bounds.items()},
        "rows": [{**asdict(r), "cpu_ms_per_page": r.cpu_ms_per_page} for r in rows],
        "targets": checks[1:],
        "table": text,
    }
    for name in (f"bench-{stamp}.json", "latest.json"):
        (out_dir / name).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0
