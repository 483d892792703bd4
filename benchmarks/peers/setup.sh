#!/usr/bin/env bash
# Installs the peer queues for the side-by-side benchmark (docs/BENCHMARKS.md):
# Huey (SQLite storage) and Dramatiq (Redis broker) in their own virtualenv,
# py-spy (to profile the broker), and a Redis server from Debian. Idempotent; needs root for apt-get.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv"
if ! command -v redis-server >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q 'huey>=2.5' 'dramatiq[redis]>=1.16' 'redis>=5' 'psutil>=5.9' 'py-spy>=0.3'
"$venv/bin/python" - <<'PY'
import dramatiq, huey, redis
print("huey", huey.__version__, "| dramatiq", dramatiq.__version__, "| redis-py", redis.__version__)
PY
redis-server --version
