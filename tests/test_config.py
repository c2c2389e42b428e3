"""Configuration: valid files load into a frozen tree; every bad input is one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.cli import main
from aggregator.config import (
    check_endpoints,
    check_output_location,
    key_source,
    load_settings,
    output_origin,
    parse_duration,
    settings_from_mapping,
)
from aggregator.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "aggregator.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prod.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_is_valid() -> None:
    """The shipped example loads and has the documented defaults."""
    s = load_settings(EXAMPLE, env={})
    assert s.accounts.ids == ("111111111111", "222222222222")
    assert s.limits.max_concurrency == 64
    assert s.daemon.interval == 900.0
    assert s.regions.us_strategy == "all"


def test_settings_are_frozen() -> None:
    """Downstream code cannot change the configuration it was given."""
    s = load_settings(EXAMPLE, env={})
    with pytest.raises(ValueError):
        s.limits.max_concurrency = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[accounts]\nids = ["111111111111", "222222222222", "333333333333", "12345"]\n',
            "prod.toml: accounts.ids[3]: '12345' is not a 12-digit AWS account id",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[limits]\nmax_concurency = 3\n',
            "prod.toml: limits.max_concurency: unknown key (did you mean 'max_concurrency'?)",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[regions]\nnames = ["eu-wset-1"]\n',
            "prod.toml: regions.names[0]: 'eu-wset-1' is not a region where Snowball is "
            "available (did you mean 'eu-west-1'?)",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[limits]\nmax_concurrency = 0\n',
            "prod.toml: limits.max_concurrency: input should be greater than or equal to 1",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[limits]\nmax_concurrency = "8"\n',
            "prod.toml: limits.max_concurrency: input should be a valid integer, got '8'",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[daemon]\ninterval = "5x"\n',
            "prod.toml: daemon.interval: '5x' is not a duration",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[regions]\nus_strategy = "some"\n',
            "prod.toml: regions.us_strategy: input should be 'all' or 'one'",
        ),
        (
            '[[accounts.list]]\nid = "333333333333"\n'
            'role_arn = "arn:aws:iam::333333333332:role/Other"\n',
            "prod.toml: accounts.list[0].role_arn: 'arn:aws:iam::333333333332:role/Other' "
            "belongs to account 333333333332, not 333333333333",
        ),
        ("[limits]\n", "prod.toml: accounts: no accounts configured"),
        ("[accounts\nids = 1\n", "prod.toml: invalid TOML: "),
        ('[accounts]\nids = "111111111111"\n', "prod.toml: accounts.ids: input should be a valid"),
        (
            '[accounts]\nids = ["111111111111\\n"]\n',
            "prod.toml: accounts.ids[0]: '111111111111\\n' is not a 12-digit AWS account id",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[daemon]\nlisten = "localhost"\n',
            "prod.toml: daemon.listen: 'localhost' is not HOST:PORT",
        ),
        (  # an unclosed bracket bound ::1 all the same; a bare IPv6 address is ambiguous
            '[accounts]\nids = ["111111111111"]\n[daemon]\nlisten = "[::1:9464"\n',
            "prod.toml: daemon.listen: '[::1:9464': an IPv6 address goes in brackets, as in "
            "'[::1]:9464'",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[daemon]\nlisten = "::1:9464"\n',
            "prod.toml: daemon.listen: '::1:9464': an IPv6 address goes in brackets",
        ),
        ('bogus = 1\n[accounts]\nids = ["111111111111"]\n', "prod.toml: bogus: unknown key"),
        (
            '[accounts]\nids = ["111111111111"]\n[daemon]\ninterval = inf\n',
            "prod.toml: daemon.interval: inf is not a finite duration",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[daemon]\ninterval = -inf\n',
            "prod.toml: daemon.interval: -inf is not a finite duration",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[daemon]\ninterval = nan\n',
            "prod.toml: daemon.interval: nan is not a finite duration",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[daemon]\ninterval = 1e300\n',
            "prod.toml: daemon.interval: 1e+300 is longer than the maximum interval of 7 days",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[daemon]\ninterval = "200h"\n',
            "prod.toml: daemon.interval: '200h' is longer than the maximum interval of 7 days",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[daemon]\ninterval = 5e-324\n',
            "prod.toml: daemon.interval: 5e-324 is shorter than the minimum interval of 1 ms",
        ),
        (
            '[accounts]\nids = ["111111111111", "222222222222"]\nexclude = ["222222222222", '
            '"111111111111"]\n',
            "prod.toml: accounts: accounts.exclude excludes every configured account",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[regions]\nnames = ["eu-west-1"]\n'
            'exclude = ["eu-west-1"]\n',
            "prod.toml: regions: names and exclude leave no Snowball region of aws",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[regions]\nnames = ["cn-north-1"]\n',
            "prod.toml: regions: names and exclude leave no Snowball region of aws",
        ),
        (  # accounts only in aws-cn: the default accounts.partition (aws) has none of them
            '[[accounts.list]]\nid = "111111111111"\n'
            'role_arn = "arn:aws-cn:iam::111111111111:role/R"\n[regions]\nnames = ["us-east-1"]\n',
            "prod.toml: regions: names and exclude leave no Snowball region of aws-cn, where",
        ),
        (  # one partition's accounts get a region, the other's none: theirs would vanish
            '[accounts]\nids = ["222222222222"]\n[[accounts.list]]\nid = "111111111111"\n'
            'role_arn = "arn:aws-cn:iam::111111111111:role/R"\n[regions]\nnames = ["us-east-1"]\n',
            "prod.toml: regions: names and exclude leave no Snowball region of aws-cn, where",
        ),
        (  # digits of another script are no account id (\\d matched them)
            '[accounts]\nids = ["' + "\u0661" * 12 + '"]\n',
            "prod.toml: accounts.ids[0]: ",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[limits]\nrequests_per_second = nan\n',
            "prod.toml: limits.requests_per_second: nan is not a finite number",
        ),
        (  # one request in 1e300 s: every partition would wait out its deadline
            '[accounts]\nids = ["111111111111"]\n[limits]\nrequests_per_second = 1e-300\n',
            "prod.toml: limits.requests_per_second: input should be greater than or equal to 0.01",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[limits]\ntimeout_seconds = 1e-9\n',
            "prod.toml: limits.timeout_seconds: input should be greater than or equal to 0.01",
        ),
        (  # bounded like the interval and the partition deadline
            '[accounts]\nids = ["111111111111"]\n[daemon]\nshutdown_deadline = "9999999h"\n',
            "prod.toml: daemon.shutdown_deadline: '9999999h' is longer than the maximum of 7 days",
        ),
        (  # a prefix whose keys (a sharded run's, the longest) would pass S3's 1,024 bytes
            '[accounts]\nids = ["111111111111"]\n[output]\ndirectory = "s3://bkt/'
            + "p" * 801
            + '"\n',
            "prod.toml: output.directory: the prefix of 's3://bkt/ppp",
        ),
        (  # the external id's value is not quoted back
            '[accounts]\nids = ["111111111111"]\nexternal_id = ["SuperSecretValue123"]\n',
            "prod.toml: accounts.external_id: input should be a valid string, got a value of "
            "type tuple",
        ),
        (
            'source = "x"\n[accounts]\nids = ["111111111111"]\n',
            "prod.toml: source: unknown key",
        ),
        (  # without a bound the daemon's liveness could never fail
            '[accounts]\nids = ["111111111111"]\n[limits]\npartition_deadline_seconds = inf\n',
            "prod.toml: limits.partition_deadline_seconds: inf is not a finite number",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[output]\ndirectory = "x\\u0000y"\n',
            "prod.toml: output.directory: 'x\\x00y' holds a control character",
        ),
        (
            '[accounts]\nids = ["111111111111"]\n[output]\ndirectory = "S3://bucket/x"\n',
            "prod.toml: output.directory: 'S3://bucket/x' is neither a directory nor s3://",
        ),
        (  # a URL that is no location is quoted back without its credentials
            '[accounts]\nids = ["111111111111"]\n[output]\n'
            'directory = "S3://AKIAIOSFODNN7EXAMPLE:Se/cret@bucket/x"\n',
            "prod.toml: output.directory: 'S3://<redacted>@bucket/x' is neither a directory",
        ),
        (  # STS refuses it: every AssumeRole failed before it was sent
            '[accounts]\nids = ["111111111111"]\nexternal_id = "x"\n',
            "prod.toml: accounts.external_id: an external id is 2 to 1224 letters, digits",
        ),
        (
            '[[accounts.list]]\nid = "111111111111"\nexternal_id = "Secret Value"\n',
            "prod.toml: accounts.list[0].external_id: an external id is 2 to 1224 letters",
        ),
        (  # subtracted as a name, "all" would remove nothing
            '[accounts]\nids = ["111111111111"]\n[regions]\nexclude = ["all"]\n',
            "prod.toml: regions.exclude[0]: 'all' cannot be excluded: exclude lists regions",
        ),
        (
            '[accounts]\nids = ["111111111111"]\nrole_name = ""\n',
            "prod.toml: accounts.role_name: must not be empty",
        ),
        (  # IAM's own way of writing a path would make the ARN role//team/Reader
            '[accounts]\nids = ["111111111111"]\nrole_name = "/team/Reader"\n',
            "prod.toml: accounts.role_name: '/team/Reader' is not a valid IAM role name: write "
            "a path without its leading and trailing '/', such as 'team/Reader'",
        ),
        (
            '[accounts]\nids = ["111111111111"]\nrole_name = "team/' + "R" * 65 + '"\n',
            "is not a valid IAM role name (1 to 64 letters, digits and _+=,.@- after its path)",
        ),
        (  # a filter that would do nothing
            '[accounts]\nids = ["111111111111"]\n[accounts.organizations]\n'
            'ou_ids = ["ou-abcd-12345678"]\n',
            "prod.toml: accounts.organizations: ou_ids is set but discovery is off: set "
            "enabled = true, or remove ou_ids",
        ),
        (  # which entry would win is not for us to guess
            '[[accounts.list]]\nid = "333333333333"\n[[accounts.list]]\nid = "333333333333"\n'
            'role_arn = "arn:aws:iam::333333333333:role/Other"\n',
            "prod.toml: accounts.list: entry 1 names account 333333333333 again",
        ),
        (  # nor the external id inside a table of the wrong type (repr quoted its values)
            '[accounts]\nids = ["111111111111"]\n[accounts.list]\n'
            'external_id = "SuperSecretValue123"\nid = "222222222222"\n',
            "prod.toml: accounts.list: input should be a valid tuple, got a value of type dict",
        ),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, expected: str) -> None:
    """Each hand-written mistake names the file, the key path and the problem on one line."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path.parent)), message
    assert expected in message, message
    assert "Secret" not in message and "cret@" not in message


