"""Command line: `snowball-aggregator {run,daemon,merge,demo,sandbox,validate}`.

Exit codes: 0 every partition succeeded; 1 the snapshot is partial (some partitions failed),
or no snapshot could be made (Organizations discovery failed, shard snapshots missing or
mismatched); 2 usage, configuration or output-location error (one line on stderr, never a
traceback); 130 / 143 a `run` cancelled by SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import orjson
import structlog

from .accounts import DiscoveryError
from .config import (
    MAX_INTERVAL,
    Settings,
    check_endpoints,
    check_output_location,
    key_source,
    load_settings,
    output_origin,
    parse_duration,
    settings_from_mapping,
)
from .errors import ConfigError, OutputError, wrong_location
from .logs import configure_logging, is_terminal
from .service import RunSummary, run_once
from .shards import MAX_SHARDS, ShardError, check_run_id, resolve_shard

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line (exit code 2) like every other."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    from .sandbox import command as sandbox_command

    parser = _Parser(
        prog="snowball-aggregator",
        description="One trustworthy inventory of every AWS Snowball job across accounts and "
        "regions.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="one-shot aggregation")
    run.add_argument("--config", required=True, help="TOML configuration file")
    run.add_argument("--output", help="output directory (overrides output.directory)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument(
        "--quiet", action="store_true", help="print only the summary line (and no info logs)"
    )
    run.add_argument(
        "--shard",
        metavar="I/N",
        help="inventory only shard I of N (0-based; default: JOB_COMPLETION_INDEX and "
        "SNOWBALL_SHARD_COUNT when both are set)",
    )
    run.add_argument(
        "--run-id", help="id shared by the shards of one run (default: SNOWBALL_RUN_ID)"
    )

    daemon = sub.add_parser("daemon", help="aggregate on an interval until stopped")
    daemon.add_argument("--config", required=True, help="TOML configuration file")

    merge = sub.add_parser("merge", help="merge the shard snapshots of a sharded run")
    merge.add_argument("--config", required=True, help="TOML configuration file")
    merge.add_argument("--run-id", required=True, help="the run id its shards were given")
    merge.add_argument("--shards", type=int, required=True, metavar="N", help="shard count")
    merge.add_argument(
        "--wait",
        default="0",
        metavar="DURATION",
        help="wait up to DURATION (e.g. 50m) for shard snapshots still missing (default: 0)",
    )
    merge.add_argument("--output", help="output directory (overrides output.directory)")
    merge.add_argument("--json", action="store_true", help="print the result as JSON")

    demo = sub.add_parser("demo", help="start the sandbox and run one aggregation against it")
    demo.add_argument("--output", default="var/demo", help="output directory (var/demo)")
    demo.add_argument(
        "--accounts",
        type=sandbox_command.count(sandbox_command.MAX_ACCOUNTS),
        default=25,
        help="sandbox accounts (25)",
    )
    demo.add_argument("--seed", type=int, default=1, help="sandbox seed (1)")

    sandbox = sub.add_parser("sandbox", help="serve the fake AWS endpoint")
    sandbox_command.add_arguments(sandbox)

    diff = sub.add_parser("diff", help="print the change events between two snapshots")
    diff.add_argument("old", help="older snapshot id, or 'latest'")
    diff.add_argument("new", help="newer snapshot id, or 'latest'")
    where = diff.add_mutually_exclusive_group()
    where.add_argument("--config", help="TOML configuration file (uses its output.directory)")
    where.add_argument(
        "--output", help="output directory or s3://bucket/prefix (default var/snapshots)"
    )

    validate = sub.add_parser("validate", help="check a configuration file and exit")
    validate.add_argument("--config", required=True, help="TOML configuration file")
    return parser


def _summary_line(summary: RunSummary) -> str:
    p = summary.partitions
    return (
        f"{summary.status}: {summary.jobs} jobs ({summary.stale} stale) from "
        f"{summary.accounts} accounts; partitions ok={p['ok']} failed={p['failed']} "
        f"skipped={p['skipped']}; duplicates removed {summary.duplicates}; "
        f"{summary.requests} requests; {summary.wall_seconds:.2f} s; "
        f"snapshot {summary.data_path}"
    )


def _summary_json(summary: RunSummary) -> str:
    return orjson.dumps(
        {
            "snapshot_id": summary.snapshot_id,
            "status": summary.status,
            "accounts": summary.accounts,
            "partitions": summary.partitions,
            "jobs": summary.jobs,
            "stale": summary.stale,
            "duplicates_removed": summary.duplicates,
            "requests": summary.requests,
            "throttles": summary.throttles,
            "retries": summary.retries,
            "wall_seconds": round(summary.wall_seconds, 3),
            "manifest": str(summary.manifest_path),
            "data": str(summary.data_path),
            "failed_partitions": list(summary.failed),
        },
        option=orjson.OPT_SORT_KEYS,
    ).decode()


def release_signals(held: list[int] | None, *, keep: Sequence[int] = ()) -> None:
    """Give the signals launch.py holds the handling they started with back, but those in
    `keep` (whose arrivals stay in `held` for the command to act on), and deliver again the
    others that arrived meanwhile. Without `held` (not started by launch.py) nothing changes."""
    if held is None:
        return
    import signal

    from .launch import PREVIOUS

    for sig, previous in PREVIOUS.items():
        if sig not in keep:
            signal.signal(sig, previous)
    again = [number for number in held if number not in keep]
    for number in again:
        held.remove(number)  # in place: a kept signal may arrive meanwhile
    for number in again:
        signal.raise_signal(number)


def _cmd_run(args: argparse.Namespace, held: list[int] | None = None) -> int:
    import signal

    from .launch import PREVIOUS

    # Started as the command (launch.py), SIGTERM (a CronJob's pod stopped, `kill`) cancels the
    # run as Ctrl-C does until the new snapshot is published: the files it was writing are
    # removed, the previous snapshot stays LATEST; exit code 143. (Called in-process, the
    # caller's handlers stay as they are; an ignored SIGTERM stays ignored.)
    terminable = held is not None and signal.SIGTERM in PREVIOUS
    release_signals(held, keep=(signal.SIGTERM,) if terminable else ())
    settings = load_settings(args.config)
    if args.output is not None:
        args.output = check_output_location(args.output)
        check_endpoints(settings, output=args.output)
    shard = resolve_shard(args.shard, args.run_id, os.environ)
    on_a_terminal = is_terminal(sys.stderr)
    interactive = on_a_terminal and not (args.quiet or args.json)
    # On a TTY info logs are not shown (the progress bar, or --quiet's one line, tells what
    # they would), nor with --quiet anywhere (a line per partition, 230,000 a run at 10,000
    # accounts, in a cron job's mail); warnings and errors still show. `debug` is asked for.
    level = settings.logging.level
    if (on_a_terminal or args.quiet) and level == "info":
        level = "warning"
    configure_logging(level=level, fmt=settings.logging.format)

    async def work() -> RunSummary:
        options: dict[str, Any] = {"output": args.output, "shard": shard}
        options["output_origin"] = output_origin(settings, "--output" if args.output else None)
        if not interactive:
            return await run_once(settings, **options)
        from .progress import ProgressBar

        with ProgressBar() as bar:
            return await run_once(settings, observers=[bar], **options)

    async def run() -> RunSummary:
        # SIGTERM cancels the work, not this task: a signal once the work has its summary (its
        # snapshot published, the clients closing or closed) finds nothing left to cancel, and
        # the run ends with its own exit code and summary (it ended "terminated", 143).
        running = asyncio.ensure_future(work())
        if terminable:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, running.cancel)
            if held:
                running.cancel()  # terminated while starting
        summary = await running
        if terminable:
            await _hold_to_the_exit(signal.SIGTERM)
        return summary

    try:
        summary: RunSummary | None = asyncio.run(run())
    except asyncio.CancelledError:
        summary = None
    if summary is None:
        _say("terminated")
        return 143
    what = f"the summary of the run ({summary.status})"
    if args.json:
        _result(_summary_json(summary), what)
    elif interactive and is_terminal(sys.stdout):
        from rich.console import Console

        from .progress import print_summary

        print_summary(Console(), summary)
    else:  # also when stdout is a file or a pipe: the table would wrap the data path
        _result(_summary_line(summary), what)
    return summary.exit_code


def _result(text: str, what: str = "the result") -> None:
    """Print `text`, a command's result, on stdout. A reader that went away (`| head`) ends
    the output quietly; any other failure (a full disk, a closed stdout) is one OutputError
    line (exit 2), not a traceback. Either way stdout then goes to /dev/null, so that the
    interpreter's last flush finds nothing to fail on (it would exit 120)."""
    out = sys.stdout
    if out is None:
        raise OutputError(f"cannot write {what} to standard output: it is closed")
    try:
        out.write(text + "\n")
        out.flush()
    except BrokenPipeError:
        _stdout_to_devnull()
    except OSError as exc:
        _stdout_to_devnull()
        raise OutputError(f"cannot write {what} to standard output: {_os_reason(exc)}") from None


