#!/usr/bin/env bash
# Partner CSV → JSON messages + table, on the embedded default.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
sw="${SLUICEWAY:-$here/../../.venv/bin/sluiceway}"
cd "$here"
rm -rf data .sluiceway

"$sw" validate
for f in samples/customers_*.csv; do
  "$sw" put "$f" "inbox/partner-a/$(basename "$f")"
done
"$sw" run --drain --timeout 120

echo "== customers table (first 3 of $("$sw" table scan customers --limit 100000 | wc -l))"
"$sw" table scan customers --limit 3
echo "== a JSON message for downstream consumers (customer-rows)"
"$sw" queue peek customer-rows --limit 1
echo "== file summaries"
"$sw" queue peek file-summaries --limit 10
echo "== error messages (partner-errors)"
"$sw" queue peek partner-errors --limit 20
echo
echo "Reject files: $here/data/quarantine/_rejected/"