def _aws_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An AWS config file with one profile, `present`, as the only AWS configuration."""
    aws_config = tmp_path / "aws-config"
    aws_config.write_text("[profile present]\nregion = eu-west-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(aws_config))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_PROFILE", raising=False)
    return aws_config


@pytest.mark.parametrize("where", ["partition-profile", "AWS_PROFILE", "AWS_CONFIG_FILE"])
def test_aws_profiles_that_do_not_exist_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A profile the run would use that is not there, or an AWS config file that does not
    parse, is one line naming what set it (botocore would raise it mid-run, as a traceback)."""
    aws_config = _aws_config(tmp_path, monkeypatch)
    text = '[accounts]\nids = ["111111111111"]\n'
    good = load_settings(write(tmp_path, text + '[partitions.aws]\nprofile = "present"\n'))
    assert good.partitions["aws"].profile == "present"
    load_settings(write(tmp_path, text))  # the default chain, no profile: fine
    if where == "partition-profile":
        path = write(tmp_path, text + '[partitions.aws]\nprofile = "absent"\n')
        expected = f"{path}: partitions.aws.profile: The config profile (absent) could not be"
    elif where == "AWS_PROFILE":
        path = write(tmp_path, text)
        monkeypatch.setenv("AWS_PROFILE", "absent")
        expected = "AWS_PROFILE (environment): The config profile (absent) could not be found"
    else:
        path = write(tmp_path, text)
        aws_config.write_text("[profile present\nregion = eu-west-1\n")
        expected = "AWS_CONFIG_FILE (environment): Unable to parse config file"
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)


