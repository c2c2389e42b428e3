"""Wire formats: JSON 1.1, Smithy RPC v2 CBOR and STS query XML (SigV4 is in sigv4.py).

Everything here is checked against botocore's own serializers and parsers
(``botocore/serialize.py``, ``botocore/parsers.py``): JSON 1.1 errors are
``{"__type": code, "message": ...}``, CBOR errors carry a Smithy shape id in ``__type``
(botocore keeps the part after ``#``), CBOR timestamps are tag 1 epoch seconds, and STS
errors are ``<ErrorResponse>`` documents in the STS namespace.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import escape

import cbor2
import orjson

__all__ = [
    "CBOR_CONTENT_TYPE",
    "CBOR_PATH_PREFIX",
    "JSON_CONTENT_TYPE",
    "ORGANIZATIONS_TARGET_PREFIX",
    "SNOWBALL_TARGET_PREFIX",
    "STS_NAMESPACE",
    "XML_CONTENT_TYPE",
    "ApiError",
    "assume_role_xml",
    "caller_identity_xml",
    "cbor_error",
    "cbor_model_path",
    "decode_cbor_params",
    "decode_json_params",
    "json_error",
    "list_accounts_json",
    "list_jobs_cbor",
    "list_jobs_json",
    "sts_error",
]

JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
CBOR_CONTENT_TYPE = "application/cbor"
XML_CONTENT_TYPE = "text/xml"
SNOWBALL_TARGET_PREFIX = "AWSIESnowballJobManagementService."
ORGANIZATIONS_TARGET_PREFIX = "AWSOrganizationsV20161128."
CBOR_PATH_PREFIX = "/service/AWSIESnowballJobManagementService/operation/"
STS_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
_SMITHY_NAMESPACE = "com.amazonaws.snowball#"


class ApiError(Exception):
    """An error answer: the code botocore will report, its message and HTTP status."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int = 400,
        *,
        sender: bool = True,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.sender = sender
        self.fields = fields or {}


def json_error(code: str, message: str, fields: Mapping[str, str] | None = None) -> bytes:
    """A JSON 1.1 error body; ``fields`` are modeled members such as ``Reason``."""
    return orjson.dumps({"__type": code, "message": message, **(fields or {})})


def cbor_error(code: str, message: str) -> bytes:
    """An RPC v2 CBOR error body (``__type`` is a Smithy shape id)."""
    return bytes(cbor2.dumps({"__type": _SMITHY_NAMESPACE + code, "message": message}))


def sts_error(code: str, message: str, request_id: str, *, sender: bool = True) -> bytes:
    """An STS (query protocol) error document."""
    kind = "Sender" if sender else "Receiver"
    return (
        f'<ErrorResponse xmlns="{STS_NAMESPACE}">\n'
        f"  <Error>\n    <Type>{kind}</Type>\n    <Code>{escape(code)}</Code>\n"
        f"    <Message>{escape(message)}</Message>\n  </Error>\n"
        f"  <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n"
    ).encode()


def _check_params(params: object) -> dict[str, object]:
    if not isinstance(params, dict):
        raise ApiError(
            "SerializationException", "Start of structure or map found where not expected."
        )
    return params


