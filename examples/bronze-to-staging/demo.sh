#!/usr/bin/env bash
# The demo behind `make demo`: three partner files arrive through `sluiceway put`,
# a fourth is dropped into the bucket directory while nothing runs, then
# `run --drain` finds and processes everything and prints what happened.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
sw="${SLUICEWAY:-$here/../../.venv/bin/sluiceway}"
cd "$here"
rm -rf data .sluiceway

echo "== sluiceway validate"
"$sw" validate

echo "== sluiceway put (three partner files)"
for f in samples/customers_*.csv; do
  "$sw" put "$f" "bronze/incoming/$(basename "$f")"
done

echo "== a file copied straight into the bucket directory (found by the reconcile)"
mkdir -p data/bronze/incoming
cp samples/legacy_export.csv data/bronze/incoming/legacy_export.csv

echo "== sluiceway run --drain"
"$sw" run --drain --timeout 120

echo "== sluiceway status"
"$sw" status

echo "== sluiceway dlq list to-parquet"
"$sw" dlq list to-parquet

echo
echo "Parquet files are in $here/data/staging"
