#!/usr/bin/env bash
# A tq handler in bash: tq worker --exec greet=./greet.sh
#
# Payload on stdin: {"name": "Ada", "flaky": false}; result on stdout:
# {"greeting": "Hello, Ada!", "attempt": 1}. Exit 0: done; exit 65 (EX_DATAERR): bad
# input, do not retry; exit 75: retry later (a "flaky" task's first attempt does that);
# any other status: failed, retried while the task has retries left.
set -euo pipefail
payload=$(cat)
name=$(jq -r '.name // empty' <<<"$payload")
if [ -z "$name" ]; then
    echo "the payload needs a name, got $payload" >&2   # stderr is kept with the error
    exit 65
fi
if [ "$(jq -r '.flaky // false' <<<"$payload")" = true ] && [ "$TQ_ATTEMPT" -eq 1 ]; then
    echo "task $TQ_TASK_ID: first attempt of a flaky task, try again later" >&2
    exit 75
fi
jq -nc --arg name "$name" --argjson attempt "$TQ_ATTEMPT" \
    '{greeting: "Hello, \($name)!", attempt: $attempt}'
