"""The terminal summary table: what a run did, in plain text whatever the values hold."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from aggregator.progress import print_summary
from aggregator.service import RunSummary


def run_summary(**fields: Any) -> RunSummary:
    """A run's summary: one complete partition, unless `fields` say otherwise."""
    values: dict[str, Any] = {
        "snapshot_id": "20261128T150000Z-abcd",
        "status": "complete",
        "output": "/data",
        "manifest_path": "/data/m.json",
        "data_path": "/data/snapshot.jsonl",
        "accounts": 1,
        "partitions": {"planned": 1, "ok": 1, "failed": 0, "skipped": 0},
        "jobs": 5,
        "stale": 0,
        "duplicates": 0,
        "requests": 1,
        "throttles": 0,
        "retries": 0,
        "restarts": 0,
        "wall_seconds": 1.5,
        "failed": (),
    }
    return RunSummary(**(values | fields))


def test_values_are_shown_as_they_are_never_as_markup() -> None:
    """Brackets in a path or an error code are text: `[prod]` is not a style to drop and
    `[/x]` not a closing tag to choke on; more than ten failures end with a count."""
    failed = tuple(
        {"account_id": f"11111111111{i % 10}", "region": "eu-west-1", "error_code": "[Denied]"}
        for i in range(12)
    )
    summary = run_summary(
        status="partial",
        output="/data/[prod]",
        manifest_path="/data/[prod]/m.json",
        data_path="/data/[prod]/[/x]/snapshot.jsonl",
        accounts=10,
        partitions={"planned": 22, "ok": 10, "failed": 12, "skipped": 0},
        stale=1,
        requests=30,
        retries=2,
        failed=failed,
    )
    console = Console(record=True, width=200)
    print_summary(console, summary)
    text = console.export_text()
    assert "/data/[prod]/[/x]/snapshot.jsonl" in text
    assert text.count("[Denied]") == 10
    assert "... and 2 more" in text


def test_a_long_snapshot_path_is_one_line_never_cut_nor_folded() -> None:
    """On a narrow terminal the snapshot path is printed whole on a line of its own, after
    the table: it used to end in an ellipsis, then folded over two lines of a table cell,
    which cannot be copied in one piece."""
    path = "/var/lib/snowball-aggregator/snapshots/date=2026-11-28/20261128T150000Z-abcd.jsonl"
    console = Console(record=True, width=60)
    print_summary(console, run_summary(data_path=path))
    lines = console.export_text().splitlines()
    assert lines[-1] == f"snapshot {path}"
    assert all(len(line) <= 60 for line in lines[:-1])  # the table still fits
    assert "…" not in "".join(lines)


def test_the_progress_bar_says_listed_for_entries_counted_before_the_us_dedupe() -> None:
    """Every US region of an account lists its US jobs: the bar counts what was listed (6 for
    three jobs seen from two regions) and says so, so that it never reads as a job count
    larger than the snapshot's."""
    from aggregator.progress import ProgressBar
    from aggregator.records import JobEntry

    from .test_merge import ACCOUNT, result

    entries = [
        JobEntry(ACCOUNT.account_id, f"JID{i}", "New", "IMPORT", "EDGE", False, None, None)
        for i in range(3)
    ]
    console = Console(record=True, width=200)
    bar = ProgressBar(console)
    bar.cycle_started("20261128T150000Z-abcd", partitions=2)
    for region in ("us-east-1", "us-west-2"):
        bar.partition_done(result(region, *entries))
    console.print(bar._progress.get_renderable())
    text = console.export_text()
    assert "2/2" in text and "listed 6" in text and "jobs" not in text
