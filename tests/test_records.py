"""Records: API entries map to the snake_case record with nulls and verbatim enums."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from aggregator.records import JobEntry, JobRecord, iso_millis, iso_seconds


def test_entry_maps_fields_and_keeps_unknown_enums() -> None:
    """Unknown enum values survive verbatim; CreationDate becomes ISO UTC milliseconds."""
    entry = JobEntry.from_api(
        "111111111111",
        {
            "JobId": "JID1",
            "JobState": "SomeFutureState",
            "JobType": "IMPORT",
            "SnowballType": "V9_NEW",
            "IsMaster": False,
            "CreationDate": datetime(2016, 4, 14, 23, 56, 26, 3000, tzinfo=UTC),
            "Description": "MyJob",
        },
    )
    assert entry.job_state == "SomeFutureState"
    assert entry.snowball_type == "V9_NEW"
    assert entry.creation_date == "2016-04-14T23:56:26.003Z"
    assert entry.is_master is False


def test_absent_fields_are_null() -> None:
    """Fields the API left out are None, not dropped or defaulted."""
    entry = JobEntry.from_api("111111111111", {"JobId": "JID2"})
    assert (entry.job_state, entry.description, entry.is_master, entry.creation_date) == (
        None,
        None,
        None,
        None,
    )


def test_iso_millis_converts_to_utc() -> None:
    """A timestamp in another zone is rendered in UTC."""
    tz = timezone(timedelta(hours=2))
    assert (
        iso_millis(datetime(2026, 1, 1, 2, 0, 0, 999999, tzinfo=tz)) == "2026-01-01T00:00:00.999Z"
    )


def test_record_round_trips_through_json_dict() -> None:
    """A record read back from its JSON form is equal to the original."""
    record = JobRecord(
        account_id="111111111111",
        job_id="JID3",
        job_state="Complete",
        job_type="EXPORT",
        snowball_type="EDGE",
        is_master=True,
        creation_date="2020-01-01T00:00:00.000Z",
        description="ünïcødé 🚚",
        regions=("us-east-1", "us-west-2"),
        snapshot_id="20261128T150000Z-3f9c",
        observed_at="2026-11-28T15:00:03Z",
        last_seen="2026-11-28T15:00:03Z",
        stale=False,
    )
    assert JobRecord.from_json_dict(record.to_json_dict()) == record


def test_iso_seconds_converts_to_utc_and_pads() -> None:
    """UTC, an offset converted, a naive value taken as UTC; four-digit years."""
    instant = datetime(2026, 11, 28, 15, 0, 3, 999_999, tzinfo=UTC)
    assert iso_seconds(instant) == "2026-11-28T15:00:03Z"
    east = instant.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert iso_seconds(east) == "2026-11-28T15:00:03Z"
    assert iso_seconds(instant.replace(tzinfo=None)) == "2026-11-28T15:00:03Z"
    assert iso_seconds(datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC)) == "0999-01-02T03:04:05Z"