def test_only_the_profiles_a_run_uses_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A profile of a partition no account is in is not checked (a host that never runs those
    accounts need not have it); the default chain always is, whatever the hub's profile (the
    member accounts' sessions read it), and botocore's own order names the variable."""
    _aws_config(tmp_path, monkeypatch)
    text = '[accounts]\nids = ["111111111111"]\n'
    load_settings(write(tmp_path, text + '[partitions.aws-cn]\nprofile = "cn-elsewhere"\n'))
    with_hub = write(tmp_path, text + '[partitions.aws]\nprofile = "present"\n')
    monkeypatch.setenv("AWS_PROFILE", "present")
    monkeypatch.setenv("AWS_DEFAULT_PROFILE", "absent")
    with pytest.raises(ConfigError, match=r"^AWS_DEFAULT_PROFILE \(environment\): "):
        load_settings(with_hub)


_ENDPOINT_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_SNOWBALL",
    "AWS_ENDPOINT_URL_STS",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_ORGANIZATIONS",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


def _endpoints(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    """Exactly these endpoint variables set (botocore reads the process environment)."""
    for name in _ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_endpoint_urls_botocore_refuses_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint URL botocore would pick for a service the run calls and then refuse
    ("Invalid endpoint" for every client, every partition failed, exit 1) is one line naming
    where it was set, without the value. botocore's order decides which one that is: a
    service's variable before `AWS_ENDPOINT_URL`, then the profile's `services` section and
    `endpoint_url`; none when configured endpoints are ignored."""
    aws_config = _aws_config(tmp_path, monkeypatch)
    path = write(tmp_path, '[accounts]\nids = ["111111111111"]\n')
    bad = "not-a-url:secret"
    for name, value in [
        ("AWS_ENDPOINT_URL", bad),
        ("AWS_ENDPOINT_URL_SNOWBALL", "ftp://snowball.example"),  # botocore's fine, not aiohttp
        ("AWS_ENDPOINT_URL_STS", bad),
    ]:
        _endpoints(monkeypatch, **{name: value})
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert str(info.value) == (
            f"{name} (environment): not an endpoint URL (expected http(s)://host[:port])"
        )
    # botocore's own check raises ValueError (a traceback) for an unclosed IPv6 bracket
    _endpoints(monkeypatch, AWS_ENDPOINT_URL="http://u:p@[bad")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == (
        "AWS_ENDPOINT_URL (environment): not an endpoint URL (expected http(s)://host[:port])"
    )
    for fine in ("http://127.0.0.1:4566", "https://snowball.example", "http://[::1]:80"):
        _endpoints(monkeypatch, AWS_ENDPOINT_URL=fine)
        load_settings(path)
    good = "http://127.0.0.1:4566"
    # Never used: the services' own variables win, or the run does not call the service.
    _endpoints(monkeypatch, AWS_ENDPOINT_URL=bad, AWS_ENDPOINT_URL_SNOWBALL=good)
    with pytest.raises(ConfigError, match=r"^AWS_ENDPOINT_URL \(environment\)"):
        load_settings(path)  # STS still takes the global one
    _endpoints(
        monkeypatch, AWS_ENDPOINT_URL=bad, AWS_ENDPOINT_URL_SNOWBALL=good, AWS_ENDPOINT_URL_STS=good
    )
    load_settings(path)
    _endpoints(monkeypatch, AWS_ENDPOINT_URL_S3=bad, AWS_ENDPOINT_URL_ORGANIZATIONS="")
    settings = load_settings(path)
    with pytest.raises(ConfigError, match=r"^AWS_ENDPOINT_URL_S3 \(environment\): not an"):
        check_endpoints(settings, output="s3://inventory/p")  # `run --output s3://...`
    s3 = write(
        tmp_path, '[accounts]\nids = ["111111111111"]\n[output]\ndirectory = "s3://inventory/p"\n'
    )
    with pytest.raises(ConfigError, match=r"^AWS_ENDPOINT_URL_S3 \(environment\): not an"):
        load_settings(s3)
    # Ignored as botocore reads the flag: from the variable (its exact spelling) or the profile.
    _endpoints(monkeypatch, AWS_ENDPOINT_URL=bad, AWS_IGNORE_CONFIGURED_ENDPOINT_URLS="true")
    load_settings(path)
    _endpoints(monkeypatch, AWS_ENDPOINT_URL=bad, AWS_IGNORE_CONFIGURED_ENDPOINT_URLS="true\n")
    with pytest.raises(ConfigError, match=r"^AWS_ENDPOINT_URL \(environment\)"):
        load_settings(path)
    _endpoints(monkeypatch, AWS_ENDPOINT_URL=bad)
    aws_config.write_text("[default]\nignore_configured_endpoint_urls = true\n")
    load_settings(path)
    aws_config.write_text(
        "[default]\nservices = local\n[services local]\nsts =\n  endpoint_url = nope\n"
    )
    _endpoints(monkeypatch)
    refused = "not an endpoint URL (expected http(s)://host[:port])"
    assert (
        str(info_of(path))
        == f"{aws_config} (profile default): services.sts.endpoint_url: {refused}"
    )
    # The profile botocore reads is the one named (it said "default" whatever AWS_PROFILE was)
    aws_config.write_text("[default]\n[profile p]\nendpoint_url = nope\n")
    monkeypatch.setenv("AWS_PROFILE", "p")
    assert str(info_of(path)) == f"{aws_config} (profile p): endpoint_url: {refused}"
    monkeypatch.delenv("AWS_PROFILE")
    # A profile naming a services section that is not there: botocore refuses it only when no
    # variable gave the URL first.
    aws_config.write_text("[default]\nservices = missing\n")
    _endpoints(monkeypatch, AWS_ENDPOINT_URL=good)
    load_settings(path)
    _endpoints(monkeypatch)
    with pytest.raises(ConfigError, match=r"services: no \[services missing\] section"):
        load_settings(path)
    aws_config.write_text("[default]\nservices = empty\n[services empty]\n")
    with pytest.raises(ConfigError, match=r"services: no \[services empty\] section"):
        load_settings(path)


