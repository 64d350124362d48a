#!/usr/bin/env bash
# Render every kustomization under deploy/ and check it against the Kubernetes schemas
# (kubernetes-validate, a dev dependency, strict: unknown fields fail), then run the
# structural and metric checks of tests/test_deploy.py (dashboard, alerts, adapter rules
# against the server's real /metrics).
#
#   scripts/check_deploy.sh            # Kubernetes 1.30 schemas
#   K8S_VERSION=1.33 scripts/check_deploy.sh
#
# Needs `kustomize` or `kubectl` (apt-get install kubectl) for rendering, and .venv
# (make setup). Custom resources (ServiceMonitor) have no built-in schema and are reported as
# warnings by kubernetes-validate; the tests check their fields.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
K8S_VERSION=${K8S_VERSION:-1.30}
if command -v kustomize >/dev/null; then
  render() { kustomize build "$1"; }
elif command -v kubectl >/dev/null; then
  render() { kubectl kustomize "$1"; }
else
  echo "check_deploy: install kustomize or kubectl to render the manifests" >&2
  exit 2
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for dir in deploy/kubernetes*/; do
  name=$(basename "$dir")
  render "$dir" > "$out/$name.yaml"
  echo "== $name: $(grep -c '^kind:' "$out/$name.yaml") resources"
  "$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$out/$name.yaml"
done
"$VENV/bin/python" -m pytest -q tests/test_deploy.py
