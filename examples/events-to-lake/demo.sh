#!/usr/bin/env bash
# Events in, a deduplicated, partitioned Parquet dataset out:
# `stream put` appends the sample events (about 10% are re-sent duplicates),
# `run --drain` consumes the stream, then `compact` merges small files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${SLUICEWAY_BIN:-$here/../../.venv/bin}"
cd "$here"
rm -rf data .sluiceway

echo "== sluiceway validate"
"$bin/sluiceway" validate

echo "== sluiceway stream put events samples/events.jsonl"
"$bin/sluiceway" stream put events samples/events.jsonl

echo "== sluiceway run --drain"
"$bin/sluiceway" run --drain --workers 1 --timeout 120   # one consumer per stream function anyway

echo "== sluiceway status"
"$bin/sluiceway" status

echo "== sluiceway compact lake/events"
"$bin/sluiceway" compact lake/events

echo "== the dataset, read with DuckDB (partitions are columns)"
"$bin/python" - <<'PY'
import duckdb

print(duckdb.sql(
    "SELECT event_name, date, count(*) AS events, count(DISTINCT event_uuid) AS unique_ids"
    " FROM read_parquet('data/lake/events/**/*.parquet', hive_partitioning = true)"
    " GROUP BY ALL ORDER BY ALL"
))
PY
