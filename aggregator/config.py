"""Configuration: one TOML file plus environment overrides, validated into one frozen tree.

Loaded once, at the edge (the CLI); everything downstream receives `Settings` values and never
reads files or the environment. Unknown keys are errors, so a typo cannot be silently ignored.

Environment overrides: `SNOWBALL_AGGREGATOR_<SECTION>__<KEY>` (double underscore between levels),
for example `SNOWBALL_AGGREGATOR_LIMITS__MAX_CONCURRENCY=16` or
`SNOWBALL_AGGREGATOR_ACCOUNTS__IDS='["111111111111"]'`. Values are read as TOML values when they
parse as one (numbers, booleans, arrays) and as plain strings otherwise.

Every problem is reported as one line naming the file (or the environment variable), the key
path and the problem, e.g. `config/prod.toml: accounts.ids[3]: '12345' is not a 12-digit AWS
account id`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "MAX_INTERVAL",
    "Settings",
    "check_endpoints",
    "check_output_location",
    "key_source",
    "load_settings",
    "output_origin",
    "parse_duration",
]

ENV_PREFIX = "SNOWBALL_AGGREGATOR_"
PARTITIONS = ("aws", "aws-cn", "aws-us-gov")
MAX_INTERVAL = 7 * 24 * 3600.0  # daemon.interval: a week; longer is a cron job, not a daemon
MAX_CONFIG_BYTES = 1024 * 1024  # a configuration file; more is some other file
MIN_INTERVAL = 0.001  # daemon.interval: shorter is no interval (and overflows the slot count)
# re.ASCII: `\d` and `\w` would match other scripts' digits and letters (Arabic-Indic
# digits are no account id: they pass int() and then fail to encode where an id is hashed).
_ACCOUNT_RE = re.compile(r"^\d{12}$", re.ASCII)
_ROLE_ARN_RE = re.compile(
    r"^arn:(aws|aws-cn|aws-us-gov):iam::(\d{12}):role/(?:[\x21-\x7e]{1,510}/)?[\w+=,.@-]{1,64}$",
    re.ASCII,
)
# IAM: a role name is 1-64 of these; its path, if any, up to 512 characters between and
# including its outer slashes (written here without them: `team/Reader`).
_ROLE_NAME_RE = re.compile(r"^[\w+=,.@-]{1,64}$", re.ASCII)
_ROLE_PATH_RE = re.compile(r"^[\x21-\x7e]+$", re.ASCII)
# STS: an ExternalId is 2-1224 of these.
_EXTERNAL_ID_RE = re.compile(r"^[\w+=,.@:/-]{2,1224}$", re.ASCII)
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
_DURATION_RE = re.compile(
    r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$", re.ASCII
)


@cache
def snowball_regions(partition: str = "aws") -> tuple[str, ...]:
    """Every region botocore's endpoint data lists for Snowball in `partition`, sorted."""
    return tuple(sorted(_endpoint_session().get_available_regions("snowball", partition)))


@cache
def _endpoint_session() -> Any:
    """One botocore session for the endpoint data (each new session parses it again)."""
    import botocore.session

    session = botocore.session.get_session()
    session.register_component("data_loader", data_loader(session))
    return session


def data_loader(session: Any) -> Any:
    """The botocore data loader for `session`'s data path, one per path and process: the
    endpoint data and models it has parsed are not parsed again by the next session.

    A profile that does not exist or a config file that does not parse (`AWS_PROFILE`,
    `AWS_CONFIG_FILE`) is `check_aws_config`'s to report: the data path then comes from
    `AWS_DATA_PATH` alone, so that reading the endpoint data never fails on it."""
    from botocore.exceptions import ConfigParseError, ProfileNotFound

    try:
        path = session.get_config_variable("data_path")
    except (ProfileNotFound, ConfigParseError):
        path = os.environ.get("AWS_DATA_PATH")
    return _loader(path)


@cache
def _loader(data_path: str | None) -> Any:
    from botocore.loaders import create_loader

    return create_loader(data_path)