def decode_json_params(body: bytes) -> dict[str, object]:
    """The request parameters of a JSON 1.1 body."""
    if not body:
        return {}
    try:
        return _check_params(orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        raise ApiError("SerializationException", "Malformed JSON request body.") from exc


def decode_cbor_params(body: bytes) -> dict[str, object]:
    """The request parameters of an RPC v2 CBOR body."""
    if not body:
        return {}
    try:
        params = cbor2.loads(body)
    except (cbor2.CBORDecodeError, ValueError) as exc:
        raise ApiError("SerializationException", "Malformed CBOR request body.") from exc
    return _check_params(params)


def list_jobs_json(entries: bytes, next_token: str | None) -> bytes:
    """A ListJobs result; ``entries`` are comma-joined JSON ``JobListEntry`` objects."""
    if next_token is None:
        return b'{"JobListEntries":[' + entries + b"]}"
    return b'{"JobListEntries":[' + entries + b'],"NextToken":' + orjson.dumps(next_token) + b"}"


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes((major << 5 | value,))
    if value < 0x100:
        return bytes((major << 5 | 24, value))
    if value < 0x10000:
        return bytes((major << 5 | 25,)) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes((major << 5 | 26,)) + value.to_bytes(4, "big")
    return bytes((major << 5 | 27,)) + value.to_bytes(8, "big")


def _cbor_text(text: str) -> bytes:
    data = text.encode()
    return _cbor_head(3, len(data)) + data


_CBOR_ENTRIES_KEY = _cbor_text("JobListEntries")
_CBOR_TOKEN_KEY = _cbor_text("NextToken")


def list_jobs_cbor(entries: bytes, count: int, next_token: str | None) -> bytes:
    """A ListJobs result; ``entries`` are ``count`` concatenated CBOR maps."""
    items = _CBOR_ENTRIES_KEY + _cbor_head(4, count) + entries
    if next_token is None:
        return b"\xa1" + items
    return b"\xa2" + items + _CBOR_TOKEN_KEY + _cbor_text(next_token)


def list_accounts_json(entries: bytes, next_token: str | None) -> bytes:
    """An Organizations ListAccounts result from comma-joined JSON ``Account`` objects."""
    if next_token is None:
        return b'{"Accounts":[' + entries + b"]}"
    return b'{"Accounts":[' + entries + b'],"NextToken":' + orjson.dumps(next_token) + b"}"


def assume_role_xml(
    *,
    access_key_id: str,
    secret_access_key: str,
    session_token: str,
    expiration: str,
    assumed_role_id: str,
    arn: str,
    request_id: str,
) -> bytes:
    """An STS AssumeRole response document."""
    return (
        f'<AssumeRoleResponse xmlns="{STS_NAMESPACE}">\n'
        "  <AssumeRoleResult>\n"
        "    <AssumedRoleUser>\n"
        f"      <AssumedRoleId>{escape(assumed_role_id)}</AssumedRoleId>\n"
        f"      <Arn>{escape(arn)}</Arn>\n"
        "    </AssumedRoleUser>\n"
        "    <Credentials>\n"
        f"      <AccessKeyId>{access_key_id}</AccessKeyId>\n"
        f"      <SecretAccessKey>{secret_access_key}</SecretAccessKey>\n"
        f"      <SessionToken>{session_token}</SessionToken>\n"
        f"      <Expiration>{expiration}</Expiration>\n"
        "    </Credentials>\n"
        "  </AssumeRoleResult>\n"
        f"  <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n"
        "  </ResponseMetadata>\n"
        "</AssumeRoleResponse>\n"
    ).encode()


def caller_identity_xml(*, user_id: str, account: str, arn: str, request_id: str) -> bytes:
    """An STS GetCallerIdentity response document."""
    return (
        f'<GetCallerIdentityResponse xmlns="{STS_NAMESPACE}">\n'
        "  <GetCallerIdentityResult>\n"
        f"    <Arn>{escape(arn)}</Arn>\n"
        f"    <UserId>{escape(user_id)}</UserId>\n"
        f"    <Account>{account}</Account>\n"
        "  </GetCallerIdentityResult>\n"
        f"  <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n"
        "  </ResponseMetadata>\n"
        "</GetCallerIdentityResponse>\n"
    ).encode()


def cbor_model_path(tmp_dir: str | os.PathLike[str]) -> Path:
    """Write a snowball model that botocore resolves to RPC v2 CBOR; return the data path.

    The installed botocore prefers ``json`` for snowball. Put the returned directory first in
    the data loader's search path (``AWS_DATA_PATH``, or
    ``session.set_config_variable("data_path", str(path))`` before creating clients) and
    snowball clients speak ``smithy-rpc-v2-cbor``.
    """
    import botocore.session

    loader = botocore.session.get_session().get_component("data_loader")
    version = loader.determine_latest_version("snowball", "service-2")
    model = loader.load_service_model("snowball", "service-2", version)
    metadata = dict(model["metadata"])
    metadata["protocol"] = "smithy-rpc-v2-cbor"
    metadata["protocols"] = ["smithy-rpc-v2-cbor"]
    model = {**model, "metadata": metadata}
    root = Path(tmp_dir)
    target = root / "snowball" / version
    target.mkdir(parents=True, exist_ok=True)
    (target / "service-2.json").write_text(json.dumps(model), encoding="utf-8")
    paginators = loader.load_service_model("snowball", "paginators-1", version)
    (target / "paginators-1.json").write_text(json.dumps(paginators), encoding="utf-8")
    return root
