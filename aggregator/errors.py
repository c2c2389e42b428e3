"""The one exception tree of snowball-aggregator, and the one place AWS errors are translated.

```
AggregatorError
├── ConfigError                 bad configuration: file, key path, problem (exit code 2)
├── OutputError                 the output directory cannot be written or read (exit code 2)
└── AwsError                    one AWS call failed; carries account, region, operation, code
    ├── RetryableError          worth another attempt after a backoff
    │   ├── ThrottledError      ThrottlingException and friends
    │   └── TransientError      HTTP 5xx, connection reset, read timeout, torn or malformed body
    ├── CredentialsExpiredError ExpiredTokenException: refresh the account's credentials once
    ├── InvalidNextTokenError   the pagination chain is broken: restart the partition
    ├── AccessDeniedError       AssumeRole or ListJobs denied
    ├── RegionNotEnabledError   an opt-in region the account has not enabled ("skipped")
    └── ClientFailureError      any other client error: the request itself is wrong
```

`translate()` is the only function that looks inside botocore and aiohttp exceptions. Messages
never contain credentials: botocore error messages are built from the service's response body,
and we add only account, region, operation and code. A service's message can echo the request
(a signature mismatch quotes the canonical request, session token included, and an incomplete
signature the Authorization header), so `AwsError` drops everything from the quoted canonical
request on and masks any session token or signature left in the text.
"""

from __future__ import annotations

import asyncio
import errno
import re
import urllib.parse
from typing import Any

import aiohttp
import botocore.exceptions
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    ProfileNotFound,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.parsers import ResponseParserError

__all__ = [
    "UNRECOGNIZED_KEYS",
    "AccessDeniedError",
    "AggregatorError",
    "AwsError",
    "ClientFailureError",
    "ConfigError",
    "CredentialsExpiredError",
    "InvalidNextTokenError",
    "OutputError",
    "RegionNotEnabledError",
    "RetryableError",
    "ThrottledError",
    "TransientError",
    "redact",
    "remember_secrets",
    "translate",
    "unsent",
    "watch_signed_tokens",
    "wrong_location",
]


class AggregatorError(Exception):
    """Base of every error this package raises on purpose."""


_MAX_PROBLEM = 400


class ConfigError(AggregatorError):
    """The configuration is invalid; `str()` is one line: `file: key: problem`."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = " ".join(source.split())  # a path or variable with a newline in it
        self.key = key
        # One line, whatever the cause said; a value quoted back (an output location that is
        # no location at all, say) keeps no credentials.
        problem = redact(" ".join(problem.split()))
        if len(problem) > _MAX_PROBLEM:  # a value quoted in full could be megabytes long
            problem = problem[: _MAX_PROBLEM - 3] + "..."
        self.problem = problem
        super().__init__(
            f"{self.source}: {key}: {self.problem}" if key else f"{self.source}: {self.problem}"
        )


class OutputError(AggregatorError):
    """The output location cannot be written (permissions, disk full, not a directory).

    `transient` is True for failures a later attempt may not see (S3 answering 5xx or SlowDown
    after botocore's retries, the endpoint unreachable): the CLI then exits 1, as for any run
    that could not make its snapshot, instead of 2 (a location that is wrong)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# Where a signature-mismatch message starts quoting the request (canonical request, then the
# string to sign); and a session token or a signature anywhere else in a message.
_ECHOED_REQUEST = re.compile(
    r"\s*The (?:Canonical String|String-to-Sign)[^\n]* should have been.*",
    re.IGNORECASE | re.DOTALL,
)
# A header's value follows its name after a colon or "=", quoted or not (JSON, escaped JSON,
# a dict's repr, HTML-escaped JSON), or in the next cell of an HTML table (a proxy's block page
# quoting the request); a header list such as SignedHeaders=...;x-amz-security-token has none
# of these. A signature is hex; a Credential's access key id ends at the "/" of its scope.
_QUOTE = r"(?:\\?[\"']|&quot;|&#0?39;)?"
_SIGNED_VALUES = (
    re.compile(
        r"(x-amz-security-token"
        + _QUOTE
        + r"\s*(?:[:=]|(?:\s*</[a-z]+>)*\s*<[a-z]+[^>]*>)\s*"
        + _QUOTE
        + r")[^\s,;&'\"<\\]+",
        re.IGNORECASE,
    ),
    # A credentials document quoted whole (a refresh whose answer did not parse: STS's XML,
    # the JSON of a credential process, a container or IMDS; a profile's ini lines).
    re.compile(
        r"((?<![\w-])(?:aws_)?(?:secret_?access_?key|session_?token|token)"
        + _QUOTE
        + r"\s*(?:[:=]|>)\s*"
        + _QUOTE
        + r")[^\s,;&'\"<\\]+",
        re.IGNORECASE,
    ),
    re.compile(r"(Signature\s*=\s*)[0-9a-f]{16,}", re.IGNORECASE),
    re.compile(r"(Credential\s*=\s*)[^\s,;&'\"<\\/]+", re.IGNORECASE),
)
# An access key id wherever it appears (AKIA: long-term, ASIA: temporary).
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
# A URL's user info: a name (a token) without "/", or `user:password` up to the last "@" (the
# user may be an e-mail address, the password hold "@" or, as a secret access key may, an
# unencoded "/"); never past a space, a quote or a comma (a URL without credentials, then an
# address elsewhere in the message). A path that holds "@" (`s3://bucket/snap@v1`) is not user
# info.
_URL_CREDENTIALS = re.compile(
    r"(\b[a-z][a-z0-9+.-]*://)(?:[^\s\"',<>/:]*:[^\s\"',<>]*|[^\s\"',<>/]*)@", re.IGNORECASE
)


def wrong_location(exc: OutputError) -> bool:
    """Whether `exc` says the output location itself is wrong, so that no later attempt can
    write it as configured: a path through a file, a folder without permission or on a
    read-only file system; a bucket that does not exist or denies the credentials. Not a
    full disk, an I/O error, S3 unreachable or answering 5xx, or credentials not available
    yet: those may pass (the daemon keeps trying them, see service.py)."""
    cause = exc.__cause__
    while isinstance(cause, OutputError):
        cause = cause.__cause__
    if isinstance(cause, ClientError):
        return str(cause.response.get("Error", {}).get("Code")) in _WRONG_LOCATION_CODES
    if isinstance(cause, OSError) and not isinstance(cause, ConnectionError | TimeoutError):
        return cause.errno in _WRONG_LOCATION_ERRNOS
    return False


_WRONG_LOCATION_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "NoSuchBucket",
        "PermanentRedirect",
        "SignatureDoesNotMatch",
    }
)
_WRONG_LOCATION_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EEXIST,
        errno.EISDIR,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.ENOTDIR,
        errno.EPERM,
        errno.EROFS,
    }
)


