"""Errors: what AWS says reaches logs and manifests without the secrets it may echo."""

from __future__ import annotations

import botocore.session
import pytest
from botocore.exceptions import (
    ClientError,
    NoRegionError,
    ParamValidationError,
    UnauthorizedSSOTokenError,
)
from botocore.validate import ParamValidator

from aggregator.errors import AccessDeniedError, ClientFailureError, redact, translate

TOKEN = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQDexampletoken+/="
SIGNATURE = "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"


def _client_error(code: str, message: str, status: int = 400) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "ListJobs",
    )


# As AWS words them: a signature mismatch quotes the canonical request (session token
# included) and the string to sign; an incomplete signature quotes the Authorization header.
MISMATCH = (
    "The request signature we calculated does not match the signature you provided. Check your "
    "AWS Secret Access Key and signing method. Consult the service documentation for details.\n"
    "\nThe Canonical String for this request should have been\n'POST\n/\n\n"
    "content-type:application/x-amz-json-1.1\nhost:snowball.eu-west-1.amazonaws.com\n"
    f"x-amz-date:20261129T020000Z\nx-amz-security-token:{TOKEN}\n\n"
    "content-type;host;x-amz-date;x-amz-security-token\n"
    "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a'\n\n"
    "The String-to-Sign should have been\n'AWS4-HMAC-SHA256\n20261129T020000Z\n"
    "20261129/eu-west-1/snowball/aws4_request\n"
    "2b3b4f3c1d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a'\n"
)
INCOMPLETE = (
    "'Credential=ASIAEXAMPLEEXAMPLE/20261129/eu-west-1/snowball/aws4_request, "
    f"SignedHeaders=host;x-amz-date, Signature={SIGNATURE}' not a valid key=value pair "
    "(missing equal-sign) in Authorization header: 'AWS4-HMAC-SHA256 "
    "Credential=ASIAEXAMPLEEXAMPLE/20261129/eu-west-1/snowball/aws4_request, "
    f"Signature={SIGNATURE}'."
)


@pytest.mark.parametrize(
    ("code", "message", "kept"),
    [
        ("InvalidSignatureException", MISMATCH, "The request signature we calculated"),
        ("IncompleteSignatureException", INCOMPLETE, "not a valid key=value pair"),
        (
            "InvalidSignatureException",
            f"Signature expired; X-Amz-Security-Token={TOKEN}&X-Amz-Signature={SIGNATURE}",
            "Signature expired",
        ),
    ],
    ids=["canonical-request", "authorization-header", "query-form"],
)
def test_echoed_secrets_never_reach_the_error(code: str, message: str, kept: str) -> None:
    err = translate(
        _client_error(code, message), account_id="1", region="eu-west-1", operation="ListJobs"
    )
    text = str(err)
    assert isinstance(err, ClientFailureError)
    assert kept in text and kept in err.detail
    for secret in (TOKEN, TOKEN[:24], SIGNATURE, SIGNATURE[:24]):
        assert secret not in text
    assert "\n" not in text


def test_ordinary_messages_are_kept_whole() -> None:
    message = (
        "User: arn:aws:sts::111111111111:assumed-role/Reader/s is not authorized to perform: "
        "snowball:ListJobs with an explicit deny (Signature V4 is fine here)"
    )
    err = translate(
        _client_error("AccessDeniedException", message),
        account_id="1",
        region="eu-west-1",
        operation="ListJobs",
    )
    assert isinstance(err, AccessDeniedError)
    assert err.detail == message


def test_a_request_botocore_refuses_names_the_parameters_and_never_their_values() -> None:
    """botocore checks parameters before it sends a request, and its report quotes their
    values (an external id among them): the error names each parameter and its limit only."""
    model = botocore.session.get_session().get_service_model("sts")
    params = {"RoleArn": "arn:aws:iam::1:role/R", "RoleSessionName": "s", "ExternalId": "q"}
    wrong_type = {**params, "ExternalId": 271828, "DurationSeconds": "900"}
    for given in (params, wrong_type):
        report = ParamValidator().validate(given, model.operation_model("AssumeRole").input_shape)
        assert report.has_errors()
        err = translate(
            ParamValidationError(report=report.generate_report()),
            account_id="1",
            region="eu-west-1",
            operation="AssumeRole",
        )
        assert isinstance(err, ClientFailureError) and err.code == "ParamValidationError"
        assert err.detail.startswith("refused before it was sent: Invalid ")
        assert "parameter ExternalId, valid " in err.detail
        assert "RoleSessionName, valid min length: 2" in err.detail
        assert "value" not in err.detail and "271828" not in err.detail and "\n" not in str(err)