def info_of(path: Path) -> ConfigError:
    """The ConfigError loading `path` raises."""
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value


def test_unusual_inputs_are_one_short_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nesting deeper than Python recurses, a file with no end, a value megabytes long, an S3
    URL with credentials in it, a usage mistake: each is one short line, exit code 2, and
    what may be a secret is not quoted back."""
    deep = write(tmp_path, "x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_settings(deep, env={})
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        load_settings("/dev/zero", env={})
    huge = write(tmp_path, f'[accounts]\nids = ["111111111111"]\nrole_name = "{"r" * 900_000}"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(huge, env={})
    assert len(str(info.value)) < 600 and "accounts.role_name" in str(info.value)
    # A secret access key may hold a "/": then the "bucket" is only the part before it.
    for secret in (
        "AKIAFAKEFAKEFAKEFAKE:wJalrXUtnFEMIK7MDENGbPxRfiCYFAKEKEY",
        "AKIAFAKEFAKEFAKEFAKE:wJalrXUtnFEMI/K7MDENGbPxRfiCYFAKEKEY",
    ):
        url = write(
            tmp_path,
            f'[accounts]\nids = ["111111111111"]\n[output]\ndirectory = "s3://{secret}@b/x"\n',
        )
        with pytest.raises(ConfigError, match="carries no credentials") as info:
            load_settings(url, env={})
        assert "AKIA" not in str(info.value) and "wJalr" not in str(info.value)
        assert "K7MDENG" not in str(info.value)
    at = write(
        tmp_path, '[accounts]\nids = ["111111111111"]\n[output]\ndirectory = "s3://bkt/t@x"\n'
    )
    assert load_settings(at, env={}).output.directory == "s3://bkt/t@x"  # a key's @, not a user's
    with pytest.raises(SystemExit) as exited:
        main(["merge", "--shards", "abc"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: snowball-aggregator merge: "), err
    for argv in (["sandbox", "--port", "70000"], ["sandbox", "--partition", "mars"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["demo", "--accounts", "100000000000"])  # not a sandbox that exhausts memory
    assert "not a number from 1 to 100,000" in capsys.readouterr().err


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    """A path that does not exist is reported, not raised as a traceback."""
    with pytest.raises(ConfigError, match=r"nope\.toml: file not found"):
        load_settings(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match=r"^--config: must not be empty$"):  # not "a directory"
        load_settings("", env={})


def test_environment_overrides_and_names_the_variable(tmp_path: Path) -> None:
    """SNOWBALL_AGGREGATOR_* variables override keys, and errors name the variable."""
    path = write(tmp_path, '[accounts]\nids = ["111111111111"]\n')
    s = load_settings(
        path,
        env={
            "SNOWBALL_AGGREGATOR_LIMITS__MAX_CONCURRENCY": "16",
            "SNOWBALL_AGGREGATOR_REGIONS__NAMES": '["eu-west-1", "us-east-1"]',
            "SNOWBALL_AGGREGATOR_OUTPUT__DIRECTORY": "/srv/snapshots",
            "UNRELATED": "x",
        },
    )
    assert s.limits.max_concurrency == 16
    assert s.regions.names == ("eu-west-1", "us-east-1")
    assert s.output.directory == "/srv/snapshots"
    # An error found later names where the value came from: the variable that was applied,
    # not one that merely is in this process's environment now.
    variable = "SNOWBALL_AGGREGATOR_OUTPUT__DIRECTORY"
    assert key_source(s, "output.directory") == f"{variable} (environment)"
    assert key_source(s, "daemon.listen") == str(path)
    from_file = load_settings(path, env={})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(variable, "/elsewhere")
        assert key_source(from_file, "output.directory") == str(path)
        assert output_origin(from_file) == f"{path}: output.directory"
        assert output_origin(from_file, "--output") == "--output"
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={"SNOWBALL_AGGREGATOR_LIMITS__MAX_ATTEMPTS": "0"})
    assert str(info.value).startswith(
        "SNOWBALL_AGGREGATOR_LIMITS__MAX_ATTEMPTS (environment): limits.max_attempts:"
    )


def test_a_role_name_may_have_a_path_as_long_as_iam_allows(tmp_path: Path) -> None:
    """IAM limits the name to 64 characters and the path to 512: a path may make the whole
    longer than 64 (it was refused), and the ARN has the path as IAM writes it."""
    from aggregator.accounts import static_accounts

    role = "org/platform/inventory!/readers/SnowballInventoryReaderRoleForProd"
    s = load_settings(
        write(tmp_path, f'[accounts]\nids = ["111111111111"]\nrole_name = "{role}"\n'), env={}
    )
    (account,) = static_accounts(s.accounts)
    assert account.role_arn == f"arn:aws:iam::111111111111:role/{role}"
    # The same role named by its ARN in accounts.list (whose check refused the "!")
    entry = f'[[accounts.list]]\nid = "111111111111"\nrole_arn = "{account.role_arn}"\n'
    (listed,) = static_accounts(load_settings(write(tmp_path, entry), env={}).accounts)
    assert listed.role_arn == account.role_arn
    for leading in ("/Reader", "/team/Reader"):
        text = f'[accounts]\nids = ["111111111111"]\nrole_name = "{leading}"\n'
        with pytest.raises(ConfigError, match="without its leading and trailing '/'"):
            load_settings(write(tmp_path, text), env={})


def test_a_home_directory_in_the_output_location_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No shell reads a TOML value: `~/snapshots` is the home directory's (it was a folder
    named "~" in the working directory), and a `~user` nobody has is one line."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = '[accounts]\nids = ["111111111111"]\n[output]\ndirectory = "~/snapshots"\n'
    s = load_settings(write(tmp_path, text), env={})
    assert s.output.directory == str(tmp_path / "home" / "snapshots")
    text = text.replace("~/", "~no-such-user-for-snowball/")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={})
    assert str(info.value).endswith(
        "prod.toml: output.directory: '~no-such-user-for-snowball/snapshots': '~' cannot be "
        "expanded: no home directory for user 'no-such-user-for-snowball'"
    ), str(info.value)
    # The flag takes the same path (a quoted "~/x" reaches us as written).
    assert check_output_location("~/x") == str(tmp_path / "home" / "x")
    assert check_output_location("x/~") == "x/~"
    assert check_output_location("s3://bkt/~") == "s3://bkt/~"


def test_a_variable_that_names_no_setting_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[accounts]\nids = ["111111111111"]\n')
    for name in ("SNOWBALL_AGGREGATOR_",):
        with pytest.raises(ConfigError) as info:
            load_settings(path, env={name: "16"})
        assert str(info.value) == (
            f"{name} (environment): names no setting (write SNOWBALL_AGGREGATOR_<SECTION>__<KEY>"
            ", e.g. SNOWBALL_AGGREGATOR_LIMITS__MAX_CONCURRENCY)"
        )


def test_a_partition_with_a_hyphen_is_set_by_environment(tmp_path: Path) -> None:
    """A variable name cannot hold `aws-cn`: `PARTITIONS__AWS_CN__PROFILE` sets it (it was
    refused as an unknown partition 'aws_cn')."""
    path = write(tmp_path, '[accounts]\nids = ["111111111111"]\n')
    env = {
        "SNOWBALL_AGGREGATOR_PARTITIONS__AWS_CN__PROFILE": "cn-hub",
        "SNOWBALL_AGGREGATOR_PARTITIONS__AWS_US_GOV__PROFILE": "gov-hub",
    }
    s = load_settings(path, env=env)
    assert s.partitions["aws-cn"].profile == "cn-hub"
    assert s.partitions["aws-us-gov"].profile == "gov-hub"


def test_environment_values_of_text_settings_are_taken_as_given(tmp_path: Path) -> None:
    """A string setting takes the variable's value as given, though it reads as a TOML number
    or boolean (an external id of digits, a folder named 2024): it used to be refused as "not
    a valid string". A quoted TOML string still loses its quotes; other settings still parse."""
    path = write(tmp_path, '[accounts]\nids = ["111111111111"]\n')
    prefix = "SNOWBALL_AGGREGATOR_"
    s = load_settings(
        path,
        env={
            f"{prefix}ACCOUNTS__EXTERNAL_ID": "1_000",
            f"{prefix}ACCOUNTS__ROLE_NAME": "2024",
            f"{prefix}OUTPUT__DIRECTORY": "true",
            f"{prefix}LIMITS__MAX_CONCURRENCY": "8",
        },
    )
    assert s.accounts.external_id == "1_000" and s.accounts.role_name == "2024"
    assert s.output.directory == "true" and s.limits.max_concurrency == 8
    quoted = load_settings(path, env={f"{prefix}ACCOUNTS__EXTERNAL_ID": '"12345"'})
    assert quoted.accounts.external_id == "12345"
    with pytest.raises(ConfigError, match=r"ACCOUNTS__IDS \(environment\): accounts.ids: "):
        load_settings(path, env={f"{prefix}ACCOUNTS__IDS": "111111111111"})