def remember_secrets(*values: str | None) -> None:
    """Note secrets this process signs with (a secret access key, a session token), so that
    `redact` masks them wherever a message quotes them, in whatever words ("invalid token
    '...'", a JSON list of headers...), whole or cut short: the patterns above know only the
    usual forms.

    Only their first 16 characters are kept, at most `_MAX_SECRETS` of them, the oldest
    forgotten first (a daemon renews every account's keys each hour; the newest are in use)."""
    for value in values:
        if value and len(value) >= _SECRET_PREFIX:
            prefix = value[:_SECRET_PREFIX]
            _SECRETS.pop(prefix, None)  # (now the newest)
            _SECRETS[prefix] = None
            if len(_SECRETS) > _MAX_SECRETS:
                del _SECRETS[next(iter(_SECRETS))]


def watch_signed_tokens(session: Any) -> None:
    """Have `remember_secrets` note the session token of every request botocore signs for
    clients made from `session` afterwards (a token goes out with each request, so a service
    or a proxy may quote it back; a secret key never does). Registered last, after botocore's
    own signer; once per session."""
    session.get_component("event_emitter").register_last(
        "request-created", _remember_signed_token, unique_id="snowball-remember-token"
    )


def _remember_signed_token(request: Any, **_: Any) -> None:
    token = request.headers.get("X-Amz-Security-Token")
    if token:
        remember_secrets(token if isinstance(token, str) else token.decode("ascii", "replace"))


_SECRET_PREFIX = 16
_MAX_SECRETS = 1 << 15
_SECRETS: dict[str, None] = {}  # first characters of the secrets, oldest first
# A run of base64 characters, in which a secret quoted back lies, at its start or after what
# it was glued to ("token=..."), as it is, URL-encoded ("%2F") or JSON-escaped ("\\/").
_SECRET_RUN = re.compile(r"(?:[A-Za-z0-9+/=]|%[0-9A-Fa-f]{2}|\\/){16,}")


def _mask_known_secrets(message: str) -> str:
    def masked(run: re.Match[str]) -> str:
        text = run[0]
        for start in range(len(text) - _SECRET_PREFIX + 1):
            if text[start : start + _SECRET_PREFIX] in _SECRETS:
                return text[:start] + "<redacted>"  # to the end of the run: cut short or not
        if "%" in text or "\\" in text:  # its first characters encoded: the whole run goes
            plain = urllib.parse.unquote(text.replace("\\/", "/"))
            for start in range(len(plain) - _SECRET_PREFIX + 1):
                if plain[start : start + _SECRET_PREFIX] in _SECRETS:
                    return "<redacted>"
        return text

    return _SECRET_RUN.sub(masked, message)


