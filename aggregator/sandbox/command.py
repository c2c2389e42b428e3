"""``snowball-aggregator sandbox``: serve the fake AWS until SIGINT or SIGTERM.

On start it prints, then flushes, one ``export NAME=value`` line per variable of
``Sandbox.env()`` and a last line ``# sandbox listening on http://HOST:PORT``, so a shell can
``eval`` the output and a parent process can read the port.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
from collections.abc import Callable

from .faults import Faults
from .fleet import FleetSpec
from .server import Sandbox

__all__ = ["add_arguments", "build", "main", "run"]

DEFAULT_PORT = 4566
MAX_ACCOUNTS = 100_000  # a large organisation, and still a fleet that fits in memory
READY_PREFIX = "# sandbox listening on "


def _ids(text: str) -> frozenset[str]:
    ids = frozenset(part.strip() for part in text.split(",") if part.strip())
    for account_id in ids:
        if len(account_id) != 12 or not account_id.isdigit():
            raise argparse.ArgumentTypeError(f"not a 12-digit account id: {account_id!r}")
    return ids


def _account_region(text: str) -> tuple[str, str]:
    account_id, sep, region = text.partition(":")
    if not sep or len(account_id) != 12 or not account_id.isdigit() or not region:
        raise argparse.ArgumentTypeError(f"expected ACCOUNT:REGION, got {text!r}")
    return account_id, region


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port in [0, 65535]: {text}")
    return value


_port.__name__ = "port"  # argparse's word for a value int() refuses


def count(most: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 to `most`."""

    def parse(text: str) -> int:
        value = int(text)
        if not 1 <= value <= most:
            raise argparse.ArgumentTypeError(f"not a number from 1 to {most:,}: {text}")
        return value

    parse.__name__ = "whole number"  # argparse's word for a value int() refuses
    return parse


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"not a probability in [0, 1]: {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sandbox's options to ``parser``."""
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    net.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = free)"
    )
    world = parser.add_argument_group("fleet")
    world.add_argument(
        "--accounts", type=count(MAX_ACCOUNTS), default=25, help="member accounts (default 25)"
    )
    world.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    world.add_argument("--max-jobs", type=int, default=2500, help="jobs cap per list (2500)")
    world.add_argument(
        "--regions",
        type=lambda text: tuple(r.strip() for r in text.split(",") if r.strip()),
        default=None,
        help="comma-separated regions (default: every snowball region of the partition)",
    )
    world.add_argument(
        "--partition",
        default="aws",
        choices=("aws", "aws-cn", "aws-us-gov"),
        help="aws (default), aws-cn, aws-us-gov",
    )
    world.add_argument("--suspended", type=int, default=0, help="SUSPENDED accounts (0)")
    world.add_argument("--external-id", default=None, help="ExternalId AssumeRole must send")
    world.add_argument("--role-name", default=None, help="the only role name AssumeRole accepts")
    faults = parser.add_argument_group("faults")
    faults.add_argument("--latency", type=float, default=0.0, help="seconds per ListJobs")
    for name in ("500", "503", "reset", "hang", "truncated", "malformed", "gateway"):
        faults.add_argument(
            f"--p-{name}",
            type=_probability,
            default=0.0,
            help=f"probability of a {name} fault per ListJobs request",
        )
    faults.add_argument("--hang-seconds", type=float, default=30.0, help="hang length (30)")
    faults.add_argument("--throttle-rps", type=float, default=None, help="per account-region")
    faults.add_argument("--throttle-burst", type=int, default=None, help="token bucket size")
    faults.add_argument("--token-ttl", type=float, default=None, help="NextToken lifetime (s)")
    faults.add_argument("--credential-ttl", type=float, default=None, help="real lifetime (s)")
    faults.add_argument(
        "--advertised-credential-ttl", type=float, default=3600.0, help="Expiration (3600 s)"
    )
    faults.add_argument("--churn", type=_probability, default=0.0, help="list change odds")
    faults.add_argument("--churn-max", type=int, default=3, help="changes per list (3)")
    faults.add_argument("--deny-assume-role", type=_ids, default=frozenset(), metavar="ID,ID")
    faults.add_argument("--deny-list-jobs", type=_ids, default=frozenset(), metavar="ID,ID")
    faults.add_argument(
        "--disable-region",
        type=_account_region,
        action="append",
        default=[],
        metavar="ACCOUNT:REGION",
        help="an opt-in region the account has not enabled (repeatable)",
    )


def build(args: argparse.Namespace) -> Sandbox:
    """The sandbox that ``args`` describe (not started)."""
    disabled: dict[str, set[str]] = {}
    for account_id, region in args.disable_region:
        disabled.setdefault(account_id, set()).add(region)
    fleet = FleetSpec(
        accounts=args.accounts,
        seed=args.seed,
        regions=args.regions,
        partition=args.partition,
        external_id=args.external_id,
        suspended=args.suspended,
        max_jobs=args.max_jobs,
        role_name=args.role_name,
    )
    faults = Faults(
        p_500=args.p_500,
        p_503=args.p_503,
        p_reset=args.p_reset,
        p_hang=args.p_hang,
        hang_seconds=args.hang_seconds,
        p_truncated=args.p_truncated,
        p_malformed=args.p_malformed,
        p_gateway=args.p_gateway,
        throttle_rps=args.throttle_rps,
        throttle_burst=args.throttle_burst,
        latency=args.latency,
        token_ttl=args.token_ttl,
        credential_ttl=args.credential_ttl,
        advertised_credential_ttl=args.advertised_credential_ttl,
        churn=args.churn,
        churn_max=args.churn_max,
        deny_assume_role=args.deny_assume_role,
        deny_list_jobs=args.deny_list_jobs,
        disabled_regions={k: frozenset(v) for k, v in disabled.items()},
    )
    return Sandbox(fleet=fleet, faults=faults, host=args.host, port=args.port)


async def _serve(sandbox: Sandbox, ready: Callable[[Sandbox], None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with sandbox:
            ready(sandbox)
            await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _announce(sandbox: Sandbox) -> None:
    for name, value in sandbox.env().items():
        print(f"export {name}={shlex.quote(value)}")
    print(f"{READY_PREFIX}{sandbox.url}", flush=True)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code (2 for a bad option value)."""
    try:
        sandbox = build(args)
    except ValueError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(sandbox, _announce))
    except OSError as exc:
        print(f"sandbox: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aggregator.sandbox``: the same command without the main CLI."""
    parser = argparse.ArgumentParser(
        prog="python -m aggregator.sandbox", description="Serve the fake AWS endpoint."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