def _say(text: str) -> None:
    """`text` on stderr, if there is one to take it (closed, or a pipe nobody reads: dropped,
    and the exit code says the rest)."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            print(text, file=sys.stderr, flush=True)


def _stdout_to_devnull() -> None:
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _seconds_or_text(text: str) -> float | str:
    """A command-line duration: a plain number is seconds (`300`), anything else a duration
    (`50m`) for `parse_duration`."""
    try:
        return float(text)
    except ValueError:
        return text


def _cmd_merge(args: argparse.Namespace) -> int:
    from .shards import merge_run

    settings = load_settings(args.config)
    if args.output is not None:
        args.output = check_output_location(args.output)
        check_endpoints(settings, output=args.output)
    configure_logging(level=settings.logging.level, fmt=settings.logging.format)
    try:
        check_run_id(args.run_id)
    except ValueError as exc:
        raise ConfigError("--run-id", "", str(exc)) from None
    if not 1 <= args.shards <= MAX_SHARDS:
        raise ConfigError("--shards", "", f"must be between 1 and {MAX_SHARDS}, got {args.shards}")
    try:
        wait = parse_duration(_seconds_or_text(args.wait), zero=True)  # 0, 0s, 0m: no wait
        if wait > MAX_INTERVAL:  # a typo (1e9: 31 years), bounded like every other duration
            raise ValueError(f"{args.wait!r} is longer than the maximum of 7 days")
    except ValueError as exc:
        raise ConfigError("--wait", "", str(exc)) from None
    result = asyncio.run(
        merge_run(
            args.output or settings.output.directory,
            args.run_id,
            args.shards,
            wait=wait,
            retain=settings.output.retain,
            store_options={
                "compress": settings.output.compress,
                "session": _output_session(settings),
                "origin": output_origin(settings, "--output" if args.output else None),
            },
        )
    )
    written = result.written
    what = f"the summary of the merge ({result.status})"
    if args.json:
        _result(
            orjson.dumps(
                {
                    "run_id": args.run_id,
                    "shards": args.shards,
                    "status": result.status,
                    "snapshot_id": written.snapshot_id,
                    "jobs": written.records,
                    "manifest": result.manifest_location,
                    "data": result.data_location,
                    "already_merged": result.already_merged,
                },
                option=orjson.OPT_SORT_KEYS,
            ).decode(),
            what,
        )
    else:
        again = " (already merged: nothing written)" if result.already_merged else ""
        _result(
            f"{result.status}: run {args.run_id}: {args.shards} shards merged into snapshot "
            f"{written.snapshot_id}, {written.records} jobs; {result.data_location}{again}",
            what,
        )
    return result.exit_code


def _cmd_diff(args: argparse.Namespace) -> int:
    from .snapshot import diff_command

    if args.output is not None:
        args.output = check_output_location(args.output)
    settings = load_settings(args.config) if args.config is not None else None
    location = args.output or (settings.output.directory if settings else "var/snapshots")
    check_endpoints(settings, output=location)
    session = _output_session(settings) if settings else None
    configure_logging(level="warning", fmt="auto")
    if sys.stdout is None:
        raise OutputError("cannot write the events to standard output: it is closed")
    try:
        return asyncio.run(
            diff_command(location, args.old, args.new, out=sys.stdout.buffer, session=session)
        )
    except OutputError as exc:
        # A location that is wrong as given is named as `run` names it: the flag, or the
        # file (or variable) and key it came from.
        if args.output is not None:
            origin = "--output"
        elif settings is not None:
            origin = output_origin(settings)
        else:
            raise  # var/snapshots, the default of no configuration
        if not wrong_location(exc):
            raise
        raise OutputError(f"{origin}: {exc}", transient=exc.transient) from exc


def _output_session(settings: Settings) -> Any:
    """The session an S3 output location is read and written with, as `run` does: the hub
    profile of the configured partition (`[partitions.<name>] profile`) when it has one, else
    None (the standard credential chain)."""
    hub = settings.partitions.get(settings.accounts.partition)
    if hub is None or not hub.profile:
        return None
    from aiobotocore.session import AioSession

    return AioSession(profile=hub.profile)


def _cmd_validate(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    from .accounts import static_accounts
    from .plan import build_plan

    accounts = static_accounts(settings.accounts)
    plan = build_plan(accounts, settings.regions)
    discovery = " (+ Organizations discovery)" if settings.accounts.organizations.enabled else ""
    _result(f"{args.config}: ok: {len(accounts)} accounts{discovery}, {len(plan)} partitions")
    return 0


async def _daemon(config: str, settings: Settings, held: list[int] | None = None) -> int:
    import signal

    from .health import HealthServer, HealthState
    from .metrics import Metrics
    from .service import run_forever

    stop, hurry, reload_requested = asyncio.Event(), asyncio.Event(), asyncio.Event()

    def on_stop() -> None:  # the second SIGTERM or Ctrl-C cancels the running cycle at once
        (hurry if stop.is_set() else stop).set()

    from .launch import PREVIOUS

    def ours(sig: int) -> bool:
        """Started as the command (launch.py), a signal whoever started the process ignores
        (`nohup`, `trap '' INT`) stays ignored: only those launch.py held are taken over."""
        return held is None or sig in PREVIOUS

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if ours(sig):
            loop.add_signal_handler(sig, on_stop)
    if ours(signal.SIGHUP):
        loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    for number in held or ():  # arrived while the daemon started (see launch.py)
        if number == signal.SIGHUP:
            reload_requested.set()
        else:
            on_stop()
    metrics = Metrics()
    state = HealthState(
        interval=settings.daemon.interval,
        partition_deadline=settings.limits.partition_deadline_seconds,
    )
    listen = settings.daemon.listen
    async with contextlib.AsyncExitStack() as stack:
        try:
            http = await stack.enter_async_context(
                HealthServer(state=state, metrics=metrics, listen=listen)
            )
        except OSError as exc:
            raise ConfigError(
                key_source(settings, "daemon.listen"),
                "daemon.listen",
                f"cannot listen on {listen!r}: {_os_reason(exc)}",
            ) from None
        log = structlog.get_logger()
        log.info("daemon.started", listen=f"{settings.daemon.listen}", port=http.port)
        await run_forever(
            settings,
            stop=stop,
            reload=lambda: load_settings(config),
            reload_requested=reload_requested,
            adopted=_adopt_logging,
            hurry=hurry,
            observers=[metrics, state],
        )
        log.info("daemon.stopped")
    if held is not None:  # started as the command: its own signals
        stopping = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # (a reload, too late)
        await _hold_to_the_exit(*(sig for sig in stopping if ours(sig)))
    return 0


def _adopt_logging(settings: Settings) -> None:
    """The daemon's SIGHUP, once the file read again passed every check (see `run_forever`):
    its `[logging]` applies at once; a refused file changes nothing, logging included."""
    configure_logging(level=settings.logging.level, fmt=settings.logging.format)


def _os_reason(exc: OSError) -> str:
    """The OS's words for `exc` (e.g. "Address already in use"), without the address and
    wording asyncio wraps around them."""
    if exc.errno and exc.errno > 0 and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


def _cmd_daemon(args: argparse.Namespace, held: list[int] | None = None) -> int:
    import signal

    release_signals(held, keep=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    settings = load_settings(args.config)
    configure_logging(level=settings.logging.level, fmt=settings.logging.format)
    return asyncio.run(_daemon(args.config, settings, held))


async def _hold_to_the_exit(*signals: int) -> None:
    """The command has its result: `signals` arriving from now to the exit are held, never
    acted on. Without this, once `asyncio.run` closed the loop they got their default action
    back for the rest of the exit (the interpreter's shutdown: about 0.1 s), and a second
    SIGTERM or Ctrl-C right after the first (a supervisor that sends two), or one as `run`
    prints its summary, killed the process (exit status -15 or -2, not 0 or the run's own).

    The loop's worker threads end first, so that the main thread, which blocks them, is the
    only one left to receive them (the kernel gives a process's signal to any thread that
    does not block it)."""
    import signal

    await asyncio.get_running_loop().shutdown_default_executor()
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)


async def _demo(args: argparse.Namespace) -> int:
    from .sandbox import FleetSpec, Sandbox

    async with Sandbox(fleet=FleetSpec(accounts=args.accounts, seed=args.seed)) as sb:
        # The demo is the edge of the process: point the standard SDK settings at the sandbox.
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
            os.environ.pop(name, None)
        os.environ.update(sb.env())
        os.environ["AWS_CONFIG_FILE"] = os.devnull
        os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        active = list(sb.account_ids)
        settings = settings_from_mapping(
            {"accounts": {"ids": active}, "output": {"directory": args.output}},
            source="<demo>",
        )
        cpu = time.process_time()
        summary = await run_once(settings, output_origin="--output")
        cpu = time.process_time() - cpu
        truth = len(sb.truth())
    p = summary.partitions
    _result(
        "\n".join(
            [
                "snowball-aggregator demo (sandbox on loopback, no AWS account needed)",
                f"  accounts           {summary.accounts}",
                f"  partitions         {p['ok']} ok, {p['failed']} failed, {p['skipped']} skipped",
                f"  jobs               {summary.jobs} (sandbox truth: {truth})",
                f"  duplicates removed {summary.duplicates}",
                f"  requests           {summary.requests}",
                f"  wall time          {summary.wall_seconds:.2f} s",
                f"  CPU time           {cpu:.2f} s (aggregator and in-process sandbox together)",
                f"  snapshot           {summary.data_path}",
                f"  manifest           {summary.manifest_path}",
            ]
        )
    )
    return summary.exit_code


def _cmd_demo(args: argparse.Namespace) -> int:
    # A mistake there is the flag's, not "<demo>"'s.
    args.output = check_output_location(args.output)
    configure_logging(level="warning", fmt="auto")
    return asyncio.run(_demo(args))


def _joined_values(argv: Sequence[str]) -> list[str]:
    """`--shard -1/3` as `--shard=-1/3`: argparse takes a value that starts with "-" for an
    option, and said "expected one argument" instead of what is wrong with the shard."""
    out: list[str] = []
    rest = iter(argv)
    for arg in rest:
        value = next(rest, None) if arg == "--shard" else None
        if value is not None and value.startswith("-") and value[1:2].isdigit():
            out.append(f"--shard={value}")
        else:
            out.extend(a for a in (arg, value) if a is not None)
    return out


def main(argv: Sequence[str] | None = None, *, held: list[int] | None = None) -> int:
    """The commands; launch.py's `main` (the `snowball-aggregator` console script and
    `python -m aggregator`) calls it with the signals it `held` while starting."""
    args = _parser().parse_args(_joined_values(sys.argv[1:] if argv is None else argv))
    handlers = {
        "demo": _cmd_demo,
        "merge": _cmd_merge,
        "validate": _cmd_validate,
        "diff": _cmd_diff,
    }
    try:
        if args.command == "run":
            return _cmd_run(args, held)
        if args.command == "daemon":
            return _cmd_daemon(args, held)
        release_signals(held)
        if args.command == "sandbox":
            from .sandbox import command as sandbox_command

            return sandbox_command.run(args)
        return handlers[args.command](args)
    except ConfigError as exc:
        _say(f"error: {exc}")
        return 2
    except OutputError as exc:
        # A location that is wrong (2), or one that failed for now (1: a retry may succeed).
        _say(f"error: {exc}")
        return 1 if exc.transient else 2
    except (DiscoveryError, ShardError) as exc:
        # No snapshot could be made; the previous one stays LATEST. A retry may succeed.
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