def test_environment_errors_on_indexed_keys_name_the_variable(tmp_path: Path) -> None:
    """An override whose error lies inside it (`accounts.ids[0]`) names the variable, not the
    file; so does an override whose path runs through a value that is not a table."""
    path = write(tmp_path, '[accounts]\nids = ["111111111111"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={"SNOWBALL_AGGREGATOR_ACCOUNTS__IDS": '["12345"]'})
    assert str(info.value) == (
        "SNOWBALL_AGGREGATOR_ACCOUNTS__IDS (environment): accounts.ids[0]: "
        "'12345' is not a 12-digit AWS account id"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={"SNOWBALL_AGGREGATOR_ACCOUNTS__IDS__X": "1"})
    assert str(info.value) == (
        "SNOWBALL_AGGREGATOR_ACCOUNTS__IDS__X (environment): accounts.ids.x: 'ids' is not a table"
    )
    with pytest.raises(ConfigError) as info:  # the file's own mistakes still name the file
        load_settings(
            write(tmp_path, '[accounts]\nids = ["1"]\n'),
            env={"SNOWBALL_AGGREGATOR_ACCOUNTS__EXCLUDE": '["222222222222"]'},
        )
    assert str(info.value).startswith(f"{tmp_path / 'prod.toml'}: accounts.ids[0]: ")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ACCOUNTS__IDS", "[]", "accounts: no accounts configured"),
        ("ACCOUNTS__EXCLUDE", '["111111111111"]', "accounts: accounts.exclude excludes every"),
        ("REGIONS__EXCLUDE", '["us-east-1"]', "regions: names and exclude leave no Snowball"),
        ("REGIONS__NAMES", "[]", "regions.names: at least one region"),
    ],
)
def test_environment_errors_across_keys_name_the_variable(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    """A check across keys of a table (no accounts left, no region left) that an override
    made fail names the variable, not the file that was fine without it."""
    text = '[accounts]\nids = ["111111111111"]\n[regions]\nnames = ["us-east-1"]\n'
    path = write(tmp_path, text)
    assert load_settings(path, env={}).regions.names == ("us-east-1",)
    name = f"SNOWBALL_AGGREGATOR_{variable}"
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={name: value})
    assert str(info.value).startswith(f"{name} (environment): {message}")


