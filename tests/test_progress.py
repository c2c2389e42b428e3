"""The terminal summary table: what a run did, in plain text whatever the values hold."""

from __future__ import annotations

from rich.console import Console

from aggregator.progress import summary_table
from aggregator.service import RunSummary


def test_values_are_shown_as_they_are_never_as_markup() -> None:
    """Brackets in a path or an error code are text: `[prod]` is not a style to drop and
    `[/x]` not a closing tag to choke on; more than ten failures end with a count."""
    failed = tuple(
        {"account_id": f"11111111111{i % 10}", "region": "eu-west-1", "error_code": "[Denied]"}
        for i in range(12)
    )
    summary = RunSummary(
        snapshot_id="20261128T150000Z-abcd",
        status="partial",
        output="/data/[prod]",
        manifest_path="/data/[prod]/m.json",
        data_path="/data/[prod]/[/x]/snapshot.jsonl",
        accounts=10,
        partitions={"planned": 22, "ok": 10, "failed": 12, "skipped": 0},
        jobs=5,
        stale=1,
        duplicates=0,
        requests=30,
        throttles=0,
        retries=2,
        restarts=0,
        wall_seconds=1.5,
        failed=failed,
    )
    console = Console(record=True, width=200)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "/data/[prod]/[/x]/snapshot.jsonl" in text
    assert text.count("[Denied]") == 10
    assert "... and 2 more" in text
