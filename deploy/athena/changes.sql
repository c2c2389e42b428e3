-- Athena: the change events between consecutive snapshots, one row per event.
-- Files: s3://BUCKET/PREFIX/changes/date=YYYY-MM-DD/<snapshot_id>.jsonl (or .jsonl.gz),
-- where s3://BUCKET/PREFIX is output.directory. Replace BUCKET/PREFIX below (twice).
-- Schema: aggregator/schemas/change.schema.json (1.x: fields and event types are only ever
-- added; ignore event types you do not know).

CREATE EXTERNAL TABLE IF NOT EXISTS snowball_job_changes (
  `account_id` string,
  `event` string,
  `from_state` string,
  `job_id` string,
  `observed_at` string,
  `previous_observed_at` string,
  `previous_snapshot_id` string,
  `snapshot_id` string,
  `to_state` string
)
PARTITIONED BY (`date` string)
ROW FORMAT SERDE 'org.openx.data.jsonserde.JsonSerDe'
LOCATION 's3://BUCKET/PREFIX/changes/'
TBLPROPERTIES (
  'projection.enabled' = 'true',
  'projection.date.type' = 'date',
  'projection.date.format' = 'yyyy-MM-dd',
  'projection.date.range' = '2024-01-01,NOW',
  'projection.date.interval' = '1',
  'projection.date.interval.unit' = 'DAYS',
  'storage.location.template' = 's3://BUCKET/PREFIX/changes/date=${date}/'
);
