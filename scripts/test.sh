#!/usr/bin/env bash
# Install everything the tests need (Debian packages, the venv, the models), lint, then run the suite.
# Tests run in a loopback-only network namespace, so browsers and WebRTC stay on 127.0.0.1.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install.sh --test
# checkov (tests/test_k8s.py) pins packaging<24, which pytest refuses: it gets a venv of its own.
CHECKOV_VERSION=3.3.30
if [[ "$(.venv/checkov/bin/checkov --version 2>/dev/null)" != "$CHECKOV_VERSION" ]]; then
  "${PYTHON:-python3}" -m venv .venv/checkov
  .venv/checkov/bin/python -m pip install -q "checkov==$CHECKOV_VERSION"
fi
.venv/bin/ruff check pono tests bench

if unshare --net true 2>/dev/null; then
  exec unshare --net sh -c 'ip link set lo up && exec "$@"' sh .venv/bin/pytest "$@"
else
  echo "warning: cannot create a network namespace (needs root); running on the host network" >&2
  exec .venv/bin/pytest "$@"
fi
