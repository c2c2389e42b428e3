"""Progress: a rich progress bar for one-shot runs on a TTY, and the final summary table."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from .fetch import PartitionResult
from .records import JobRecord
from .service import RunSummary

__all__ = ["ProgressBar", "print_summary", "summary_table"]


class ProgressBar:
    """A CycleObserver drawing partitions done/total, jobs listed, throttles, retries and ETA.

    "listed" counts ListJobs entries as they arrive, before the US dedupe (a US job is listed
    by every US region of its account); the summary table gives the jobs after it."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]partitions"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "listed {task.fields[jobs]}  throttles {task.fields[throttles]}  "
                "retries {task.fields[retries]}  failed {task.fields[failed]}"
            ),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=True,
        )
        self._task: TaskID | None = None
        self._jobs = self._throttles = self._retries = self._failed = 0

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def cycle_started(self, snapshot_id: str, partitions: int) -> None:
        self._task = self._progress.add_task(
            "run", total=partitions, jobs=0, throttles=0, retries=0, failed=0
        )

    def partition_done(self, result: PartitionResult) -> None:
        self._jobs += len(result.entries)
        self._throttles += result.throttles
        self._retries += result.retries
        self._failed += result.status == "failed"
        if self._task is not None:
            self._progress.update(
                self._task,
                advance=1,
                jobs=self._jobs,
                throttles=self._throttles,
                retries=self._retries,
                failed=self._failed,
            )

    def cycle_finished(self, summary: RunSummary, records: Sequence[JobRecord]) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)


def print_summary(console: Console, summary: RunSummary) -> None:
    """The summary table, then the snapshot's path on a line of its own, never broken by
    Rich: in a table's cell a long path folded over two lines (or was cut to "..."), and
    could not be copied in one piece; the terminal wraps a long line only for the eye."""
    console.print(summary_table(summary))
    console.print(Text(f"snapshot {summary.data_path}"), soft_wrap=True)


def summary_table(summary: RunSummary) -> Table:
    """A short table of what a run did (the snapshot's path follows it: `print_summary`).
    Values are plain text, never Rich markup: `/data/[prod]/...` shows as it is."""
    p = summary.partitions
    title = f"snapshot {escape(summary.snapshot_id)} ({summary.status})"
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # a long value wraps, never cut to "..."
    rows = [
        ("accounts", str(summary.accounts)),
        ("partitions", f"{p['ok']} ok, {p['failed']} failed, {p['skipped']} skipped"),
        ("jobs", f"{summary.jobs} ({summary.stale} stale)"),
        ("duplicates removed", str(summary.duplicates)),
        (
            "requests",
            f"{summary.requests} ({summary.throttles} throttled, {summary.retries} retried)",
        ),
        ("wall time", f"{summary.wall_seconds:.2f} s"),
    ]
    for name, value in rows:
        table.add_row(name, Text(value))
    for failure in summary.failed[:10]:
        table.add_row(
            "[red]failed[/red]",
            Text(f"{failure['account_id']}/{failure['region']}: {failure['error_code']}"),
        )
    if len(summary.failed) > 10:
        table.add_row("[red]failed[/red]", Text(f"... and {len(summary.failed) - 10} more"))
    return table