def test_accounts_that_are_not_asked_need_no_region(tmp_path: Path) -> None:
    """The region rule goes by the accounts that will be asked: an excluded id, or an id that
    a list entry with an aws-cn role takes over, needs no aws region."""
    cn = 'role_arn = "arn:aws-cn:iam::111111111111:role/R"\n[regions]\nnames = ["cn-north-1"]\n'
    for accounts in (
        '[accounts]\nids = ["111111111111"]\nexclude = ["222222222222", "111111111111"]\n'
        '[[accounts.list]]\nid = "333333333333"\n'
        'role_arn = "arn:aws-cn:iam::333333333333:role/R"\n[regions]\nnames = ["cn-north-1"]\n',
        '[accounts]\nids = ["111111111111"]\n[[accounts.list]]\nid = "111111111111"\n' + cn,
    ):
        assert load_settings(write(tmp_path, accounts), env={}).regions.names == ("cn-north-1",)


def test_environment_errors_across_keys_blame_only_a_key_the_check_reads(tmp_path: Path) -> None:
    """An override of a key the failing check does not read (the external id, the US
    strategy) is not blamed for it: the file is."""
    path = write(tmp_path, '[accounts]\nids = ["111111111111"]\nexclude = ["111111111111"]\n')
    env = {"SNOWBALL_AGGREGATOR_ACCOUNTS__EXTERNAL_ID": "abc"}
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env)
    assert str(info.value).startswith(f"{path}: accounts: accounts.exclude excludes every")
    path = write(tmp_path, '[accounts]\nids = ["111111111111"]\n[regions]\nnames = ["us-east-1"]\n')
    env = {
        "SNOWBALL_AGGREGATOR_ACCOUNTS__PARTITION": "aws-cn",
        "SNOWBALL_AGGREGATOR_REGIONS__US_STRATEGY": "one",
    }
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env)
    assert str(info.value).startswith(
        "SNOWBALL_AGGREGATOR_ACCOUNTS__PARTITION (environment): regions: names and exclude"
    )


