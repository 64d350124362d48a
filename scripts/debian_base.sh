#!/usr/bin/env bash
# A Python 3.11 base image made from Debian's own packages, for building the server image
# where Docker Hub (python:3.11-slim) is out of reach: debootstrap a minimal bookworm with
# python3 + venv, then `docker import` it. Cached: does nothing when the tag already exists.
#
#   scripts/debian_base.sh [TAG]        (default mage-base:bookworm; needs root + debootstrap)
#   MIRROR=http://deb.example.com/debian scripts/debian_base.sh
#
# Then: make image BASE_IMAGE=mage-base:bookworm  (see docs/deploy.md, "Building offline").
set -euo pipefail
TAG=${1:-mage-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-docker}

if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG: already built"
  exit 0
fi
# Exit 3: the host cannot make it (the container test skips, saying so).
command -v debootstrap >/dev/null \
  || { echo "no base image $TAG and no debootstrap to make it (apt-get install debootstrap)" >&2; exit 3; }
[ "$(id -u)" = 0 ] || { echo "no base image $TAG, and debootstrap needs root" >&2; exit 3; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# minbase: dpkg, apt and the essentials; python3.11 + venv (the image's pip lives in a venv);
# ca-certificates so that pip can reach an HTTPS index.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$SUITE" "$root" "$MIRROR" >/dev/null
# What a runtime never reads: apt's lists and caches, docs, man pages, other locales.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/var/log/*.log
find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'en*' -exec rm -rf {} +
tar -C "$root" --numeric-owner -c . \
  | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap $SUITE minbase + python3, python3-venv, ca-certificates" \
    - "$TAG" >/dev/null
echo "$TAG: built ($("$DOCKER" image inspect -f '{{.Size}}' "$TAG") bytes)"
