"""Daemon: cycles on an interval without overlap, health and metrics, signals and reload."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.health import HealthServer, HealthState
from aggregator.metrics import Metrics
from aggregator.service import run_forever

from .conftest import SandboxFactory, make_settings

REGIONS = {"names": ["us-east-1", "eu-west-1"]}


class Recorder:
    """A CycleObserver that records the order of cycle events."""

    def __init__(self, stop_after: int, stop: asyncio.Event) -> None:
        self.events: list[str] = []
        self.summaries: list[Any] = []
        self._stop_after = stop_after
        self._stop = stop

    def cycle_started(self, snapshot_id: str, partitions: int) -> None:
        self.events.append("start")

    def partition_done(self, result: Any) -> None:
        pass

    def cycle_finished(self, summary: Any, records: Sequence[Any]) -> None:
        self.events.append("finish")
        self.summaries.append(summary)
        if len(self.summaries) >= self._stop_after:
            self._stop.set()


class ReloadAfterFirst(Recorder):
    """A Recorder that asks for a reload once the first cycle finished, and hands failed
    cycles (`cycle_failed`) to `on_failure`."""

    def __init__(
        self,
        stop_after: int,
        stop: asyncio.Event,
        reload_requested: asyncio.Event,
        on_failure: Callable[[str], None] = lambda error: None,
    ) -> None:
        super().__init__(stop_after, stop)
        self._reload_requested = reload_requested
        self._on_failure = on_failure

    def cycle_finished(self, summary: Any, records: Sequence[Any]) -> None:
        super().cycle_finished(summary, records)
        if len(self.summaries) == 1:
            self._reload_requested.set()

    def cycle_failed(self, error: str) -> None:
        self._on_failure(error)


def complete_snapshots(output: Path) -> list[dict[str, Any]]:
    """Every manifest under `output`, each checked against its data file's sha256."""
    import hashlib

    manifests = []
    for path in sorted(output.glob("snapshots/date=*/*.manifest.json")):
        manifest = orjson.loads(path.read_bytes())
        data = output / manifest["data"]["path"]
        assert hashlib.sha256(data.read_bytes()).hexdigest() == manifest["data"]["sha256"]
        manifests.append(manifest)
    assert not [p for p in output.rglob("*") if p.name.endswith(".tmp")], "no torn files"
    return manifests


