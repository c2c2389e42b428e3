"""Schemas: the published JSON Schemas are valid, shipped, forward compatible, and everything
the end-to-end runs write (records, manifests, change events) validates against them."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from aggregator.records import SCHEMA_VERSION
from aggregator.sandbox import Faults
from aggregator.service import run_once
from aggregator.snapshot import load_schema

from .conftest import SandboxFactory, make_settings

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("record", "manifest", "change")


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(
        load_schema(name), format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def lines(body: bytes, path: str) -> Iterator[dict[str, Any]]:
    if path.endswith(".gz"):
        body = gzip.decompress(body)
    for line in body.splitlines():
        if line:
            yield orjson.loads(line)


def validate_location(files: dict[str, bytes]) -> Counter[str]:
    """Validate every record, manifest and change event of an output location given as
    {relative path: bytes}; returns how many of each (and of each event type) were checked."""
    record, manifest, change = (validator(n) for n in NAMES)
    seen: Counter[str] = Counter()
    for path, body in sorted(files.items()):
        if path.endswith(".manifest.json"):
            manifest.validate(orjson.loads(body))
            seen["manifest"] += 1
        elif path.startswith("snapshots/"):
            for item in lines(body, path):
                record.validate(item)
                seen["record"] += 1
        elif path.startswith("changes/"):
            for item in lines(body, path):
                change.validate(item)
                seen["change"] += 1
                seen[item["event"]] += 1
    return seen


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != "LATEST"
    }


@pytest.mark.parametrize("name", NAMES)
def test_schemas_are_valid_and_shipped_in_the_package(name: str) -> None:
    """Each schema is valid draft 2020-12 JSON Schema, installed as package data."""
    resource = importlib.resources.files("aggregator") / "schemas" / f"{name}.schema.json"
    schema = orjson.loads(resource.read_bytes())
    assert schema == load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    major = SCHEMA_VERSION.split(".")[0]
    assert schema["$id"].endswith(f":{name}:{major}"), "the $id names the major version"


def typed(node: dict[str, Any]) -> bool:
    return any(k in node for k in ("type", "$ref", "enum", "const", "oneOf", "anyOf"))


def walk(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        for key, value in node.get("properties", {}).items():
            yield f"{where}.{key}", value
            yield from walk(value, f"{where}.{key}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{where}[]")
        for key in ("oneOf", "anyOf", "allOf"):
            for i, sub in enumerate(node.get(key, ())):
                yield from walk(sub, f"{where}<{key}{i}>")


@pytest.mark.parametrize("name", NAMES)
def test_every_known_field_is_typed_and_new_fields_are_allowed(name: str) -> None:
    """Forward compatible: unknown fields are allowed everywhere, known ones all typed."""
    schema = load_schema(name)
    assert schema["additionalProperties"] is True
    untyped = [where for where, node in walk(schema) if not typed(node)]
    assert not untyped
    assert set(schema["required"]) == set(schema["properties"])


def test_schema_version_follows_the_compatibility_rule() -> None:
    """The manifest's schema_version is MAJOR.MINOR and its major is the schemas' major."""
    pattern = load_schema("manifest")["properties"]["schema_version"]["pattern"]
    assert re.fullmatch(pattern, SCHEMA_VERSION)


def test_a_record_from_a_newer_minor_version_still_validates() -> None:
    """A reader on 1.x accepts records with fields it does not know; wrong types fail."""
    good = {
        "account_id": "111111111111",
        "creation_date": "2016-04-14T23:56:26.003Z",
        "description": None,
        "is_master": False,
        "job_id": "JID1",
        "job_state": "SomeStateFromTheFuture",
        "job_type": "IMPORT",
        "last_seen": "2026-11-28T15:00:03Z",
        "observed_at": "2026-11-28T15:00:03Z",
        "regions": ["us-east-1"],
        "snapshot_id": "20261128T150000Z-3f9c",
        "snowball_type": "EDGE",
        "stale": False,
    }
    record = validator("record")
    record.validate({**good, "field_added_in_1_7": {"anything": [1, 2]}})
    for bad in (
        {**good, "stale": "no"},
        {**good, "account_id": "12345"},
        {**good, "observed_at": "yesterday"},
        {k: v for k, v in good.items() if k != "regions"},
    ):
        with pytest.raises(ValidationError):
            record.validate(bad)


def test_change_event_rules_are_in_the_schema() -> None:
    """A job_added has no from_state; a job_removed has no to_state; others name the
    previous snapshot."""
    base = {
        "account_id": "111111111111",
        "job_id": "JID1",
        "snapshot_id": "20261128T151500Z-bbbb",
        "previous_snapshot_id": "20261128T150000Z-aaaa",
        "observed_at": "2026-11-28T15:15:03Z",
        "previous_observed_at": "2026-11-28T15:00:03Z",
    }
    change = validator("change")
    base["from_state"] = "New"
    change.validate({**base, "event": "state_changed", "to_state": "Done"})
    change.validate({**base, "event": "job_from_1_3", "to_state": None})
    for bad in (
        {**base, "event": "job_added", "to_state": "New"},
        {**base, "event": "job_removed", "to_state": "New"},
        {**base, "previous_snapshot_id": None, "event": "state_changed", "to_state": "B"},
    ):
        with pytest.raises(ValidationError):
            change.validate(bad)


async def run_three(make_sandbox: SandboxFactory, settings_output: dict[str, Any], out: Any) -> Any:
    """Three runs that produce every kind of record and event: complete, partial (one account
    denied, jobs changed, added and removed), and complete again (recovery)."""
    regions = ("eu-west-1", "us-east-1", "us-west-2")
    sb = await make_sandbox(accounts=3, seed=13, max_jobs=8, regions=regions)
    settings = make_settings(
        sb.account_ids, regions={"names": list(regions)}, output=settings_output
    )
    await run_once(settings, **out)
    ok, failing = sb.account_ids[0], sb.account_ids[2]
    jobs = sorted(j["job_id"] for j in sb.truth() if j["account_id"] == ok)
    sb.set_job_state(ok, jobs[0], "BrandNewState")
    sb.remove_job(ok, jobs[1])
    sb.add_job(ok, "eu-west-1", description='quotes " and },{"account_id": look-alikes')
    sb.faults = dataclasses.replace(Faults(), deny_list_jobs=frozenset({failing}))
    second = await run_once(settings, **out)
    assert second.status == "partial" and second.stale > 0
    sb.faults = Faults()
    return await run_once(settings, **out)


async def test_everything_written_end_to_end_validates(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Every record, manifest and change event of three real runs validates, and the runs
    produced every event type."""
    await run_three(make_sandbox, {}, {"output": tmp_path})
    seen = validate_location(tree(tmp_path))
    assert seen["manifest"] == 3 and seen["record"] > 0
    for kind in ("job_added", "state_changed", "job_removed", "job_went_stale", "job_recovered"):
        assert seen[kind] > 0, kind


