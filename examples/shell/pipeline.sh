#!/usr/bin/env bash
# Submit JSON lines, wait for them, list the dead ones, retry those in bulk: tq and jq.
#
#   ./pipeline.sh [JOBS.jsonl]        (default: jobs.jsonl next to this script)
#
# Needs a broker with a worker (`tq up`), or TQ_BROKER, TQ_CA and TQ_KEY set.
# TQ="python -m tq" runs another tq command.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
jobs=${1:-$here/jobs.jsonl}
tq() { ${TQ:-command tq} "$@"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. Submit: one task map per input line in; one {"line": N, "id": ...} per line out
#    ({"line": N, "error": ...} for a line the broker refused; tq exits 2 then).
tq submit - < "$jobs" > "$work/submitted.jsonl"
jq -r '.id' "$work/submitted.jsonl" > "$work/ids"
echo "submitted $(wc -l < "$work/ids") task(s)" >&2

# 2. Wait for all of them: one JSON line per task as it ends; exit 5 if any ended dead.
status=0
tq wait - < "$work/ids" > "$work/ended.jsonl" || status=$?
[ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
jq -s -c 'group_by(.state) | map({(.[0].state): length}) | add | {ended: .}' "$work/ended.jsonl"

# 3. List the dead ones (of those we submitted) with their errors.
tq list --state dead --output jsonl |
    jq -c --rawfile ours "$work/ids" \
        'select(.id as $id | $ours | split("\n") | index($id)) | {dead: .id, type, error: .error.message}'

# 4. Retry them in bulk: ids in, one {"id": ..., "state": "pending"} line out per task.
jq -r 'select(.state == "dead") | .id' "$work/ended.jsonl" | tq retry - --output jsonl