async def test_cycles_repeat_without_overlap(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    """Three cycles at a sub-second interval run one after the other and all land."""
    sb = await make_sandbox(accounts=3, seed=2)
    settings = make_settings(sb.account_ids, regions=REGIONS, daemon={"interval": 0.05})
    stop = asyncio.Event()
    recorder = Recorder(3, stop)
    last = await asyncio.wait_for(
        run_forever(settings, stop=stop, observers=[recorder], output=tmp_path), 60
    )
    assert recorder.events == ["start", "finish"] * 3
    manifests = complete_snapshots(tmp_path)
    assert len(manifests) == 3
    assert last is not None
    latest = (tmp_path / "LATEST").read_text().strip()
    assert latest.endswith(f"{last.snapshot_id}.manifest.json")


async def test_overrunning_cycles_are_skipped_and_counted(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """When a cycle takes longer than the interval, missed slots are skipped, not stacked."""
    from aggregator.sandbox import Faults

    sb = await make_sandbox(accounts=2, seed=2, faults=Faults(latency=0.05))
    settings = make_settings(sb.account_ids, regions=REGIONS, daemon={"interval": 0.01})
    stop = asyncio.Event()
    recorder = Recorder(2, stop)
    metrics = Metrics()
    await asyncio.wait_for(
        run_forever(settings, stop=stop, observers=[recorder, metrics], output=tmp_path), 60
    )
    assert recorder.events == ["start", "finish", "start", "finish"]
    skipped = metrics.registry.get_sample_value("snowball_aggregator_skipped_cycles_total")
    assert skipped is not None and skipped >= 1


async def test_healthz_follows_cycle_outcomes(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    """/healthz is 200 after a good cycle, 503 after a failed one, 200 after recovery."""
    from dataclasses import replace

    sb = await make_sandbox(accounts=2, seed=4)
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    now = [0.0]
    state = HealthState(interval=60.0, clock=lambda: now[0])
    metrics = Metrics()
    async with (
        HealthServer(state=state, metrics=metrics, listen="127.0.0.1:0") as http,
        aiohttp.ClientSession() as client,
    ):
        url = f"http://127.0.0.1:{http.port}/healthz"

        async def health() -> tuple[int, dict[str, Any]]:
            async with client.get(url) as response:
                return response.status, orjson.loads(await response.read())

        assert (await health())[0] == 200  # starting, within 2 x interval
        await run_forever(settings, burst=True, observers=[state, metrics], output=tmp_path)
        status, body = await health()
        assert status == 200 and body["last_cycle"]["status"] == "complete"

        sb.faults = replace(sb.faults, deny_assume_role=frozenset(sb.account_ids))
        await run_forever(settings, burst=True, observers=[state, metrics], output=tmp_path)
        status, body = await health()
        assert status == 503 and body["last_cycle"]["status"] == "failed"

        sb.faults = replace(sb.faults, deny_assume_role=frozenset())
        await run_forever(settings, burst=True, observers=[state, metrics], output=tmp_path)
        assert (await health())[0] == 200

        now[0] += 121.0  # no cycle for more than 2 x interval: stuck
        assert (await health())[0] == 503


async def test_metrics_job_counts_equal_truth(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    """Scraped /metrics, parsed by prometheus-client, count jobs by state like the truth."""
    sb = await make_sandbox(accounts=6, seed=8)
    settings = make_settings(sb.account_ids)
    metrics = Metrics()
    state = HealthState(interval=60.0)
    await run_forever(settings, burst=True, observers=[metrics, state], output=tmp_path)
    async with (
        HealthServer(state=state, metrics=metrics, listen="127.0.0.1:0") as http,
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{http.port}/metrics") as response,
    ):
        text = await response.text()
    by_state: dict[str, float] = {}
    requests = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "snowball_aggregator_jobs_by_state":
                by_state[sample.labels["state"]] = sample.value
            if sample.name == "snowball_aggregator_requests_total":
                requests += sample.value
    expected: dict[str, float] = {}
    for job in sb.truth():
        expected[str(job["job_state"])] = expected.get(str(job["job_state"]), 0) + 1
    assert by_state == expected
    assert requests == sum(sb.stats().requests.values())


# --- the real process ------------------------------------------------------------------------


def _write_config(path: Path, accounts: Sequence[str], output: Path, **extra: str) -> None:
    lines = [
        "[accounts]",
        f"ids = {orjson.dumps(list(accounts)).decode()}",
        "[regions]",
        'names = ["us-east-1", "eu-west-1", "ap-southeast-2"]',
        "[limits]",
        "requests_per_second = 1000.0",
        "[output]",
        f'directory = "{output}"',
        "[daemon]",
        f'interval = "{extra.get("interval", "1h")}"',
        'listen = "127.0.0.1:0"',
        f'shutdown_deadline = "{extra.get("deadline", "10s")}"',
        "[logging]",
        'format = "json"',
        f'level = "{extra.get("level", "info")}"',
    ]
    path.write_text("\n".join(lines) + "\n")


class Daemon:
    """A `snowball-aggregator daemon` subprocess whose JSON log lines we can wait for."""

    def __init__(self, config: Path, env: dict[str, str], ignored: Sequence[int] = ()) -> None:
        def ignore() -> None:  # as `nohup` or a shell's `trap '' INT` leave them
            for sig in ignored:
                signal.signal(sig, signal.SIG_IGN)

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aggregator", "daemon", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            preexec_fn=ignore if ignored else None,
        )
        self.lines: list[dict[str, Any]] = []

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def wait_for(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = self.proc.stderr.readline()
            if not raw:
                break
            line = orjson.loads(raw)
            self.lines.append(line)
            if line.get("event") == event:
                return line
        raise AssertionError(f"no {event!r} in {[x.get('event') for x in self.lines]}")


def _env(sb: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(sb.env())
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    return env


@pytest.mark.parametrize(
    ("latency", "deadline", "snapshots"),
    [(0.3, "10s", 1), (3.0, "0.5s", 0)],
    ids=["cycle-finishes-within-deadline", "cycle-cancelled-at-deadline"],
)
async def test_sigterm_mid_cycle_exits_zero_with_only_complete_snapshots(
    make_sandbox: SandboxFactory, tmp_path: Path, latency: float, deadline: str, snapshots: int
) -> None:
    """SIGTERM during a cycle: exit 0 within the deadline, only complete snapshots remain."""
    from aggregator.sandbox import Faults

    sb = await make_sandbox(accounts=4, seed=6, faults=Faults(latency=latency))
    config = tmp_path / "daemon.toml"
    output = tmp_path / "out"
    _write_config(config, sb.account_ids, output, deadline=deadline)
    daemon = Daemon(config, _env(sb))
    try:
        await asyncio.to_thread(daemon.wait_for, "cycle.started")
        daemon.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(daemon.proc.wait, 30)
        assert code == 0
    finally:
        daemon.close()
    assert len(complete_snapshots(output)) == snapshots


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (Linux: SigCgt in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (sig - 1) & 1)


def _wait_until_catching(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Wait until the child holds `sig` (launch.py, before its heavy imports)."""
    deadline = time.monotonic() + 30
    while not _catches(proc.pid, sig):
        assert proc.poll() is None and time.monotonic() < deadline, "the child never started"
        time.sleep(0.002)


async def test_a_signal_while_the_daemon_starts_is_held_not_fatal(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """A SIGHUP in the second the daemon spends importing (a reload right after a restart) is
    acted on once it runs, not its death; a SIGTERM then stops it cleanly."""
    sb = await make_sandbox(accounts=2, seed=9)
    config = tmp_path / "daemon.toml"
    _write_config(config, sb.account_ids, tmp_path / "out", interval="1h")
    daemon = Daemon(config, _env(sb))
    try:
        await asyncio.to_thread(_wait_until_catching, daemon.proc, signal.SIGHUP)
        daemon.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(daemon.wait_for, "daemon.started")
        await asyncio.to_thread(daemon.wait_for, "config.reloaded")
        assert daemon.proc.poll() is None
        daemon.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.proc.wait, 30) == 0
    finally:
        daemon.close()


def test_a_signal_its_parent_ignores_stays_ignored(tmp_path: Path) -> None:
    """Under `nohup` (SIGHUP ignored), holding signals at start does not make SIGHUP fatal:
    the command keeps the handling it was started with (here the sandbox, then SIGTERM)."""

    def ignore_hangups() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc = subprocess.Popen(
        [sys.executable, "-m", "aggregator", "sandbox", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        preexec_fn=ignore_hangups,
    )
    try:
        assert proc.stdout is not None
        while not proc.stdout.readline().startswith(b"# sandbox listening on "):
            assert proc.poll() is None, "the sandbox did not start"
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # a SIGHUP that killed it would be -1
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


async def test_a_daemon_leaves_the_signals_its_parent_ignores_ignored(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Started with SIGINT and SIGHUP ignored (a background job, `nohup`), the daemon does not
    take them over: a Ctrl-C meant for the parent's terminal neither stops it nor, for SIGHUP,
    reloads it. SIGTERM still stops it."""
    sb = await make_sandbox(accounts=2, seed=9)
    config = tmp_path / "daemon.toml"
    _write_config(config, sb.account_ids, tmp_path / "out", interval="1h")
    daemon = Daemon(config, _env(sb), ignored=(signal.SIGINT, signal.SIGHUP))
    try:
        await asyncio.to_thread(daemon.wait_for, "run.finished")
        for sig in (signal.SIGINT, signal.SIGHUP):
            assert not _catches(daemon.proc.pid, sig)
            daemon.proc.send_signal(sig)
        assert _catches(daemon.proc.pid, signal.SIGTERM)
        daemon.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.proc.wait, 30) == 0
        stopped = await asyncio.to_thread(daemon.wait_for, "daemon.stopped")
        assert stopped["event"] == "daemon.stopped"
        assert "config.reloaded" not in [line.get("event") for line in daemon.lines]
    finally:
        daemon.close()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_a_second_signal_as_the_daemon_exits_does_not_kill_it(
    make_sandbox: SandboxFactory, tmp_path: Path, second: int
) -> None:
    """A supervisor that sends more signals as the daemon is already exiting (`daemon.stopped`
    logged): exit code 0. The loop's handlers went with the loop and the defaults killed the
    process (exit status -15 or -2)."""
    sb = await make_sandbox(accounts=2, seed=9)
    config = tmp_path / "daemon.toml"
    _write_config(config, sb.account_ids, tmp_path / "out", interval="1h")
    daemon = Daemon(config, _env(sb))
    try:
        await asyncio.to_thread(daemon.wait_for, "run.finished")
        daemon.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait_for, "daemon.stopped")

        def again_and_again_until_it_exits() -> int:
            # (every 2 ms: the exit takes about 0.1 s; bounded, as the process must end)
            for _ in range(5_000):
                code = daemon.proc.poll()
                if code is not None:
                    return code
                with contextlib.suppress(ProcessLookupError):
                    daemon.proc.send_signal(second)
                time.sleep(0.002)
            raise AssertionError("the daemon did not exit")

        assert await asyncio.to_thread(again_and_again_until_it_exits) == 0
    finally:
        daemon.close()


async def test_a_sigterm_once_the_run_has_published_lets_it_end_as_it_ended(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """`run` signalled once its snapshot is LATEST (`run.finished` logged, the clients still
    closing): its own exit code and summary line, as the README says. It ended "terminated",
    exit code 143, the summary lost, though the snapshot was published."""
    sb = await make_sandbox(accounts=2, seed=9)
    config = tmp_path / "run.toml"
    output = tmp_path / "out"
    _write_config(config, sb.account_ids, output)
    command = [sys.executable, "-m", "aggregator", "run", "--config", str(config)]

    def signalled_once_published() -> tuple[int, bytes]:
        with subprocess.Popen(
            command, env=_env(sb), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as proc:
            assert proc.stderr is not None
            for raw in proc.stderr:
                if orjson.loads(raw).get("event") == "run.finished":
                    proc.send_signal(signal.SIGTERM)
                    break
            out, _ = proc.communicate(timeout=30)
            return proc.returncode, out

    code, out = await asyncio.to_thread(signalled_once_published)
    assert code == 0, out
    assert out.decode().startswith("complete: "), out
    assert len(complete_snapshots(output)) == 1


@pytest.mark.parametrize("when", ["starting", "fetching"])
async def test_sigterm_cancels_a_one_shot_run_cleanly(
    make_sandbox: SandboxFactory, tmp_path: Path, when: str
) -> None:
    """`run` stopped by SIGTERM (a CronJob's pod deleted), while it starts or mid-fetch, is
    cancelled like Ctrl-C: one line, exit code 143, the previous snapshot still LATEST and
    no temporary file left behind."""
    from aggregator.sandbox import Faults

    sb = await make_sandbox(accounts=2, seed=9)
    config = tmp_path / "run.toml"
    output = tmp_path / "out"
    _write_config(config, sb.account_ids, output)
    command = [sys.executable, "-m", "aggregator", "run", "--config", str(config), "--quiet"]
    env = _env(sb)
    first = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True)
    assert first.returncode == 0, first.stderr
    latest = (output / "LATEST").read_bytes()
    sb.faults = Faults(latency=2.0)
    asked = sb.stats().requests.get("snowball:ListJobs", 0)

    def list_jobs_requests() -> int:
        with urllib.request.urlopen(f"{sb.url}/_sandbox/stats", timeout=5) as answer:
            return int(orjson.loads(answer.read())["requests"].get("snowball:ListJobs", 0))

    def terminated() -> tuple[int, bytes]:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        if when == "starting":
            _wait_until_catching(proc, signal.SIGTERM)
        else:  # once its first ListJobs has reached the sandbox (answers take 2 s)
            while list_jobs_requests() == asked:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        return proc.returncode, err

    code, err = await asyncio.to_thread(terminated)
    assert code == 143, err
    assert err.decode().strip().splitlines()[-1] == "terminated"
    assert (output / "LATEST").read_bytes() == latest
    assert not [p for p in output.rglob("*") if p.name.endswith(".tmp")]
    assert len(complete_snapshots(output)) == 1


async def test_sighup_reloads_valid_config_and_keeps_old_on_invalid(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """SIGHUP with a valid file applies it; with a broken one logs one line and keeps going."""
    sb = await make_sandbox(accounts=2, seed=9)
    config = tmp_path / "daemon.toml"
    output = tmp_path / "out"
    _write_config(config, sb.account_ids, output, interval="1h")
    daemon = Daemon(config, _env(sb))
    try:
        await asyncio.to_thread(daemon.wait_for, "cycle.started")
        await asyncio.to_thread(daemon.wait_for, "run.finished")
        _write_config(config, sb.account_ids[:1], output, interval="1h")
        daemon.proc.send_signal(signal.SIGHUP)
        reloaded = await asyncio.to_thread(daemon.wait_for, "config.reloaded")
        assert reloaded["source"] == str(config)
        # the new settings run a fresh cycle only at the next slot; break the file now
        config.write_text("[limits]\nmax_concurrency = 0\n")
        daemon.proc.send_signal(signal.SIGHUP)
        failed = await asyncio.to_thread(daemon.wait_for, "config.reload_failed")
        assert failed["error"].startswith(f"{config}: limits.max_concurrency: ")
        assert "\n" not in failed["error"]
        assert daemon.proc.poll() is None, "the daemon survives a bad reload"
        daemon.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.proc.wait, 30) == 0
    finally:
        daemon.close()


async def _reload_refused(good: Any, bad: Any) -> dict[str, Any]:
    """Three cycles of `good`, asked after the first to reload to `bad`: the reload must be
    refused (logged once as `config.reload_failed`, returned) and the cycles go on."""
    from structlog.testing import capture_logs

    stop, reload_requested = asyncio.Event(), asyncio.Event()
    recorder = ReloadAfterFirst(3, stop, reload_requested)
    with capture_logs() as logs:
        await asyncio.wait_for(
            run_forever(
                good,
                stop=stop,
                reload=lambda: bad,
                reload_requested=reload_requested,
                observers=[recorder],
            ),
            60,
        )
    assert recorder.events == ["start", "finish"] * 3
    failed = [e for e in logs if e["event"] == "config.reload_failed"]
    assert len(failed) == 1
    return failed[0]


async def test_a_reload_the_aggregator_cannot_open_with_keeps_the_old_settings(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Settings that parse but do not open (an S3 output whose profile does not exist) are a
    failed reload, logged as one line: the daemon goes on with the settings it had."""

    sb = await make_sandbox(accounts=2, seed=3)
    out = tmp_path / "out"
    good = make_settings(
        sb.account_ids, regions=REGIONS, daemon={"interval": 0.05}, output={"directory": str(out)}
    )
    bad = make_settings(
        sb.account_ids,
        regions=REGIONS,
        daemon={"interval": 0.05},
        output={"directory": "s3://snapshots-bucket/prefix"},
        partitions={"aws": {"profile": "no-such-profile"}},
    )
    failed = await _reload_refused(good, bad)
    assert "no-such-profile" in failed["error"]
    assert len(complete_snapshots(out)) == 3


def test_a_daemon_started_with_an_output_it_cannot_write_exits_2(tmp_path: Path) -> None:
    """A wrong output location (here a file) stops the daemon at once, exit 2, with one line
    that names the file and the key, instead of serving 503s and failing every cycle."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = tmp_path / "daemon.toml"
    _write_config(config, ["111111111111"], blocker / "out")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SNOWBALL_"))}
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    done = subprocess.run(
        [sys.executable, "-m", "aggregator", "daemon", "--config", str(config)],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.decode().strip().splitlines()[-1]
    assert last.startswith(f"error: {config}: output.directory: {blocker / 'out'}: cannot write")
    assert b"cycle.started" not in done.stderr


async def test_a_reload_to_an_output_it_cannot_write_keeps_the_old_settings(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """A reload whose output location cannot be written is refused like a broken file: one
    line naming the key, and the cycles go on into the old location."""

    sb = await make_sandbox(accounts=2, seed=3)
    out, blocker = tmp_path / "out", tmp_path / "a-file"
    blocker.write_text("not a directory")
    daemon = {"interval": 0.05}
    good = make_settings(
        sb.account_ids, regions=REGIONS, daemon=daemon, output={"directory": str(out)}
    )
    bad = make_settings(
        sb.account_ids, regions=REGIONS, daemon=daemon, output={"directory": str(blocker)}
    )
    failed = await _reload_refused(good, bad)
    assert failed["error"].startswith(f"<test>: output.directory: {blocker}: cannot write")
    assert len(complete_snapshots(out)) == 3


def _unavailable(kind: str) -> Exception:
    """An output failure a later attempt may not see: S3 unreachable, or the disk full."""
    from aggregator.errors import OutputError

    if kind == "s3-unreachable":
        return OutputError("s3://b/p: cannot write: endpoint unreachable", transient=True)
    error = OutputError("out: cannot write to the output directory: No space left on device")
    error.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    return error


@pytest.mark.parametrize("kind", ["s3-unreachable", "disk-full"])
async def test_an_output_unavailable_for_now_at_start_is_a_warning(
    make_sandbox: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """An output location that fails for now as the daemon starts (S3 unreachable, the disk
    full) does not stop it: a warning, and the cycles try again. A check that passes stands
    for the first cycle's own (no second probe of the location)."""
    from structlog.testing import capture_logs

    from aggregator import service

    sb = await make_sandbox(accounts=2, seed=3)
    settings = make_settings(sb.account_ids, regions=REGIONS, daemon={"interval": 0.05})
    checked = service.Aggregator.check_output
    checks: list[int] = []
    failing = [_unavailable(kind)]

    async def unavailable_once(self: Any) -> None:
        checks.append(1)
        if failing:
            raise failing.pop()
        await checked(self)

    monkeypatch.setattr(service.Aggregator, "check_output", unavailable_once)

    async def two_cycles() -> None:
        stop = asyncio.Event()
        recorder = Recorder(2, stop)
        await asyncio.wait_for(
            run_forever(settings, stop=stop, observers=[recorder], output=tmp_path), 60
        )
        assert recorder.events == ["start", "finish"] * 2

    with capture_logs() as logs:
        await two_cycles()
    warned = [e["error"] for e in logs if e["event"] == "output.unavailable"]
    assert len(warned) == 1 and warned[0].endswith(("endpoint unreachable", "left on device"))
    assert len(checks) == 3  # at the start, then first thing in each cycle
    checks.clear()
    await two_cycles()
    assert len(checks) == 2  # the start's check stood for the first cycle's


async def test_a_stop_while_the_output_is_checked_ends_the_daemon_at_once(
    make_sandbox: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the start's output check hangs (S3 behind a dead endpoint) stops the
    daemon at once: the check is cancelled and the aggregator closed, no cycle runs."""
    from aggregator import service

    sb = await make_sandbox(accounts=2, seed=3)
    settings = make_settings(sb.account_ids, regions=REGIONS, daemon={"interval": 0.05})
    stop, never = asyncio.Event(), asyncio.Event()
    opened: list[Any] = []

    async def hangs(self: Any) -> None:
        opened.append(self)
        stop.set()
        await never.wait()

    monkeypatch.setattr(service.Aggregator, "check_output", hangs)
    recorder = Recorder(1, stop)
    result = await asyncio.wait_for(
        run_forever(settings, stop=stop, observers=[recorder], output=tmp_path), 30
    )
    assert result is None and recorder.events == []
    assert len(opened) == 1 and opened[0]._store is None  # closed


class ReloadAfterEach(Recorder):
    """A Recorder that asks for a reload after each of its cycles but the last."""

    def __init__(self, stop_after: int, stop: asyncio.Event, reload: asyncio.Event) -> None:
        super().__init__(stop_after, stop)
        self._reload = reload

    def cycle_finished(self, summary: Any, records: Sequence[Any]) -> None:
        super().cycle_finished(summary, records)
        if len(self.summaries) < self._stop_after:
            self._reload.set()


async def test_a_reload_is_tried_while_the_old_settings_keep_running(
    make_sandbox: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reloaded settings are opened (and their output checked) before they replace the old
    ones: settings that fail to open are refused at once, the running Aggregator is neither
    closed nor reopened, nothing of them is adopted (logging included) and no cycle fails; a
    fixed file after that is adopted, then used by the next cycle."""
    from structlog.testing import capture_logs

    from aggregator import service

    sb = await make_sandbox(accounts=2, seed=3)
    daemon = {"interval": 0.05}
    good = make_settings(sb.account_ids, regions=REGIONS, daemon=daemon)
    broken = make_settings(sb.account_ids[:1], regions=REGIONS, daemon=daemon)
    fixed = make_settings(sb.account_ids[1:], regions=REGIONS, daemon=daemon)
    names = {id(good): "good", id(broken): "broken", id(fixed): "fixed"}
    real_open, real_close = service.Aggregator.__aenter__, service.Aggregator.__aexit__
    events: list[str] = []

    async def flaky(self: Any) -> Any:
        events.append(f"open {names[id(self.settings)]}")
        if self.settings is broken:
            raise OSError("output unreachable")
        return await real_open(self)

    async def closing(self: Any, *exc_info: Any) -> Any:
        events.append(f"close {names[id(self.settings)]}")
        return await real_close(self, *exc_info)

    monkeypatch.setattr(service.Aggregator, "__aenter__", flaky)
    monkeypatch.setattr(service.Aggregator, "__aexit__", closing)
    stop, reload_requested = asyncio.Event(), asyncio.Event()
    reloads = iter([broken, fixed])
    adopted: list[Any] = []
    failures: list[str] = []

    class Cycles(ReloadAfterEach):
        def cycle_started(self, snapshot_id: str, partitions: int) -> None:
            super().cycle_started(snapshot_id, partitions)
            events.append("cycle")

        def cycle_failed(self, error: str) -> None:
            failures.append(error)

    recorder = Cycles(3, stop, reload_requested)
    with capture_logs() as logs:
        await asyncio.wait_for(
            run_forever(
                good,
                stop=stop,
                reload=lambda: next(reloads),
                reload_requested=reload_requested,
                adopted=adopted.append,
                observers=[recorder],
                output=tmp_path,
            ),
            60,
        )
    assert events == [
        "open good",
        "cycle",
        "open broken",  # (raised as it opened: nothing to close)
        "cycle",
        "open fixed",
        "close good",
        "cycle",
        "close fixed",
    ]
    assert failures == [] and adopted == [fixed]
    assert [s.accounts for s in recorder.summaries] == [2, 2, 1]
    reload_events = [e["event"] for e in logs if e["event"].startswith("config.")]
    assert reload_events == ["config.reload_failed", "config.reloaded"]


async def test_a_reload_to_a_shorter_interval_brings_the_next_cycle_forward(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Idle with an hour to go, a reload to a 50 ms interval makes the next cycle due 50 ms
    after the last one started, that is at once, rather than an hour later while the health
    windows already use the short interval (/healthz and /livez would turn 503 on a healthy
    daemon, and its liveness probe restart it)."""
    sb = await make_sandbox(accounts=2, seed=3)
    hourly = make_settings(sb.account_ids, regions=REGIONS, daemon={"interval": "1h"})
    fast = make_settings(sb.account_ids, regions=REGIONS, daemon={"interval": 0.05})
    stop, reload_requested = asyncio.Event(), asyncio.Event()
    state = HealthState(interval=3600.0, partition_deadline=600.0)
    recorder = ReloadAfterFirst(2, stop, reload_requested)
    await asyncio.wait_for(
        run_forever(
            hourly,
            stop=stop,
            reload=lambda: fast,
            reload_requested=reload_requested,
            observers=[recorder, state],
            output=tmp_path,
        ),
        60,
    )
    assert recorder.events == ["start", "finish"] * 2
    assert state.interval == 0.05


async def test_reloads_long_after_the_last_cycle_run_the_next_one_at_once(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Weekly, idle for three days, then reloaded to an hourly interval and, while that one was
    being opened, to a two-hourly one: the next cycle is due two hours after the last one
    started, that is at once (it was counted from the first reload's slot, an hour ahead), and
    /livez stays alive through both adoptions though the last cycle is days old."""
    import time

    sb = await make_sandbox(accounts=2, seed=3)
    idle = [0.0]

    def clock() -> float:
        return time.monotonic() + idle[0]

    def every(seconds: float) -> Any:
        return make_settings(
            sb.account_ids, regions=REGIONS, daemon={"interval": seconds, "jitter": 0.0}
        )

    weekly, hourly, two_hourly = every(7 * 86400.0), every(3600.0), every(7200.0)
    reloads = iter([hourly, two_hourly])
    stop, reload_requested = asyncio.Event(), asyncio.Event()
    state = HealthState(interval=7 * 86400.0, partition_deadline=600.0, clock=clock)
    alive: list[bool] = []

    def reload() -> Any:
        idle[0] = 3 * 86400.0  # the SIGHUP comes three days after the first cycle
        return next(reloads)

    def adopted(settings: Any) -> None:
        alive.append(state.liveness()[0])
        if settings is hourly:
            reload_requested.set()  # the second SIGHUP, while the first one was opened

    recorder = ReloadAfterFirst(2, stop, reload_requested)
    await asyncio.wait_for(
        run_forever(
            weekly,
            stop=stop,
            reload=reload,
            reload_requested=reload_requested,
            adopted=adopted,
            observers=[recorder, state],
            clock=clock,
            output=tmp_path,
        ),
        60,
    )
    assert recorder.events == ["start", "finish"] * 2
    assert alive == [True, True] and state.interval == 7200.0


async def test_a_second_stop_cancels_the_running_cycle_at_once(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Stopped once, a cycle may finish within `shutdown_deadline` (here an hour); stopped again
    (a second SIGTERM or Ctrl-C), it is cancelled at once and nothing is published."""
    from structlog.testing import capture_logs

    from aggregator.sandbox import Faults

    sb = await make_sandbox(accounts=2, seed=3)
    sb.faults = Faults(latency=5.0)
    settings = make_settings(sb.account_ids, regions=REGIONS, daemon={"shutdown_deadline": "1h"})
    stop, hurry = asyncio.Event(), asyncio.Event()
    started = asyncio.Event()

    class Started(Recorder):
        def cycle_started(self, snapshot_id: str, partitions: int) -> None:
            super().cycle_started(snapshot_id, partitions)
            started.set()

    async def stop_twice() -> None:
        await started.wait()
        stop.set()
        await asyncio.sleep(0)
        hurry.set()

    with capture_logs() as logs:
        stopper = asyncio.create_task(stop_twice())
        last = await asyncio.wait_for(
            run_forever(
                settings, stop=stop, hurry=hurry, observers=[Started(1, stop)], output=tmp_path
            ),
            30,
        )
        await stopper
    assert last is None
    cancelled = [e for e in logs if e["event"] == "cycle.cancelled"]
    assert [e["reason"] for e in cancelled] == ["stopped again"]
    assert complete_snapshots(tmp_path) == []


async def test_garbage_cycles_are_collected_between_daemon_cycles(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """A cycle runs with the heap frozen (gcpolicy.py); the daemon collects between cycles,
    so a reference cycle dropped during a cycle is freed even with automatic GC off."""
    import gc
    import weakref

    class Node:
        pass

    refs: list[weakref.ref[Node]] = []

    class Dropper(Recorder):
        def cycle_finished(self, summary: Any, records: Sequence[Any]) -> None:
            node = Node()
            node.self = node  # type: ignore[attr-defined]
            refs.append(weakref.ref(node))
            super().cycle_finished(summary, records)

    sb = await make_sandbox(accounts=1, seed=2)
    settings = make_settings(sb.account_ids, regions=REGIONS, daemon={"interval": 0.05})
    stop = asyncio.Event()
    enabled = gc.isenabled()
    gc.disable()
    try:
        await asyncio.wait_for(
            run_forever(settings, stop=stop, observers=[Dropper(1, stop)], output=tmp_path), 60
        )
        assert len(refs) == 1
        assert refs[0]() is None
    finally:
        if enabled:
            gc.enable()