def test_environment_errors_in_tables_it_made_or_profiles_it_named_name_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table only an override made (an unknown section, a list given as a table) and a
    profile only an override named are the variable's mistakes: they used to name the file,
    which does not hold them."""
    _aws_config(tmp_path, monkeypatch)
    path = write(tmp_path, '[accounts]\nids = ["111111111111"]\n')
    prefix = "SNOWBALL_AGGREGATOR_"
    for name, value, problem in [
        ("LIMITSX__A", "1", "limitsx: unknown key (did you mean 'limits'?)"),
        ("ACCOUNTS__LIST__0__ID", "111111111111", "accounts.list: input should be a valid"),
        ("PARTITIONS__AWS__PROFILE", "absent", "partitions.aws.profile: The config profile"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_settings(path, env={prefix + name: value})
        assert str(info.value).startswith(f"{prefix}{name} (environment): {problem}"), info.value


def test_utf8_bom_is_accepted_and_other_encodings_are_one_line(tmp_path: Path) -> None:
    """A file saved with a UTF-8 byte order mark loads; UTF-16 (or any non-UTF-8 bytes) is
    still one clear line."""
    path = tmp_path / "bom.toml"
    text = '[accounts]\nids = ["111111111111"]\n'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_settings(path, env={}).accounts.ids == ("111111111111",)
    path.write_bytes(text.encode("utf-16"))
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert str(info.value) == f"{path}: not UTF-8 text"


@pytest.mark.parametrize(
    ("value", "seconds"), [("15m", 900.0), ("1h30m", 5400.0), ("45s", 45.0), (2.5, 2.5)]
)
def test_durations(value: object, seconds: float) -> None:
    """Durations accept h/m/s suffixes or plain seconds."""
    assert parse_duration(value) == seconds


def test_validate_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`validate` exits 0 on a good file and 2 with one stderr line on a bad one."""
    assert main(["validate", "--config", str(EXAMPLE)]) == 0
    assert "ok: 3 accounts" in capsys.readouterr().out
    bad = write(tmp_path, '[accounts]\nids = ["1"]\n')
    assert main(["validate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "accounts.ids[0]: '1' is not a 12-digit AWS account id" in err


def test_run_with_bad_config_never_prints_a_traceback(tmp_path: Path) -> None:
    """The real console entry point exits 2 with one line, no traceback."""
    bad = write(tmp_path, "[limits]\nmax_concurrency = -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "aggregator", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "limits.max_concurrency" in proc.stderr


# --- generated bad input -------------------------------------------------------------------

_KNOWN = {
    "accounts": [
        "role_name",
        "external_id",
        "partition",
        "ids",
        "exclude",
        "organizations",
        "list",
    ],
    "regions": ["names", "exclude", "us_strategy"],
    "limits": ["max_concurrency", "requests_per_second", "max_attempts", "timeout_seconds"],
    "output": ["directory", "retain"],
    "daemon": ["interval", "listen"],
    "logging": ["level", "format"],
}
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["all", "one", "15m", "us-east-1", "111111111111", "0", "-1", "1e9"]),
)


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # A function rather than a lambda: hypothesis reads the source of `extend` to check that
    # it uses its argument, and a multi-line lambda's source is not always found (a flaky
    # HypothesisDeprecationWarning, an error under filterwarnings).
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3)


