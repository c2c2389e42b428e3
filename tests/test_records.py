"""Records: API entries map to the snake_case record with nulls and verbatim enums."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aggregator import records
from aggregator.records import JobEntry, JobRecord, epoch_millis, iso_millis, iso_seconds


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


def test_string_members_that_hold_something_else_become_text() -> None:
    """A service out of its model (a number for a state, bytes for a description over CBOR):
    the entry holds text, which the snapshot can encode and its readers accept."""
    entry = JobEntry.from_api(
        "111111111111",
        {
            "JobId": 7,
            "JobState": 5,
            "JobType": True,
            "SnowballType": ["EDGE"],
            "Description": b"caf\xc3\xa9 \xff",
        },
    )
    assert entry.job_id == "7" and entry.job_state == "5" and entry.job_type == "true"
    assert entry.snowball_type == '["EDGE"]' and entry.description == "caf\u00e9 \ufffd"


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


def _through_datetime(value: float) -> str:
    return iso_millis(datetime.fromtimestamp(value, UTC))


_LAST_SECOND = 253402300799  # 9999-12-31T23:59:59Z


@settings(max_examples=2000, deadline=None)
@given(
    value=st.one_of(
        st.floats(min_value=0, max_value=_LAST_SECOND + 0.999),
        st.integers(min_value=0, max_value=_LAST_SECOND),
        # a whole second and a fraction close to a millisecond or microsecond boundary
        st.tuples(
            st.integers(min_value=0, max_value=4_102_444_800),
            st.integers(min_value=0, max_value=999_999),
            st.sampled_from([0.0, 0.4999, 0.5, 0.5001, -0.5, 0.9999]),
        ).map(lambda t: t[0] + (t[1] + t[2]) / 1e6),
    )
)
@example(value=0.0)
@example(value=-0.0)
@example(value=86_399.9999995)  # rounds up into the next day
@example(value=951_868_799.9999996)  # 2000-02-29T23:59:59 carries into 2000-03-01
@example(value=1_700_000_000.0005)
@example(value=_LAST_SECOND - 1 + 0.9999996)
@example(value=_LAST_SECOND + 0.25)
def test_epoch_millis_is_what_datetime_gives(value: float) -> None:
    """Epoch seconds become the text `iso_millis(datetime.fromtimestamp(...))` makes, to the
    millisecond, whatever the rounding of the fraction and wherever it carries."""
    assert epoch_millis(value) == _through_datetime(value)


@pytest.mark.parametrize("value", [-1.5, -86_400, math.nan, math.inf, 1e20])
def test_epoch_millis_outside_its_range_takes_the_datetime_path(value: float) -> None:
    """Before 1970, past year 9999 and not finite: the same text or the same error as the
    datetime path."""
    try:
        expected = _through_datetime(value)
    except (ValueError, OverflowError, OSError) as exc:
        with pytest.raises(type(exc)):
            epoch_millis(value)
    else:
        assert epoch_millis(value) == expected


def test_epoch_millis_keeps_a_bounded_cache_of_days(monkeypatch: pytest.MonkeyPatch) -> None:
    """The date part is remembered by day, and the memory is cleared when full."""
    monkeypatch.setattr(records, "_DAYS", {})
    for day in range(1 << 16 | 5):
        assert epoch_millis(day * 86_400.0 + 0.5).endswith("T00:00:00.500Z")
    assert 0 < len(records._DAYS) <= 1 << 16


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


@pytest.mark.parametrize(
    "field",
    [
        {"regions": "eu-west-1"},
        {"regions": [1]},
        {"job_state": 7},
        {"stale": "no"},
        {"last_seen": 1},
    ],
)
def test_a_record_read_back_with_a_field_of_the_wrong_type_is_refused(
    field: dict[str, object],
) -> None:
    """What a failed partition carries forward is read back from the previous snapshot: a
    line edited by hand with `regions` as a string would be carried as one region a letter."""
    base = {"account_id": "111111111111", "job_id": "J", "snapshot_id": "s", "observed_at": "t"}
    assert JobRecord.from_json_dict(base).regions == ()
    with pytest.raises(ValueError, match="is not"):
        JobRecord.from_json_dict({**base, **field})