def redact(message: str) -> str:
    """`message` without the parts of a request a service may echo that are secrets (the
    request quoted by a signature mismatch, session tokens, signatures, access key ids, and
    any secret `remember_secrets` was told of), nor the credentials of a URL
    (`https://user:secret@host`)."""
    if _SECRETS:
        message = _mask_known_secrets(message)
    message = _ECHOED_REQUEST.sub(" (the request the service quoted is withheld)", message)
    message = _URL_CREDENTIALS.sub(r"\1<redacted>@", message)
    for signed in _SIGNED_VALUES:
        message = signed.sub(r"\1<redacted>", message)
    return _ACCESS_KEY_ID.sub("<redacted>", message)


class AwsError(AggregatorError):
    """One AWS call failed.

    Attributes: `account_id`, `region`, `operation`, `code` (the AWS error code, or a name of
    ours for errors below HTTP such as `ConnectionReset`) and `detail` (the service's message).
    """

    def __init__(
        self,
        *,
        account_id: str,
        region: str,
        operation: str,
        code: str,
        detail: str = "",
    ) -> None:
        self.account_id = account_id
        self.region = region
        self.operation = operation
        self.code = code
        self.detail = " ".join(redact(detail).split())[:500]
        # AssumeRole is the account's, asked of STS in one region, and its failure fails
        # every partition of the account: "AssumeRole in 1111/us-east-1" read as the
        # partition's region on each of the others.
        where = (
            f"for {account_id} (STS in {region})"
            if operation == "AssumeRole"
            else f"in {account_id}/{region}"
        )
        super().__init__(
            f"{operation} {where} failed: {code}" + (f": {self.detail}" if self.detail else "")
        )


class RetryableError(AwsError):
    """A failure that a later attempt may not see."""


class ThrottledError(RetryableError):
    """The service asked us to slow down."""


class TransientError(RetryableError):
    """A server or network fault: 5xx, reset, timeout, torn or malformed body."""


class CredentialsExpiredError(AwsError):
    """The account's temporary credentials were rejected as expired."""


class InvalidNextTokenError(AwsError):
    """The NextToken was rejected (expired, or the list changed): restart from the first page."""


class AccessDeniedError(AwsError):
    """AssumeRole or ListJobs was denied."""


class RegionNotEnabledError(AwsError):
    """The region is an opt-in region that the account has not enabled."""


class ClientFailureError(AwsError):
    """Any other error: the request itself is wrong and retrying will not help."""


_THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
        "PriorRequestNotComplete",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
        "EC2ThrottledException",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "InternalFailure",
        "InternalError",
        "InternalServerError",
        "InternalServerException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "IDPCommunicationError",
    }
)
_EXPIRED_CODES = frozenset({"ExpiredToken", "ExpiredTokenException", "RequestExpired"})
_DENIED_CODES = frozenset(
    {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthorizationError"}
)
# What AWS answers when the caller's token is not valid in the region. In an opt-in region that
# the account has not enabled, this is how "region disabled" looks on the wire.
_TOKEN_INVALID_CODES = frozenset(
    {"UnrecognizedClientException", "InvalidClientTokenId", "AuthFailure", "OptInRequired"}
)
# Outside an opt-in region: the service does not recognise the keys themselves (revoked, or
# from an STS it no longer trusts), which new keys may cure (see fetch.py).
UNRECOGNIZED_KEYS = frozenset({"UnrecognizedClientException", "InvalidClientTokenId"})

# Regions that an account must opt in to (AWS "opt-in regions"); their token errors mean "skipped".
OPT_IN_REGIONS = frozenset(
    {
        "af-south-1",
        "ap-east-1",
        "ap-east-2",
        "ap-south-2",
        "ap-southeast-3",
        "ap-southeast-4",
        "ap-southeast-5",
        "ap-southeast-6",
        "ap-southeast-7",
        "ca-west-1",
        "eu-central-2",
        "eu-south-1",
        "eu-south-2",
        "il-central-1",
        "me-central-1",
        "me-south-1",
        "mx-central-1",
    }
)


# botocore's errors in finding or refreshing the caller's own credentials (a credential process
# or SSO session that fails, a profile that is incomplete): no request was sent, and only the
# operator can fix them. Their messages name the provider and what is wrong.
_CREDENTIAL_ERRORS = (
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.InfiniteLoopConfigError,
    botocore.exceptions.InvalidConfigError,
    botocore.exceptions.MetadataRetrievalError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.RefreshWithMFAUnsupportedError,
    botocore.exceptions.SSOError,
    botocore.exceptions.SSOTokenLoadError,
    botocore.exceptions.TokenRetrievalError,
    botocore.exceptions.UnauthorizedSSOTokenError,
    botocore.exceptions.UnknownCredentialError,
)
# The parameter's value in a ParamValidationError report, up to the limit that follows it: the
# value may be a secret (an external id), the parameter's name and the limit say enough.
_QUOTED_VALUE = re.compile(r", value: .*?(?=, valid )", re.S)


def _refused(exc: ParamValidationError) -> str:
    report = str(exc.kwargs.get("report") or "")
    lines = _QUOTED_VALUE.sub("", report).splitlines()
    return "refused before it was sent: " + "; ".join(line.strip() for line in lines)


_UNSENT = (NoCredentialsError, ProfileNotFound, ParamValidationError, *_CREDENTIAL_ERRORS)


def unsent(exc: BaseException) -> bool:
    """Whether botocore raised `exc` before the request went out: the caller's credentials
    could not be loaded, or a parameter was refused."""
    return isinstance(exc, _UNSENT)


def _broke(exc: BaseException) -> bool:
    """Whether a connection error is a connection broken under a request, rather than one that
    was never made. aiobotocore wraps aiohttp's exception (as `error`), and files a reset
    after connecting under EndpointConnectionError, as it does a refused connection."""
    if isinstance(exc, ConnectionClosedError):
        return True
    inner = exc.kwargs.get("error", exc) if isinstance(exc, BotoCoreError) else exc
    if isinstance(inner, aiohttp.ClientConnectorError):  # (a ClientOSError: asked first)
        return False
    return isinstance(
        inner,
        aiohttp.ClientOSError
        | aiohttp.ServerDisconnectedError
        | aiohttp.ClientPayloadError
        | ConnectionResetError
        | BrokenPipeError
        | ConnectionAbortedError,
    )


def translate(exc: BaseException, *, account_id: str, region: str, operation: str) -> AwsError:
    """Map a botocore/aiohttp exception to our tree; use as `raise translate(e, ...) from e`."""
    ctx: dict[str, Any] = {"account_id": account_id, "region": region, "operation": operation}
    if isinstance(exc, AwsError):
        return exc
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "Unknown")
        detail = str(error.get("Message") or "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _THROTTLE_CODES or status == 429:
            return ThrottledError(code=code, detail=detail, **ctx)
        if code in _EXPIRED_CODES:
            return CredentialsExpiredError(code=code, detail=detail, **ctx)
        if code == "InvalidNextTokenException":
            return InvalidNextTokenError(code=code, detail=detail, **ctx)
        if code in _DENIED_CODES:
            return AccessDeniedError(code=code, detail=detail, **ctx)
        if code in _TOKEN_INVALID_CODES:
            if code == "OptInRequired" or region in OPT_IN_REGIONS:
                return RegionNotEnabledError(code=code, detail=detail, **ctx)
            return AccessDeniedError(code=code, detail=detail, **ctx)
        if code in _TRANSIENT_CODES or status >= 500:
            return TransientError(code=code, detail=detail, **ctx)
        return ClientFailureError(code=code, detail=detail, **ctx)
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError | TimeoutError):
        return TransientError(code="Timeout", detail=type(exc).__name__, **ctx)
    if isinstance(exc, ResponseParserError | UnicodeDecodeError):
        # A torn body can end inside a multi-byte character; botocore lets that escape.
        return TransientError(code="MalformedResponse", detail="unparseable response body", **ctx)
    if isinstance(
        exc, BotoConnectionError | HTTPClientError | aiohttp.ClientError | ConnectionError
    ):
        # Below HTTP: "ConnectionReset" for a connection that broke under a request,
        # "ConnectionError" for one never made (refused, no such host, no route) or anything
        # else; the same on botocore's send and ours (aiohttp's exceptions).
        code = "ConnectionReset" if _broke(exc) else "ConnectionError"
        return TransientError(code=code, detail=type(exc).__name__, **ctx)
    if isinstance(exc, asyncio.IncompleteReadError):
        return TransientError(code="TruncatedBody", detail="response body ended early", **ctx)
    if isinstance(exc, NoCredentialsError):
        return AccessDeniedError(code="NoCredentials", detail="no hub credentials found", **ctx)
    if isinstance(exc, ProfileNotFound):  # a hub profile named in the config is not there
        return AccessDeniedError(code="ProfileNotFound", detail=str(exc), **ctx)
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return AccessDeniedError(code=type(exc).__name__, detail=str(exc), **ctx)
    if isinstance(exc, ParamValidationError):
        return ClientFailureError(code="ParamValidationError", detail=_refused(exc), **ctx)
    if isinstance(exc, BotoCoreError):
        return ClientFailureError(code=type(exc).__name__, detail=str(exc), **ctx)
    return ClientFailureError(code=type(exc).__name__, detail="unexpected error", **ctx)