_values = st.recursive(_scalars, _nested, max_leaves=8)
_keys = st.sampled_from([k for ks in _KNOWN.values() for k in ks]) | st.text(
    min_size=1, max_size=10
)
_sections = st.dictionaries(
    st.sampled_from([*_KNOWN, "extra"]), st.dictionaries(_keys, _values, max_size=4), max_size=4
)
_documents = st.one_of(_sections, st.dictionaries(st.text(max_size=6), _values, max_size=4))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_documents)
def test_generated_documents_yield_settings_or_one_line(doc: dict[str, Any]) -> None:
    """Whatever the document holds, the result is Settings or a one-line ConfigError."""
    try:
        settings_from_mapping(doc, source="gen.toml", env={})
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        assert message.startswith("gen.toml: ")
        assert len(message.split(": ", 2)) >= 2


@settings(max_examples=150, deadline=None)
@given(
    raw=st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
        max_size=200,
    )
)
def test_generated_files_yield_settings_or_one_line(tmp_path_factory: Any, raw: str) -> None:
    """Arbitrary file contents (mostly broken TOML) also give exactly one line."""
    path = tmp_path_factory.mktemp("cfg") / "gen.toml"
    path.write_text(raw, encoding="utf-8")
    try:
        load_settings(path, env={})
    except ConfigError as exc:
        assert "\n" not in str(exc)
        assert str(exc).startswith(str(path))