def select_regions(settings: RegionsSettings, partition: str = "aws") -> tuple[str, ...]:
    """The configured regions of `partition` ("all" expanded), minus `exclude`, sorted."""
    available = snowball_regions(partition)
    chosen: set[str] = set()
    for name in settings.names:
        if name == "all":
            chosen.update(available)
        elif name in available:
            chosen.add(name)
    return tuple(sorted(chosen - set(settings.exclude)))


def _all_known_regions() -> frozenset[str]:
    return frozenset(r for p in PARTITIONS for r in snowball_regions(p))


def _account_id(value: str) -> str:
    if not _ACCOUNT_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a 12-digit AWS account id")
    return value


def _region(value: str) -> str:
    if value != "all" and value not in _all_known_regions():
        close = difflib.get_close_matches(value, sorted(_all_known_regions()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{value!r} is not a region where Snowball is available{hint}")
    return value


def _excluded_region(value: str) -> str:
    if value == "all":  # subtracted as a name, it would remove nothing, silently
        raise ValueError("'all' cannot be excluded: exclude lists regions to take out of names")
    return _region(value)


def _role_name(value: str) -> str:
    """A role name, or a path and name written `team/Reader` (the ARN is `role/team/Reader`)."""
    if not value:
        raise ValueError("must not be empty")
    path, slash, name = value.rpartition("/")
    shown = repr(value) if len(value) <= 80 else repr(value[:77] + "...")
    if value.startswith("/") or not name:  # the ARN would read role//team/Reader
        raise ValueError(
            f"{shown} is not a valid IAM role name: write a path without its leading and "
            "trailing '/', such as 'team/Reader'"
        )
    if not _ROLE_NAME_RE.fullmatch(name):
        raise ValueError(
            f"{shown} is not a valid IAM role name (1 to 64 letters, digits and _+=,.@-"
            + (" after its path)" if slash else ")")
        )
    if slash and (len(path) + 2 > 512 or not _ROLE_PATH_RE.fullmatch(path)):
        raise ValueError(
            f"{shown} is not a valid IAM role path and name (a path is at most 510 "
            "printable ASCII characters, without spaces)"
        )
    return value


def _external_id(value: str | None) -> str | None:
    # The value is a shared secret of sorts: never quoted back.
    if value and not _EXTERNAL_ID_RE.fullmatch(value):
        raise ValueError(
            "an external id is 2 to 1224 letters, digits and _+=,.@:/- (STS refuses others)"
        )
    return value


def parse_duration(value: object, *, zero: bool = False) -> float:
    """`"15m"`, `"1h30m"`, `"45s"`, `"2.5s"` or a number of seconds -> seconds (float); more
    than zero, or zero too with `zero` (however written: `0`, `0s`, `0m`)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '15m', '30s' or '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value and (m := _DURATION_RE.fullmatch(value.strip())):
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + s
    else:
        raise ValueError(f"{value!r} is not a duration such as '15m', '30s' or '1h'")
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if not (seconds >= 0 if zero else seconds > 0):
        raise ValueError(
            f"{value!r}: a duration must not be negative"
            if zero
            else f"{value!r}: a duration must be positive"
        )
    return seconds


def _listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (for example '127.0.0.1:9464')")
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    if ("[" in host or "]" in host or ":" in host) and not (
        bracketed and "[" not in host[1:-1] and "]" not in host[1:-1]
    ):
        raise ValueError(f"{value!r}: an IPv6 address goes in brackets, as in '[::1]:9464'")
    return value


def _interval(value: object) -> float:
    seconds = parse_duration(value)
    if seconds > MAX_INTERVAL:
        raise ValueError(f"{value!r} is longer than the maximum interval of 7 days")
    if seconds < MIN_INTERVAL:
        raise ValueError(f"{value!r} is shorter than the minimum interval of 1 ms")
    return seconds


def _deadline(value: object) -> float:
    seconds = parse_duration(value)
    if seconds > MAX_INTERVAL:
        raise ValueError(f"{value!r} is longer than the maximum of 7 days")
    return seconds


AccountId = Annotated[str, AfterValidator(_account_id)]
Region = Annotated[str, AfterValidator(_region)]
ExcludedRegion = Annotated[str, AfterValidator(_excluded_region)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Interval = Annotated[float, BeforeValidator(_interval)]
Deadline = Annotated[float, BeforeValidator(_deadline)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


_OU_RE = re.compile(r"^(r-[0-9a-z]{4,32}|ou-[0-9a-z]{4,32}-[0-9a-z]{8,32})$")


def _ou_id(value: str) -> str:
    if not _OU_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not an organization root or OU id (r-... or ou-...-...)")
    return value


class OrganizationsSettings(_Model):
    """`[accounts.organizations]`: discover ACTIVE accounts with organizations:ListAccounts,
    or only under `ou_ids` (recursively, with ListAccountsForParent); `include`, when not
    empty, keeps only those discovered ids."""

    enabled: bool = False
    ou_ids: tuple[Annotated[str, AfterValidator(_ou_id)], ...] = ()
    include: tuple[AccountId, ...] = ()

    @model_validator(mode="after")
    def _used(self) -> OrganizationsSettings:
        # A filter that does nothing is a surprise waiting: said, not ignored.
        for key in ("ou_ids", "include"):
            if getattr(self, key) and not self.enabled:
                raise ValueError(
                    f"{key} is set but discovery is off: set enabled = true, or remove {key}"
                )
        return self


class AccountEntry(_Model):
    """One `[[accounts.list]]` entry: an account with its own role and external id."""

    id: AccountId
    role_arn: str | None = None
    external_id: Annotated[str | None, AfterValidator(_external_id)] = None

    @field_validator("role_arn")
    @classmethod
    def _arn_matches(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        m = _ROLE_ARN_RE.fullmatch(value)
        if not m:
            raise ValueError(
                f"{value!r} is not an IAM role ARN (arn:<partition>:iam::<account id>:role/<name>)"
            )
        account = info.data.get("id")
        if account is not None and m.group(2) != account:
            raise ValueError(f"{value!r} belongs to account {m.group(2)}, not {account}")
        return value


class AccountsSettings(_Model):
    """`[accounts]`: which accounts to inventory and how to get into them."""

    role_name: Annotated[str, AfterValidator(_role_name)] = "SnowballInventoryReader"
    external_id: Annotated[str, AfterValidator(_external_id)] = ""
    partition: Literal["aws", "aws-cn", "aws-us-gov"] = "aws"
    ids: tuple[AccountId, ...] = ()
    exclude: tuple[AccountId, ...] = ()
    organizations: OrganizationsSettings = OrganizationsSettings()
    list: tuple[AccountEntry, ...] = ()

    @field_validator("list")
    @classmethod
    def _once_each(cls, value: tuple[AccountEntry, ...]) -> tuple[AccountEntry, ...]:
        seen: set[str] = set()
        for i, entry in enumerate(value):
            if entry.id in seen:
                raise ValueError(
                    f"entry {i} names account {entry.id} again: list each account once "
                    "(which entry's role and external id would apply is not for us to guess)"
                )
            seen.add(entry.id)
        return value


class RegionsSettings(_Model):
    """`[regions]`: which regions to query; `us_strategy` "all" queries every US region and
    dedupes, "one" queries one US region per account (falling back to the next on failure)."""

    names: tuple[Region, ...] = ("all",)
    exclude: tuple[ExcludedRegion, ...] = ()
    us_strategy: Literal["all", "one"] = "all"

    @model_validator(mode="after")
    def _not_empty(self) -> RegionsSettings:
        if not self.names:
            raise ValueError("names: at least one region (or 'all') is required")
        return self


class LimitsSettings(_Model):
    """`[limits]`: how hard we may push the API, and how long we insist.

    `max_attempts` HTTP attempts per page in total; `timeout_seconds` per request;
    `max_restarts` restarts of one partition from its first page after InvalidNextToken;
    `partition_deadline_seconds` for one partition, retries included."""

    max_concurrency: int = Field(default=64, ge=1, le=10_000)
    requests_per_second: float = Field(default=5.0, ge=0.01, le=10_000)  # (1 per 100 s)
    max_attempts: int = Field(default=8, ge=1, le=100)
    timeout_seconds: float = Field(default=30.0, ge=0.01, le=3600)
    max_restarts: int = Field(default=5, ge=0, le=100)
    partition_deadline_seconds: float = Field(default=1800.0, gt=0, le=MAX_INTERVAL)  # (a week)


def _output_location(value: str) -> str:
    if value.startswith("s3://"):
        from .s3 import MAX_PREFIX, parse_s3_url

        _, prefix = parse_s3_url(value)  # its ValueError names the problem
        if len(prefix.encode()) > MAX_PREFIX:
            raise ValueError(f"the prefix of {value[:60]!r}... is longer than {MAX_PREFIX} bytes")
        return value
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ValueError(f"{value!r} holds a control character (a NUL, a newline...)")
    if _URL_LIKE.match(value):  # S3://b/p or s3:/b/p would be a local folder named "S3:"
        raise ValueError(f"{value!r} is neither a directory nor s3://bucket/prefix")
    if value.startswith("~"):
        # No shell reads a TOML value (nor a quoted flag): `~/snapshots` is the home
        # directory's, as a user means it, never a folder named "~" in the working directory.
        expanded = os.path.expanduser(value)
        if expanded.startswith("~"):
            user = value[1:].split("/", 1)[0]
            whose = f"user {user!r}" if user else "the current user"
            raise ValueError(f"{value!r}: '~' cannot be expanded: no home directory for {whose}")
        return expanded
    return value


def check_output_location(value: str, *, flag: str = "--output") -> str:
    """Check an output location given on the command line exactly as `output.directory` is
    checked; `ConfigError` naming `flag` and the same problem if it is malformed."""
    if not value:
        raise ConfigError(flag, "", "must not be empty")
    try:
        return _output_location(value)
    except ValueError as exc:
        raise ConfigError(flag, "", str(exc)) from None


class OutputSettings(_Model):
    """`[output]`: where snapshots go (a directory or `s3://bucket/prefix`), how many are kept,
    and whether data and change files are gzip-compressed."""

    directory: Annotated[str, AfterValidator(_output_location)] = Field(
        default="var/snapshots", min_length=1
    )
    retain: int = Field(default=96, ge=1)
    compress: Literal["none", "gzip"] = "none"


class DaemonSettings(_Model):
    """`[daemon]`: the refresh interval, the health/metrics listener, how long a running cycle
    may take to finish after SIGTERM (`shutdown_deadline`), and the random delay added to each
    wait, as a fraction of the interval (`jitter`)."""

    interval: Interval = 900.0
    listen: Annotated[str, AfterValidator(_listen)] = "127.0.0.1:9464"
    shutdown_deadline: Deadline = 30.0
    jitter: float = Field(default=0.05, ge=0, le=0.5)


class LoggingSettings(_Model):
    """`[logging]`."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console", "auto"] = "auto"


class PartitionSettings(_Model):
    """`[partitions.<name>]`: hub credentials for a partition other than the default chain's
    (aws-cn and aws-us-gov are separate worlds with their own credentials)."""

    profile: str | None = None


def _partitions_used(accounts: AccountsSettings) -> set[str]:
    """The AWS partitions of the accounts that will be asked (as `accounts.static_accounts`
    picks them: excluded ids left out, a `list` entry before the same id in `ids`): its role
    ARN's for a `list` entry that has one, else `accounts.partition`, which discovery uses
    too (the hub's)."""
    excluded = set(accounts.exclude)
    listed = {entry.id for entry in accounts.list}
    partitions: set[str] = set()
    if accounts.organizations.enabled or any(
        i not in excluded and i not in listed for i in accounts.ids
    ):
        partitions.add(accounts.partition)
    for entry in accounts.list:
        if entry.id not in excluded:
            m = _ROLE_ARN_RE.fullmatch(entry.role_arn or "")
            partitions.add(m.group(1) if m else accounts.partition)
    return partitions


class Settings(_Model):
    """The whole configuration; every section has documented defaults."""

    accounts: AccountsSettings = AccountsSettings()
    partitions: dict[Literal["aws", "aws-cn", "aws-us-gov"], PartitionSettings] = {}
    regions: RegionsSettings = RegionsSettings()
    limits: LimitsSettings = LimitsSettings()
    output: OutputSettings = OutputSettings()
    daemon: DaemonSettings = DaemonSettings()
    logging: LoggingSettings = LoggingSettings()
    source: str = Field(default="<defaults>", exclude=True)
    # {dotted key: variable} of the environment overrides applied when loading (see
    # `settings_from_mapping`); None for settings made otherwise (`key_source` then looks).
    _origins: dict[str, str] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _some_accounts(self) -> Settings:
        a = self.accounts
        if not (a.ids or a.list or a.organizations.enabled):
            raise ValueError(
                "accounts: no accounts configured "
                "(set accounts.ids, accounts.list or accounts.organizations.enabled)"
            )
        # An empty plan would publish an empty snapshot as complete: every job removed.
        named = {*a.ids, *(e.id for e in a.list)}
        if not a.organizations.enabled and named <= set(a.exclude):
            raise ValueError("accounts: accounts.exclude excludes every configured account")
        # Nor may the accounts of one AWS partition get no region at all: their jobs would be
        # in no snapshot (and reported removed).
        empty = sorted(p for p in _partitions_used(a) if not select_regions(self.regions, p))
        if empty:
            raise ValueError(
                f"regions: names and exclude leave no Snowball region of {' or '.join(empty)}, "
                "where configured accounts are"
            )
        return self


def _tuples(value: Any) -> Any:
    """TOML arrays become tuples so the tree is immutable all the way down."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _env_value(raw: str, *, text: bool = False) -> Any:
    """The value of an override: parsed as a TOML value, else the string as given; for a
    `text` setting, also the string as given when it parses as something else (an
    `external_id` or a role name of digits, a folder named `2024`)."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return raw
    return raw if text and not isinstance(value, str) else value


def _is_text(path: Sequence[str]) -> bool:
    """Whether the setting at `path` takes a string (`str`, optional or annotated)."""
    ann: Any = Settings
    for part in path:
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            field = ann.model_fields.get(part)
            if field is None:
                return False
            ann = field.annotation
        elif get_origin(ann) in (dict, Mapping):
            ann = get_args(ann)[1]
        else:
            return False
        while get_origin(ann) is Annotated:
            ann = get_args(ann)[0]
        if get_origin(ann) in (Union, UnionType):
            kinds = [a for a in get_args(ann) if a is not type(None)]
            ann = kinds[0] if len(kinds) == 1 else None
    return ann is str


def _env_paths(env: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """(variable name, key path) of every override in `env`, in the order they apply."""
    out = []
    for name in sorted(env):
        if name.startswith(ENV_PREFIX):
            path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
            if len(path) > 1 and path[0] == "partitions":  # a variable name has no "-"
                path[1] = path[1].replace("_", "-")  # PARTITIONS__AWS_CN__...: aws-cn
            if not path:  # a typo that would set nothing, silently
                raise ConfigError(
                    _env_source(name),
                    "",
                    f"names no setting (write {ENV_PREFIX}<SECTION>__<KEY>, e.g. "
                    f"{ENV_PREFIX}LIMITS__MAX_CONCURRENCY)",
                )
            out.append((name, path))
    return out


def _env_source(name: str) -> str:
    return f"{name} (environment)"


def _overrides(key: str, overridden: str) -> bool:
    """Whether an override of the dotted key `overridden` set the value at `key`."""
    return key == overridden or key.startswith((overridden + ".", overridden + "["))


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Apply overrides in place; returns {dotted key: variable name} for error messages: the
    keys set, and the tables an override created (whatever is wrong inside one came from the
    environment, not from the file)."""
    origins: dict[str, str] = {}
    for name, path in _env_paths(env):
        node = data
        for depth, part in enumerate(path[:-1], start=1):
            if part not in node:
                node[part] = {}
                origins.setdefault(_key_path(tuple(path[:depth])), name)
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(
                    _env_source(name), _key_path(tuple(path)), f"{part!r} is not a table"
                )
            node = child
        node[path[-1]] = _env_value(env[name], text=_is_text(path))
        key = _key_path(tuple(path))
        origins.pop(key, None)  # keep the dict in the order the overrides were applied
        origins[key] = name
    return origins


def key_source(settings: Settings, key: str, *, env: Mapping[str, str] | None = None) -> str:
    """Where the value of the dotted `key` came from, for an error found after loading (such
    as `daemon.listen` that cannot be bound): the environment variable that set it, as in
    validation errors, else `settings.source`. For settings loaded by `settings_from_mapping`,
    the overrides it applied; for others, those `env` (default `os.environ`) would apply."""
    origin = None
    if settings._origins is not None:
        for overridden, name in settings._origins.items():  # in the order applied
            if _overrides(key, overridden):
                origin = name
        return _env_source(origin) if origin else settings.source
    for name, path in _env_paths(os.environ if env is None else env):
        if _overrides(key, _key_path(tuple(path))):
            origin = name  # the last one applied wins
    return _env_source(origin) if origin else settings.source


def output_origin(settings: Settings, flag: str | None = None) -> str:
    """Where the output location was given, to start its errors with: the command-line
    `flag` when it was, else `<file or variable>: output.directory` (see `key_source`)."""
    if flag is not None:
        return flag
    return f"{key_source(settings, 'output.directory')}: output.directory"


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue  # pydantic's marker for "the key of this mapping" (already in the path)
        elif not (part.startswith(("function-", "tagged-union")) and "[" in part):
            if not _BARE_KEY_RE.fullmatch(part):
                # TOML quoted keys may hold anything; show them escaped, on one line.
                part = '"' + part.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
            out += f".{part}" if out else part
    return out


def _model_for(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return model
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann, *(inner or ())]
        nxt = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if nxt is None:
            return model
        model = nxt
    return model


def _problem(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    loc = err["loc"]
    value = err.get("input")
    if kind == "extra_forbidden":
        model = _model_for(loc[:-1])
        known = sorted(model.model_fields) if model else []
        known = [k for k in known if k != "source"]
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; known keys: {', '.join(known)}"
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind in {"value_error", "assertion_error"}:
        return msg
    if type(value) is float and not math.isfinite(value):  # not "less than 10000, got nan"
        return f"{value!r} is not a finite number"
    shown = repr(value)
    # A shared secret of sorts: the type of the value is enough to say, whether the value is
    # the external id or a table (or text) that holds one.
    if "external_id" in loc or "external_id" in shown:
        return f"{msg[0].lower()}{msg[1:]}, got a value of type {type(value).__name__}"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{msg[0].lower()}{msg[1:]}, got {shown}"


def settings_from_mapping(
    data: Mapping[str, Any], *, source: str = "<config>", env: Mapping[str, str] | None = None
) -> Settings:
    """Validate an already-parsed TOML document (plus environment overrides) into `Settings`."""
    doc = dict(data)
    origins = _apply_env(doc, env or {})
    if "source" in doc:  # the field that records where settings came from is no setting
        origin = origins.get("source")
        raise ConfigError(_env_source(origin) if origin else source, "source", "unknown key")
    try:
        settings = Settings.model_validate({**_tuples(doc), "source": source})
        settings._origins = origins
        return settings
    except RecursionError:
        raise ConfigError(source, "", "nested too deeply") from None
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        key = _key_path(first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        problem = _problem(first)
        # A check across keys names its key first ("regions: ...", or "names: ..." in the
        # regions table).
        head, _, rest = problem.partition(": ")
        if rest and head.isidentifier():
            key, problem = (f"{key}.{head}" if key else head), rest
        # The last override applied that covers the key (a table, then a key inside it); for
        # a check across keys, the last override of a key that check reads.
        origin = None
        for overridden, name in origins.items():
            if _overrides(key, overridden):
                origin = name
        if origin is None:
            for overridden, name in origins.items():
                if any(_overrides(overridden, read) for read in _CHECK_READS.get(key, ())):
                    origin = name
        return_source = _env_source(origin) if origin else source
        raise ConfigError(return_source, key, problem + more) from None


# The keys each check across keys (see Settings._some_accounts, RegionsSettings) reads.
_ACCOUNT_KEYS = (
    "accounts.ids",
    "accounts.list",
    "accounts.exclude",
    "accounts.organizations",
    "accounts.partition",
)
_CHECK_READS: dict[str, tuple[str, ...]] = {
    "accounts": _ACCOUNT_KEYS,
    "regions": ("regions.names", "regions.exclude", *_ACCOUNT_KEYS),
    "regions.names": ("regions.names",),
}


def check_aws_config(settings: Settings, *, env: Mapping[str, str] | None = None) -> None:
    """Raise `ConfigError` (one line) if an AWS profile the run would use does not exist, or
    the AWS config file does not parse; botocore would raise it mid-run otherwise.

    Checked: the `[partitions.<name>] profile` of every partition that has accounts, the
    default credential chain (`AWS_DEFAULT_PROFILE`, `AWS_PROFILE`, `AWS_CONFIG_FILE`), which
    the member accounts' sessions read whatever the hub's profile, and the endpoint URLs of
    the services the run calls (`check_endpoints`). `env` defaults to `os.environ` (for
    naming the variable to blame).
    """
    import botocore.session
    from botocore.exceptions import ConfigParseError, ProfileNotFound

    env = os.environ if env is None else env
    used = _partitions_used(settings.accounts)
    checks: list[tuple[str, str, str | None]] = [
        (
            key_source(settings, f"partitions.{name}.profile", env=env),
            f"partitions.{name}.profile",
            p.profile,
        )
        for name, p in sorted(settings.partitions.items())
        if p.profile and name in used
    ]
    # The default chain: the member accounts' sessions read its profile whatever the hub's.
    variable = next(
        (v for v in ("AWS_DEFAULT_PROFILE", "AWS_PROFILE", "AWS_CONFIG_FILE") if env.get(v)),
        None,  # (botocore reads AWS_DEFAULT_PROFILE first)
    )
    checks.append((_env_source(variable) if variable else "AWS config file", "", None))
    for source, key, profile in checks:
        try:
            botocore.session.Session(profile=profile).get_scoped_config()
        except (ProfileNotFound, ConfigParseError) as exc:
            raise ConfigError(source, key, str(exc)) from None
    check_endpoints(settings)


def check_endpoints(settings: Settings | None, *, output: str | None = None) -> None:
    """Raise `ConfigError` (one line) if the endpoint URL configured for a service the run
    calls is one botocore refuses (it raises "Invalid endpoint" as it creates each client, and
    every partition fails) or not http(s) (`ftp://...`: botocore takes it, aiohttp cannot).

    The URL is the one botocore picks, in its documented order: `AWS_ENDPOINT_URL_<SERVICE>`,
    `AWS_ENDPOINT_URL`, the profile's `services` section, the profile's `endpoint_url`; none
    when `ignore_configured_endpoint_urls` is set (variable or profile). Per profile that makes
    the clients: the default chain's for Snowball (the member accounts' sessions), each used
    partition's hub (`[partitions.<name>] profile`) for STS and Organizations, the configured
    partition's hub for an S3 `output` (default `output.directory`; with `settings` None, the
    default chain's, for that location alone). The value is not quoted: a URL may carry
    credentials.
    """
    import botocore.session
    from botocore.exceptions import ConfigParseError, ProfileNotFound

    wanted: dict[str | None, set[str]] = {}
    hub = None
    if settings is not None:
        wanted[None] = {"snowball"}
        calls = {"sts"} | ({"organizations"} if settings.accounts.organizations.enabled else set())
        for name in _partitions_used(settings.accounts):
            wanted.setdefault(_hub_profile(settings, name), set()).update(calls)
        output = output or settings.output.directory
        hub = _hub_profile(settings, settings.accounts.partition)
    if output and output.startswith("s3://"):
        wanted.setdefault(hub, set()).add("s3")
    for profile, services in wanted.items():
        session = botocore.session.Session(profile=profile)
        # The file and profile botocore reads: the default chain's profile may come from
        # AWS_PROFILE or AWS_DEFAULT_PROFILE (it read "profile default" whatever they said).
        config_file = os.path.expanduser(str(session.get_config_variable("config_file")))
        where = f"{config_file} (profile {profile or session.profile or 'default'})"
        try:
            if session.get_config_variable("ignore_configured_endpoint_urls"):
                continue
            scoped = session.get_scoped_config()
        except (ProfileNotFound, ConfigParseError) as exc:  # (`diff` loads no settings first)
            raise ConfigError(where, "", str(exc)) from None
        for service in sorted(services):
            source, url = _configured_endpoint(service, session, scoped, where)
            if url and not _endpoint_url_ok(url):
                raise ConfigError(
                    source, "", "not an endpoint URL (expected http(s)://host[:port])"
                )


def _endpoint_url_ok(url: str) -> bool:
    """Whether botocore (and aiohttp, which speaks http and https only) takes `url` as an
    endpoint; botocore's own checks raise ValueError for an unclosed `[` (a bad IPv6 host)."""
    from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

    if not url.lower().startswith(("http://", "https://")):
        return False
    try:
        return bool(is_valid_endpoint_url(url) or is_valid_ipv6_endpoint_url(url))
    except ValueError:
        return False


def _configured_endpoint(
    service: str, session: Any, scoped: Mapping[str, Any], where: str
) -> tuple[str, str | None]:
    """(where it was set, the endpoint URL) botocore would take for `service`, in its order;
    the profile's `services` section is read only when no variable gave one (botocore
    refuses a missing section only then)."""
    for variable in (f"AWS_ENDPOINT_URL_{service.upper()}", "AWS_ENDPOINT_URL"):
        if os.environ.get(variable):
            return _env_source(variable), os.environ[variable]
    if "services" in scoped:
        section = session.full_config.get("services", {}).get(scoped["services"])
        if not section or not isinstance(section, dict):  # botocore refuses an empty one too
            raise ConfigError(where, "services", f"no [services {scoped['services']}] section")
        entry = section.get(service)
        url = entry.get("endpoint_url") if isinstance(entry, dict) else None
        if url:
            return f"{where}: services.{service}.endpoint_url", url
    return f"{where}: endpoint_url", scoped.get("endpoint_url")


def _hub_profile(settings: Settings, partition: str) -> str | None:
    """The profile of `partition`'s hub (`[partitions.<name>] profile`), None: the default."""
    return next((p.profile for n, p in settings.partitions.items() if n == partition), None) or None


def load_settings(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
) -> Settings:
    """Read, parse and validate the TOML file at `path`, and the AWS profiles it will use
    (`check_aws_config`); raise `ConfigError` with one line.

    `env` defaults to `os.environ`; only variables starting with `SNOWBALL_AGGREGATOR_` count.
    """
    p = Path(path)
    name = str(path)
    if not name:  # Path("") is the working directory
        raise ConfigError("--config", "", "must not be empty")
    try:
        with p.open("rb") as fh:  # (a pipe too: `--config <(envsubst < template)`)
            raw = fh.read(MAX_CONFIG_BYTES + 1)  # bounded: /dev/zero has no end
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(name, "", f"larger than {MAX_CONFIG_BYTES // 1024} KiB")
        text = raw.decode("utf-8-sig")  # a byte order mark (Windows editors) is fine
    except FileNotFoundError:
        raise ConfigError(name, "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(name, "", "is a directory, not a TOML file") from None
    except PermissionError:
        raise ConfigError(name, "", "permission denied") from None
    except UnicodeDecodeError:
        raise ConfigError(name, "", "not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read: {exc.strerror or type(exc).__name__}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(name, "", f"invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(name, "", "invalid TOML: nested too deeply") from None
    settings = settings_from_mapping(data, source=name, env=os.environ if env is None else env)
    check_aws_config(settings, env=env)
    return settings
