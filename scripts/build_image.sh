#!/usr/bin/env bash
# `make image`: build the CPU server image where neither Docker Hub nor the PyTorch index may
# be reachable. Each input falls back to what the host has:
#   BASE_IMAGE    default mage-base:bookworm, made once from Debian's packages
#                 (scripts/debian_base.sh); BASE_IMAGE=python:3.11-slim for the Docker Hub base
#   TORCH_WHEELS  a folder holding a torch wheel, copied into wheels/; unset: the wheel pip
#                 finds without an index (its configured find-links), else none, and the build
#                 takes torch from TORCH_INDEX_URL
#   IMAGE         the tag, default mage-server:cpu
# Any other `docker build` argument can follow, e.g. --build-arg PIP_INDEX_URL=...
# The base, torch and dependency layers are cached: a rebuild after a code change reruns only
# the project's install step.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-mage-server:cpu}
BASE_IMAGE=${BASE_IMAGE:-mage-base:bookworm}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

# The Dockerfile needs BuildKit: a client with buildx, or Debian's docker.io client (20.10),
# whose BuildKit is built in. A newer client without buildx refuses DOCKER_BUILDKIT=1.
docker_client() {
  local c
  for c in $(command -v -a docker 2>/dev/null || true) /usr/bin/docker; do
    if "$c" buildx version >/dev/null 2>&1 \
        || DOCKER_BUILDKIT=1 "$c" build --help >/dev/null 2>&1; then
      echo "$c"
      return 0
    fi
  done
  return 1
}
# Exit 3 (also from debian_base.sh): the host cannot build it; the container test skips.
DOCKER=${DOCKER:-$(docker_client)} || { echo "no docker client with BuildKit found" >&2; exit 3; }
export DOCKER DOCKER_BUILDKIT=1

if [ "$BASE_IMAGE" = mage-base:bookworm ]; then
  scripts/debian_base.sh "$BASE_IMAGE"
fi

if [ -n "${TORCH_WHEELS:-}" ]; then
  cp -u "$TORCH_WHEELS"/torch-"$TORCH_VERSION"*.whl wheels/
elif ! ls wheels/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1; then
  # --no-index: only the find-links pip is configured with; no download, fails fast if none.
  "$PYTHON" -m pip download -q --no-deps --no-index --only-binary=:all: \
    --python-version 3.11 -d wheels/ "torch==$TORCH_VERSION" 2>/dev/null \
    || echo "no local torch wheel: torch comes from TORCH_INDEX_URL"
fi

# pip's CA bundle (a TLS-inspecting proxy's) reaches the build as a secret, not a layer.
cert=${PIP_CERT:-$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)}
secret=()
if [ -n "$cert" ] && [ -f "$cert" ]; then
  secret=(--secret "id=pip_cert,src=$cert")
fi

nice -n 10 "$DOCKER" build -t "$IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg TORCH_VERSION="$TORCH_VERSION" "${secret[@]}" "$@" .
