-- Athena: the job records of every retained snapshot, one row per job per snapshot.
-- Files: s3://BUCKET/PREFIX/snapshots/date=YYYY-MM-DD/<snapshot_id>.jsonl (or .jsonl.gz),
-- where s3://BUCKET/PREFIX is output.directory. Replace BUCKET/PREFIX below (twice).
-- The `date` partition uses partition projection: new days appear without MSCK REPAIR TABLE.
-- Schema: aggregator/schemas/record.schema.json (1.x: fields are only ever added; a new field
-- is a new column here, and old files read it as NULL).
--
-- The same folders hold each snapshot's <snapshot_id>.manifest.json (pretty-printed run
-- metadata). The SerDe skips their lines as malformed JSON ('ignore.malformed.json'), and the
-- snowball_jobs view reads data files only: query the view.

CREATE EXTERNAL TABLE IF NOT EXISTS snowball_jobs_raw (
  `account_id` string,
  `creation_date` string,
  `description` string,
  `is_master` boolean,
  `job_id` string,
  `job_state` string,
  `job_type` string,
  `last_seen` string,
  `observed_at` string,
  `regions` array<string>,
  `snapshot_id` string,
  `snowball_type` string,
  `stale` boolean
)
PARTITIONED BY (`date` string)
ROW FORMAT SERDE 'org.openx.data.jsonserde.JsonSerDe'
WITH SERDEPROPERTIES ('ignore.malformed.json' = 'true')
LOCATION 's3://BUCKET/PREFIX/snapshots/'
TBLPROPERTIES (
  'projection.enabled' = 'true',
  'projection.date.type' = 'date',
  'projection.date.format' = 'yyyy-MM-dd',
  'projection.date.range' = '2024-01-01,NOW',
  'projection.date.interval' = '1',
  'projection.date.interval.unit' = 'DAYS',
  'storage.location.template' = 's3://BUCKET/PREFIX/snapshots/date=${date}/'
);

CREATE OR REPLACE VIEW snowball_jobs AS
SELECT
  account_id,
  job_id,
  job_state,
  job_type,
  snowball_type,
  is_master,
  from_iso8601_timestamp(creation_date) AS creation_date,
  description,
  regions,
  snapshot_id,
  from_iso8601_timestamp(observed_at) AS observed_at,
  from_iso8601_timestamp(last_seen) AS last_seen,
  stale,
  "date"
FROM snowball_jobs_raw
WHERE "$path" NOT LIKE '%.manifest.json' AND job_id IS NOT NULL;