def test_other_botocore_errors_keep_their_message() -> None:
    """A botocore error outside the AWS answers (no region, an SSO session that expired) says
    what botocore says, where it said "unexpected error"; the credential ones are access
    denied, as a missing profile is."""
    ctx = {"account_id": "1", "region": "eu-west-1", "operation": "AssumeRole"}
    err = translate(NoRegionError(), **ctx)
    assert isinstance(err, ClientFailureError) and err.detail == "You must specify a region."
    err = translate(UnauthorizedSSOTokenError(), **ctx)
    assert isinstance(err, AccessDeniedError) and err.code == "UnauthorizedSSOTokenError"
    assert "run aws sso login" in err.detail
    assert translate(KeyError("x"), **ctx).detail == "unexpected error"


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        (
            "via https://AKIAEXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@proxy:8080/x failed",
            "via https://<redacted>@proxy:8080/x failed",
        ),
        (
            "proxy https://user:hunter2@proxy.example/ down",
            "proxy https://<redacted>@proxy.example/ down",
        ),
        (
            '{"Endpoint":"http://minio:9000","Contact":"ops@example.com"}',
            '{"Endpoint":"http://minio:9000","Contact":"ops@example.com"}',
        ),
        ("s3://bucket/key and http://host/path, ops@example.com", None),
        ("S3://bucket/snap@v1 and https://host/x/y@z", None),  # paths holding `@`
        ("https://ghp_EXAMPLETOKEN@host/x", "https://<redacted>@host/x"),
        ("proxy https://user:p@ss/w0rd@proxy.example/", "proxy https://<redacted>@proxy.example/"),
        (  # an e-mail address for a user name, a "/" in the password
            "proxy http://ops@corp.example:pa/ss@proxy.example:3128/ refused",
            "proxy http://<redacted>@proxy.example:3128/ refused",
        ),
        # A proxy's or a stand-in endpoint's page quoting the request's headers (botocore makes
        # a body that is not JSON the whole message): as JSON, a dict, a table, escaped JSON.
        (
            'Blocked: {"X-Amz-Security-Token": "IQoJb3JpZ2luX2VjEXAMPLETOKEN"}',
            'Blocked: {"X-Amz-Security-Token": "<redacted>"}',
        ),
        (
            "{'x-amz-security-token': 'IQoJb3JpZ2luX2VjEXAMPLETOKEN'}",
            "{'x-amz-security-token': '<redacted>'}",
        ),
        (
            "<tr><td>X-Amz-Security-Token</td> <td>IQoJb3JpZ2luX2VjEXAMPLETOKEN</td></tr>",
            "<tr><td>X-Amz-Security-Token</td> <td><redacted></td></tr>",
        ),
        (
            "&quot;X-Amz-Security-Token&quot;: &quot;IQoJb3JpZ2luX2VjEXAMPLETOKEN&quot;",
            "&quot;X-Amz-Security-Token&quot;: &quot;<redacted>&quot;",
        ),
        # The access key id, in the Authorization header's Credential or on its own.
        (
            "Authorization: AWS4-HMAC-SHA256 Credential=ASIAIOSFODNN7EXAMPLE/20261129/us-east-1/"
            "snowball/aws4_request, SignedHeaders=host;x-amz-security-token, "
            "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
            "Authorization: AWS4-HMAC-SHA256 Credential=<redacted>/20261129/us-east-1/snowball/"
            "aws4_request, SignedHeaders=host;x-amz-security-token, Signature=<redacted>",
        ),
        ("key AKIAIOSFODNN7EXAMPLE is not valid", "key <redacted> is not valid"),
        (  # JSON inside a JSON string
            '{"Message": "{\\"x-amz-security-token\\": \\"IQoJb3JpZ2luX2VjEXAMPLETOKEN\\"}"}',
            '{"Message": "{\\"x-amz-security-token\\": \\"<redacted>\\"}"}',
        ),
        (  # STS's answer quoted whole (cut short, as a parse error quotes it)
            "Unable to parse response: <Credentials><AccessKeyId>ASIAIOSFODNN7EXAMPLE"
            "</AccessKeyId><SecretAccessKey>wJalr/XUtnFEMI+K7MDENG</SecretAccessKey>"
            "<SessionToken>IQoJb3JpZ2luX2Vj//+EXAMPLE",
            "Unable to parse response: <Credentials><AccessKeyId><redacted></AccessKeyId>"
            "<SecretAccessKey><redacted></SecretAccessKey><SessionToken><redacted>",
        ),
        (  # a container's or IMDS's JSON, a credential process's, a profile's lines
            '{"AccessKeyId": "ASIAIOSFODNN7EXAMPLE", "SecretAccessKey": "wJalr/XUtn+FEMI", '
            '"Token": "IQoJb3JpZ2lu/EXAMPLE=", "Expiration": "2026-11-29T15:00:00Z"}',
            '{"AccessKeyId": "<redacted>", "SecretAccessKey": "<redacted>", '
            '"Token": "<redacted>", "Expiration": "2026-11-29T15:00:00Z"}',
        ),
        (
            "aws_secret_access_key = wJalr/XUtn+FEMI\naws_session_token=IQoJb3JpZ2lu",
            "aws_secret_access_key = <redacted>\naws_session_token=<redacted>",
        ),
        # Naming the header, or a list of them, is no value.
        ("missing SessionToken", None),
        ("<code>SecretAccessKey</code> is required", None),
        ("NextToken: abc123 was not issued for this request", None),
        ("missing x-amz-security-token header", None),
        ("<code>x-amz-security-token</code> is required", None),
        ("Signature = mismatch", None),
        ("SignedHeaders=host;x-amz-date;x-amz-security-token", None),
    ],
)
def test_credentials_in_urls_are_redacted_and_nothing_else(message: str, shown: str | None) -> None:
    """A URL's credentials go (a secret key may hold an unencoded `/`), and so do a session
    token quoted in any of the forms a page echoing the request's headers uses and an access
    key id; a URL without credentials, an address after it and a header's name stay."""
    assert redact(message) == (shown if shown is not None else message)