async def test_gzip_output_validates_too(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    """The same with `output.compress = "gzip"`: .jsonl.gz files, read transparently."""
    await run_three(make_sandbox, {"directory": str(tmp_path), "compress": "gzip"}, {})
    files = tree(tmp_path)
    assert files and not [p for p in files if p.endswith(".jsonl")]
    seen = validate_location(files)
    assert seen["manifest"] == 3 and seen["job_recovered"] > 0


def test_readme_links_the_schemas_and_states_the_rule() -> None:
    """The README points at the shipped schemas and states the compatibility rule."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in NAMES:
        assert f"aggregator/schemas/{name}.schema.json" in readme
    assert "schema_version" in readme and "major" in readme.lower()


def athena_columns(path: Path) -> list[str]:
    ddl = path.read_text(encoding="utf-8")
    table = ddl[ddl.index("CREATE EXTERNAL TABLE") :]
    body = table[table.index("(") + 1 : table.index("PARTITIONED BY")]
    return re.findall(r"^\s*`?(\w+)`?\s+\w", body.rsplit(")", 1)[0], flags=re.M)


@pytest.mark.parametrize(("ddl", "name"), [("jobs.sql", "record"), ("changes.sql", "change")])
def test_athena_tables_have_every_field_of_the_schema(ddl: str, name: str) -> None:
    """The Athena tables in deploy/athena/ declare exactly the schema's fields, partitioned by
    `date` like the files."""
    path = ROOT / "deploy" / "athena" / ddl
    assert sorted(athena_columns(path)) == sorted(load_schema(name)["properties"])
    text = path.read_text(encoding="utf-8")
    assert "PARTITIONED BY (`date` string)" in text
    assert "'projection.date.type' = 'date'" in text
