"""The `snowball-aggregator` command's first moments: signals are held, not fatal.

Importing botocore and the rest takes about a second. A SIGTERM, SIGINT or SIGHUP in that time
would otherwise kill the process outright (a `systemctl reload` or a config reloader right after
a restart, a pod stopped as it starts) or print a KeyboardInterrupt traceback. They are held
here, before anything heavy is imported, and handed to the command: the daemon and `run` act on
them once their own handlers are in place (stop, reload, cancel); every other command gets the
handling it started with back, and the held signals again (cli.py `release_signals`).
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any

HELD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The handlers `main` replaced, by signal: those it holds. A signal that whoever started the
# process ignores (`nohup`, a shell's background job) is left ignored, and not held.
PREVIOUS: dict[int, Any] = {}


def main() -> int:
    """Entry point of the `snowball-aggregator` console script and `python -m aggregator`."""
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    for sig in HELD:
        previous = signal.getsignal(sig)
        if previous is signal.SIG_IGN:
            continue
        PREVIOUS[sig] = previous
        signal.signal(sig, hold)
    from .cli import main as cli_main

    return cli_main(held=held)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
