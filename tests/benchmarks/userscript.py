"""Baseline 1: the script a user writes today.

boto3, a ThreadPoolExecutor over accounts, AssumeRole per account, a paginator per (account,
region), dedupe by (account_id, job_id), JSON Lines. Nothing here is tuned: boto3's defaults
(legacy retry mode, a client and connection pool per region) are what such a script gets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from pathlib import Path
from typing import Any

import boto3

__all__ = ["run"]


def _account_jobs(account_id: str, regions: Sequence[str], role_name: str) -> list[Any]:
    sts = boto3.session.Session().client("sts")
    creds = sts.assume_role(
        RoleArn=f"arn:aws:iam::{account_id}:role/{role_name}",
        RoleSessionName="inventory-script",
    )["Credentials"]
    session = boto3.session.Session(
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
    )
    found = []
    for region in regions:
        client = session.client("snowball", region_name=region)
        for page in client.get_paginator("list_jobs").paginate():
            for job in page["JobListEntries"]:
                found.append((account_id, region, job))
    return found


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    value = value.astimezone(UTC)
    return f"{value:%Y-%m-%dT%H:%M:%S}.{value.microsecond // 1000:03d}Z"


def run(
    account_ids: Sequence[str],
    regions: Sequence[str],
    output: Path,
    *,
    role_name: str = "SnowballInventoryReader",
    workers: int = 32,
) -> int:
    """Inventory every job into `output` (JSON Lines); returns the number of requests made."""
    jobs: dict[tuple[str, str], dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_account_jobs, a, regions, role_name) for a in account_ids]
        for future in futures:
            for account_id, region, job in future.result():
                key = (account_id, job["JobId"])
                record = jobs.get(key)
                if record is None:
                    jobs[key] = record = {
                        "account_id": account_id,
                        "job_id": job["JobId"],
                        "job_state": job.get("JobState"),
                        "job_type": job.get("JobType"),
                        "snowball_type": job.get("SnowballType"),
                        "is_master": job.get("IsMaster"),
                        "creation_date": _iso(job.get("CreationDate")),
                        "description": job.get("Description"),
                        "regions": [],
                    }
                record["regions"].append(region)
    with open(output, "w", encoding="utf-8") as fh:
        for key in sorted(jobs):
            record = jobs[key]
            record["regions"] = sorted(record["regions"])
            fh.write(json.dumps(record, sort_keys=True) + "\n")
    return 0
