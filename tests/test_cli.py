"""The command line: demo, exit codes, and a run configured only by AWS_ENDPOINT_URL_* against
a separately started `snowball-aggregator sandbox` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from aggregator.cli import main
from aggregator.config import load_settings
from aggregator.errors import ConfigError

from .conftest import SandboxFactory


def config_file(tmp_path: Path, accounts: Any, regions: list[str], output: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(
        f"[accounts]\nids = {orjson.dumps(list(accounts)).decode()}\n"
        f"[regions]\nnames = {orjson.dumps(regions).decode()}\n"
        "[limits]\nrequests_per_second = 1000.0\ntimeout_seconds = 5\n"
        f'[output]\ndirectory = "{output}"\n'
        '[logging]\nformat = "json"\nlevel = "warning"\n'
    )
    return path


def test_demo_prints_summary_and_snapshot_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`demo` serves the sandbox, runs once, and says where the snapshot is."""
    code = main(["demo", "--output", str(tmp_path), "--accounts", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    snapshot = next(line for line in out.splitlines() if line.strip().startswith("snapshot"))
    path = Path(snapshot.split()[-1])
    assert path.is_file() and path.is_relative_to(tmp_path)
    jobs_line = next(line for line in out.splitlines() if line.strip().startswith("jobs"))
    jobs, truth = jobs_line.split()[1], jobs_line.split()[-1].rstrip(")")
    assert jobs == truth
    assert len(path.read_bytes().split(b"\n")) - 1 == int(jobs)


async def test_exit_codes_complete_partial_and_output_error(
    make_sandbox: SandboxFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """0 when every partition succeeds, 1 when one fails, 2 when the output is unwritable
    (one line that names where the location was given: the flag, or the file and key, or the
    variable)."""
    import asyncio

    sb = await make_sandbox(accounts=3, seed=12)
    cfg = config_file(tmp_path, sb.account_ids, ["eu-west-1"], tmp_path / "out")

    def run(*extra: str) -> int:
        return main(["run", "--config", str(cfg), "--json", *extra])

    assert await asyncio.to_thread(run) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["status"] == "complete"

    sb.faults = replace(sb.faults, deny_list_jobs=frozenset({sb.account_ids[0]}))
    assert await asyncio.to_thread(run) == 1
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["status"] == "partial"
    assert [f["account_id"] for f in summary["failed_partitions"]] == [sb.account_ids[0]]
    assert summary["failed_partitions"][0]["error_code"] == "AccessDeniedException"

    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    assert await asyncio.to_thread(run, "--output", str(blocker / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err
    assert err.startswith(f"error: --output: {blocker / 'out'}: "), err
    # The same location in the file names the file and the key; in a variable, the variable.
    assert config_file(tmp_path, sb.account_ids, ["eu-west-1"], blocker / "out") == cfg
    assert await asyncio.to_thread(run) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cfg}: output.directory: {blocker / 'out'}: cannot write"), err
    variable = "SNOWBALL_AGGREGATOR_OUTPUT__DIRECTORY"
    monkeypatch.setenv(variable, str(blocker / "env"))
    assert await asyncio.to_thread(run) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {variable} (environment): output.directory: "), err
    assert err.count("\n") == 1


def test_standalone_sandbox_and_service_specific_endpoint_variables(tmp_path: Path) -> None:
    """A run pointed at a `sandbox` process only through AWS_ENDPOINT_URL_STS/_SNOWBALL works
    and matches the sandbox's truth."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aggregator",
            "sandbox",
            "--port",
            "0",
            "--accounts",
            "3",
            "--seed",
            "21",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        exported: dict[str, str] = {}
        url = ""
        for line in server.stdout:
            if line.startswith("export "):
                name, _, value = line[len("export ") :].strip().partition("=")
                exported[name] = value.strip("'\"")
            if line.startswith("# sandbox listening on "):
                url = line.split()[-1]
                break
        assert url.startswith("http://127.0.0.1:")
        run_env = {**env, **exported}
        del run_env["AWS_ENDPOINT_URL"]  # only the service-specific variables remain
        run_env["AWS_ENDPOINT_URL_STS"] = url
        run_env["AWS_ENDPOINT_URL_SNOWBALL"] = url
        run_env["AWS_CONFIG_FILE"] = run_env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        import urllib.request

        with urllib.request.urlopen(f"{url}/_sandbox/truth", timeout=30) as response:
            truth = [orjson.loads(x) for x in response.read().split(b"\n") if x.strip()]
        accounts = sorted({str(job["account_id"]) for job in truth})
        cfg = config_file(tmp_path, accounts, ["us-east-1", "eu-west-1"], tmp_path / "out")
        proc = subprocess.run(
            [sys.executable, "-m", "aggregator", "run", "--config", str(cfg), "--json"],
            capture_output=True,
            text=True,
            env=run_env,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        summary = orjson.loads(proc.stdout)
        records = [
            orjson.loads(x) for x in Path(summary["data"]).read_bytes().split(b"\n") if x.strip()
        ]
        wanted = [j["job_id"] for j in truth if {"us-east-1", "eu-west-1"} & set(j["regions"])]
        assert [r["job_id"] for r in records] == wanted
    finally:
        server.terminate()
        server.wait(30)
        for stream in (server.stdout, server.stderr):
            if stream is not None:
                stream.close()


def _on_a_pty(argv: list[str], stdout: Any = None, columns: int = 80) -> tuple[int, str]:
    """Run the command with stdin and stderr on a pseudo-terminal (stdout too unless given):
    its exit code and what the terminal showed."""
    import pty

    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aggregator", *argv],
        stdin=secondary,
        stdout=secondary if stdout is None else stdout,
        stderr=secondary,
        env={**os.environ, "COLUMNS": str(columns), "TERM": "xterm"},
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    return proc.wait(60), b"".join(chunks).decode("utf-8", "replace")


async def test_tty_run_draws_progress_and_summary_table(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """On a terminal `run` shows the rich progress bar and ends with the summary table."""
    import asyncio

    sb = await make_sandbox(accounts=3, seed=13)
    cfg = config_file(tmp_path, sb.account_ids, ["eu-west-1", "us-east-1"], tmp_path / "out")
    cfg.write_text(cfg.read_text().replace('format = "json"', 'format = "auto"'))

    argv = ["run", "--config", str(cfg)]
    code, screen = await asyncio.to_thread(_on_a_pty, argv, columns=80)
    assert code == 0, screen
    assert "partitions" in screen and "snapshot" in screen and "complete" in screen
    assert "duplicates removed" in screen  # the summary table
    # The data path whole on one line, however narrow the terminal (a table cell folded it)
    (data,) = (tmp_path / "out" / "snapshots").glob("date=*/*.jsonl")
    assert f"snapshot {data}\r\n" in screen or f"snapshot {data}\n" in screen, screen
    assert "throttles " in screen and "retries " in screen  # only the progress bar says so


BAD_S3 = "s3://Bad_Bucket/x"


@pytest.mark.parametrize(
    "command",
    [
        ["run", "--config", "{cfg}"],
        ["diff", "latest", "latest"],
        ["merge", "--config", "{cfg}", "--run-id", "r1", "--shards", "2"],
        ["demo"],
    ],
)
def test_malformed_s3_output_flag_is_one_line_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """A malformed `--output s3://...` exits 2 with the same one line as a bad
    `output.directory`, naming `--output` instead of the file."""
    cfg = config_file(tmp_path, ["111111111111"], ["eu-west-1"], tmp_path / "out")
    argv = [arg.format(cfg=cfg) for arg in command]
    assert main([*argv, "--output", BAD_S3]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "out"), BAD_S3))
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    assert info.value.key == "output.directory"
    assert err == f"error: --output: {info.value.problem}\n"


@pytest.mark.parametrize(
    "command",
    [
        ["run", "--config", "{cfg}"],
        ["diff", "latest", "latest"],
        ["merge", "--config", "{cfg}", "--run-id", "r1", "--shards", "2"],
    ],
)
def test_an_s3_output_flag_with_an_endpoint_botocore_refuses_is_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    """`--output s3://...` makes the run call S3, so its endpoint URL is checked as the
    configured ones are: a traceback ("Invalid endpoint", exit 1) before; one line naming the
    variable, exit 2, now."""
    cfg = config_file(tmp_path, ["111111111111"], ["eu-west-1"], tmp_path / "out")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "not-a-url")
    argv = [arg.format(cfg=cfg) for arg in command]
    assert main([*argv, "--output", "s3://inventory/x"]) == 2
    err = capsys.readouterr().err
    expected = "AWS_ENDPOINT_URL_S3 (environment): not an endpoint URL"
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1, err


def test_diff_without_config_and_a_broken_aws_config_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`diff --output s3://...` without `--config` checks the S3 endpoint from the default
    profile; a profile that is not there is one line, exit 2, not a traceback."""
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = eu-west-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "absent")
    assert main(["diff", "latest", "latest", "--output", "s3://inventory/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "(absent) could not be found" in err, err
    assert err.count("\n") == 1


def test_malformed_s3_output_flag_never_prints_a_traceback(tmp_path: Path) -> None:
    """The real console entry point exits 2 with one line for a bad `--output`."""
    cfg = config_file(tmp_path, ["111111111111"], ["eu-west-1"], tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "aggregator", "run", "--config", str(cfg), "--output", BAD_S3],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --output: 'Bad_Bucket' in 's3://Bad_Bucket/x'")
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("via", ["file", "environment"])
def test_daemon_listen_address_in_use_is_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    via: str,
) -> None:
    """A `daemon.listen` address that cannot be bound exits 2 with one line naming where the
    address came from, the key and the OS reason."""
    cfg = config_file(tmp_path, ["111111111111"], ["eu-west-1"], tmp_path / "out")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        address = f"127.0.0.1:{blocker.getsockname()[1]}"
        if via == "file":
            cfg.write_text(cfg.read_text() + f'[daemon]\nlisten = "{address}"\n')
            source = str(cfg)
        else:
            monkeypatch.setenv("SNOWBALL_AGGREGATOR_DAEMON__LISTEN", address)
            source = "SNOWBALL_AGGREGATOR_DAEMON__LISTEN (environment)"
        assert main(["daemon", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {source}: daemon.listen: cannot listen on {address!r}: "), err
    assert "address already in use" in err.lower(), err


def test_a_reload_applies_the_new_logging_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGHUP's reload, once adopted, applies `[logging]` at once: after reloading a config
    that says `level = "warning"`, info events are dropped and warnings are written as JSON."""
    from aggregator import cli

    config = tmp_path / "c.toml"
    config.write_text(
        '[accounts]\nids = ["111111111111"]\n[logging]\nlevel = "warning"\nformat = "json"\n'
    )
    settings = cli.load_settings(str(config))
    cli._adopt_logging(settings)
    assert settings.logging.level == "warning"
    log = structlog.get_logger()
    log.info("reload.test_info")
    log.warning("reload.test_warning")
    lines = capsys.readouterr().err.splitlines()
    assert [orjson.loads(line)["event"] for line in lines] == ["reload.test_warning"]


async def test_on_a_terminal_quiet_and_redirected_runs_print_the_summary_line(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """`--quiet` on a terminal prints the summary line and no info logs (it printed one per
    partition); with stdout redirected to a file, the file gets that line, not the table
    (whose frame wrapped the data path in two)."""
    import asyncio

    sb = await make_sandbox(accounts=3, seed=13)
    cfg = config_file(tmp_path, sb.account_ids, ["eu-west-1", "us-east-1"], tmp_path / "out")
    text = cfg.read_text().replace('format = "json"', 'format = "auto"')
    cfg.write_text(text.replace('level = "warning"', 'level = "info"'))

    code, screen = await asyncio.to_thread(_on_a_pty, ["run", "--config", str(cfg), "--quiet"])
    assert code == 0, screen
    lines = [line for line in screen.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("complete: "), screen

    summary = tmp_path / "summary.txt"
    with summary.open("w") as out:
        code, screen = await asyncio.to_thread(_on_a_pty, ["run", "--config", str(cfg)], out)
    assert code == 0, screen
    assert "throttles " in screen  # the progress bar, on the terminal
    (line,) = summary.read_text().splitlines()
    assert line.startswith("complete: ")
    data = Path(line.split("snapshot ")[-1])
    assert data.name.endswith(".jsonl") and data.parent.parent.parent == tmp_path / "out"


async def test_a_stdout_that_fails_ends_quietly_or_in_one_line(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """A reader that went away (`| head`) ends the output quietly with the run's own exit
    code; a full disk or a closed stdout is one error line, exit 2. They were tracebacks, and
    exit 1 ("partial") for a complete run."""
    import asyncio

    sb = await make_sandbox(accounts=2, seed=13)
    cfg = config_file(tmp_path, sb.account_ids, ["eu-west-1"], tmp_path / "out")

    def run(argv: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "aggregator", *argv]
        if options.get("stdout") == "full":
            with open("/dev/full", "w") as full:  # every write fails: ENOSPC
                options["stdout"] = full
                return run(argv, **options)
        return subprocess.run(command, stderr=subprocess.PIPE, text=True, timeout=120, **options)

    read, write = os.pipe()
    os.close(read)
    try:
        gone = await asyncio.to_thread(run, ["run", "--config", str(cfg), "--quiet"], stdout=write)
    finally:
        os.close(write)
    assert gone.returncode == 0 and gone.stderr == "", gone.stderr

    json_run = await asyncio.to_thread(run, ["run", "--config", str(cfg), "--json"], stdout="full")
    valid = await asyncio.to_thread(run, ["validate", "--config", str(cfg)], stdout="full")
    assert (json_run.returncode, json_run.stderr) == (
        2,
        "error: cannot write the summary of the run (complete) to standard output: "
        "No space left on device\n",
    )
    assert (valid.returncode, valid.stderr) == (
        2,
        "error: cannot write the result to standard output: No space left on device\n",
    )
    diff = [sys.executable, "-m", "aggregator", "diff", "latest", "latest", "--config", str(cfg)]
    closed = await asyncio.to_thread(  # `>&-`: the command starts with no stdout
        subprocess.run,
        ["sh", "-c", 'exec "$@" >&-', "sh", *diff],
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    assert (closed.returncode, closed.stderr) == (
        2,
        "error: cannot write the events to standard output: it is closed\n",
    )


def test_an_output_that_is_a_file_says_it_is_not_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    cfg = config_file(tmp_path, ["111111111111"], ["eu-west-1"], tmp_path / "out")
    assert main(["run", "--config", str(cfg), "--output", str(afile)]) == 2
    assert capsys.readouterr().err == (
        f"error: --output: {afile}: cannot write to the output directory: Not a directory\n"
    )


async def test_quiet_shows_warnings_but_no_info_logs_off_a_terminal(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """`--quiet` in a cron job (no terminal): the summary line on stdout, and on stderr the
    failed partition's warning but no info line (it logged one per partition: 230,000 a run
    at 10,000 accounts). Without `--quiet`, `logging.level = "info"` logs them as before."""
    import asyncio

    from aggregator.sandbox import Faults

    sb = await make_sandbox(accounts=3, seed=13)
    sb.faults = Faults(deny_list_jobs=frozenset({sb.account_ids[0]}))
    cfg = config_file(tmp_path, sb.account_ids, ["eu-west-1"], tmp_path / "out")
    cfg.write_text(cfg.read_text().replace('level = "warning"', 'level = "info"'))
    command = [sys.executable, "-m", "aggregator", "run", "--config", str(cfg)]

    def run(*extra: str) -> tuple[str, list[str]]:
        proc = subprocess.run(
            [*command, *extra], capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 1, proc.stderr  # partial: one account denied
        return proc.stdout, [orjson.loads(line)["event"] for line in proc.stderr.splitlines()]

    out, events = await asyncio.to_thread(run, "--quiet")
    assert out.startswith("partial: ") and len(out.splitlines()) == 1, out
    assert events == ["partition.failed"], events
    _, events = await asyncio.to_thread(run)
    assert events.count("partition.done") == 2 and "partition.failed" in events, events


async def test_a_log_that_cannot_be_written_does_not_stop_the_run(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Logs to a pipe nobody reads any more, or to a closed stderr, are dropped and the run
    completes (every log call raised: `run` exited 1 before it fetched anything, and a daemon
    whose log collector died would have failed every cycle)."""
    import asyncio

    sb = await make_sandbox(accounts=2, seed=13)
    cfg = config_file(tmp_path, sb.account_ids, ["eu-west-1"], tmp_path / "out")
    cfg.write_text(cfg.read_text().replace('level = "warning"', 'level = "info"'))
    command = [sys.executable, "-m", "aggregator", "run", "--config", str(cfg)]

    def run(stderr: Any, argv: list[str] = command) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=120)

    read, write = os.pipe()
    os.close(read)
    try:
        broken = await asyncio.to_thread(run, write)
    finally:
        os.close(write)
    closed = await asyncio.to_thread(run, None, ["sh", "-c", 'exec "$@" 2>&-', "sh", *command])
    for proc in (broken, closed):
        assert proc.returncode == 0
        assert proc.stdout.startswith("complete: "), proc.stdout