def test_wrong_location_is_only_what_no_later_attempt_can_write() -> None:
    """A daemon stops at start only for a location that is wrong as configured (a bucket
    that does not exist or denies access, a path through a file, no permission, read-only);
    a full disk, an I/O error, S3 unreachable or 5xx, or credentials not there yet pass."""
    import errno

    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from aggregator.errors import OutputError, wrong_location

    def caused(cause: BaseException, *, wrapped: bool = False) -> OutputError:
        error = OutputError("loc: cannot write to the output location: ...")
        error.__cause__ = cause
        if wrapped:  # as Store.check_writable re-raises it with its origin
            outer = OutputError(f"run.toml: output.directory: {error}")
            outer.__cause__ = error
            return outer
        return error

    for code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId"):
        assert wrong_location(caused(_client_error(code, "", 403), wrapped=True)), code
    for code in ("SlowDown", "InternalError", "ExpiredToken"):
        assert not wrong_location(caused(_client_error(code, "", 503))), code
    for number in (errno.ENOTDIR, errno.EACCES, errno.EEXIST, errno.EROFS):
        assert wrong_location(caused(OSError(number, "x"), wrapped=True)), number
    for number in (errno.ENOSPC, errno.EIO, errno.ESTALE):
        assert not wrong_location(caused(OSError(number, "x"))), number
    assert not wrong_location(caused(ConnectionRefusedError(errno.EACCES, "refused")))
    assert not wrong_location(caused(EndpointConnectionError(endpoint_url="https://s3")))
    assert not wrong_location(caused(NoCredentialsError()))
    assert not wrong_location(OutputError("no cause"))


def test_remembered_secrets_are_masked_in_any_words_and_the_oldest_are_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The forms no pattern knows (a security review found them in manifests): the secret is
    masked to the end of its run, whole or cut short; other text stays. At most
    `_MAX_SECRETS` are remembered, the oldest forgotten first."""
    import base64
    import secrets
    from urllib.parse import quote

    from aggregator import errors
    from aggregator.errors import redact, remember_secrets

    token = "IQoJb3JpZ2luX2VjE" + base64.b64encode(secrets.token_bytes(300)).decode()
    key = base64.b64encode(secrets.token_bytes(30)).decode()
    remember_secrets(token, key, None, "short")
    for text in (
        f"denied for token {token}",
        f"SessionToken {token}",
        f"invalid token '{token}'",
        f"header x-amz-security-token was {token}",
        f'{{"X-Amz-Security-Token": ["{token}"]}}',
        f"The security token included in the request is invalid: {token[:40]}",
        f"see https://proxy/tokens/{token} and key={key}",
        f"denied for token {quote(token, safe='')}",  # URL-encoded: "/" and "+" as %2F, %2B
        '{"token": "' + token.replace("/", "\\/") + '"}',  # JSON that escapes "/"
        f"token=%22{quote(key, safe='')}%22",
    ):
        shown = redact(text)
        for secret in (token, key):
            for form in (secret, quote(secret, safe=""), secret.replace("/", "\\/")):
                assert form[:16] not in shown and form[-16:] not in shown, shown
        assert "<redacted>" in shown
    assert redact("arn:aws:iam::111111111111:role/org/platform/ReaderRole") == (
        "arn:aws:iam::111111111111:role/org/platform/ReaderRole"
    )
    monkeypatch.setattr(errors, "_MAX_SECRETS", 3)
    monkeypatch.setattr(errors, "_SECRETS", {})
    keys = [base64.b64encode(secrets.token_bytes(30)).decode() for _ in range(4)]
    remember_secrets(*keys)
    assert [redact(k) == "<redacted>" for k in keys] == [False, True, True, True]
