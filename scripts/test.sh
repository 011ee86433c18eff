#!/usr/bin/env bash
# Install everything the tests need (Debian packages, the venv, the models), lint, then run the suite.
# Tests run in a loopback-only network namespace, so browsers and WebRTC stay on 127.0.0.1.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install.sh --test
.venv/bin/ruff check pono tests bench

if unshare --net true 2>/dev/null; then
  exec unshare --net sh -c 'ip link set lo up && exec "$@"' sh .venv/bin/pytest "$@"
else
  echo "warning: cannot create a network namespace (needs root); running on the host network" >&2
  exec .venv/bin/pytest "$@"
fi
