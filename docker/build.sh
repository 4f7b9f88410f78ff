#!/usr/bin/env bash
# Build the CPU images (services and operator) without a Docker daemon: `make images`.
#
# 1. base: BASE (default localhost/specdec-base:bookworm) is made here when missing, from a
#    debootstrapped Debian bookworm with python3 and python3-venv (buildah from scratch);
#    pass BASE=docker.io/library/python:3.11-slim-bookworm where a registry is reachable;
# 2. wheels: pip fills build/wheels/{services,operator} from the index it is configured
#    with (PyPI or a mirror; TORCH_INDEX adds another), so the image builds need no network;
# 3. images: buildah bud --isolation chroot (no daemon, no user namespaces) from
#    docker/{services,operator}.Dockerfile; EXPORT=1 also writes OCI archives to build/images/.
#
# Settings (environment): VARIANT=cpu|cuda, TAG, REGISTRY (image name prefix), BASE, PYTHON,
# TORCH_VERSION, TORCH_INDEX, IMAGES="services operator", EXPORT, DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."

VARIANT=${VARIANT:-cpu}
TAG=${TAG:-0.1.0}
REGISTRY=${REGISTRY:-ghcr.io/specdec}
BASE=${BASE:-localhost/specdec-base:bookworm}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
IMAGES=${IMAGES:-services operator}
LOCAL_BASE=localhost/specdec-base:bookworm

say() { printf '== %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null || { echo "$1 is missing: apt-get install $2" >&2; exit 1; }; }
elapsed() { echo $(( $(date +%s) - $1 )); }
need buildah buildah

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

make_base() {
  need debootstrap debootstrap
  local root=build/base-rootfs t0; t0=$(date +%s)
  say "base: debootstrap bookworm (python3, python3-venv) into $root"
  rm -rf "$root"
  # shellcheck disable=SC2086  # DEBIAN_MIRROR is empty (debootstrap's default) or one URL
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" ${DEBIAN_MIRROR:-} >build/base-debootstrap.log 2>&1 \
    || { tail -20 build/base-debootstrap.log >&2; exit 1; }
  # What a slim image drops: package lists, caches, docs, man pages, locales.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
         "$root"/var/log/* "$root"/tmp/*
  find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
  tar -C "$root" --numeric-owner -cf build/base-rootfs.tar .
  local ctr; ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" build/base-rootfs.tar / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd /bin/bash \
    --label org.opencontainers.image.description="Debian bookworm minbase with python3 (debootstrap)" "$ctr"
  buildah commit --quiet --rm "$ctr" "$LOCAL_BASE" >/dev/null
  rm -rf "$root" build/base-rootfs.tar
  say "base: $LOCAL_BASE in $(elapsed "$t0") s"
}

wheels() {   # wheels IMAGE PIP-ARGS...: the wheelhouse of one image, filled afresh
  local dir=build/wheels/$1 t0; t0=$(date +%s); shift
  rm -rf "$dir" && mkdir -p "$dir"
  # pip resolves markers for PYTHON (3.11.x here); redis needs async-timeout below 3.11.3,
  # and Debian bookworm's python3 is 3.11.2: add it whatever PYTHON's micro version is.
  if ! "$PYTHON" -m pip wheel -q --wheel-dir "$dir" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
      "$@" 'async-timeout>=4.0.3' >"$dir.log" 2>&1; then
    grep -v "^WARNING: Location" "$dir.log" >&2; exit 1
  fi
  say "wheels: $dir ($(du -sh "$dir" | cut -f1)) in $(elapsed "$t0") s"
}

build() {   # build IMAGE NAME
  local t0; t0=$(date +%s)
  say "image: $2 from docker/$1.Dockerfile on $BASE"
  # Docker format: OCI image configs have no HEALTHCHECK.
  buildah bud --isolation chroot --layers --quiet --format docker --ignorefile docker/dockerignore \
    --build-arg BASE="$BASE" --build-arg VERSION="$TAG" \
    -f "docker/$1.Dockerfile" -t "$2" . >/dev/null
  local size; size=$(buildah images --format '{{.Size}}' "$2" | head -1)
  say "image: $2 $size in $(elapsed "$t0") s"
  if [ -n "${EXPORT:-}" ]; then
    mkdir -p build/images
    buildah push --quiet "$2" "oci-archive:build/images/$1.tar:$2" >/dev/null
    say "image: build/images/$1.tar"
  fi
}

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "PYTHON must be Python 3.11 (the wheels must match the base's python3)" >&2; exit 1; }
if [ "$BASE" = "$LOCAL_BASE" ] && ! image_exists "$BASE"; then make_base; fi

# specdec-records (the Redis keys and records services and operator share) is a local
# distribution both packages require by name: its wheel goes into each wheelhouse from here.
records=()
[ -f services/specdec-records/pyproject.toml ] && records=(./services/specdec-records)

for image in $IMAGES; do
  case "$image" in
    services)
      torch="torch==$TORCH_VERSION"
      [ "$VARIANT" = cpu ] && torch="$torch+cpu"
      # The HTTP front's fastapi, uvicorn and sse-starlette are dependencies of `.`: pip wheel
      # puts them (and everything they need) into the wheelhouse with the rest.
      wheels services "$torch" . "${records[@]}"
      suffix=""; [ "$VARIANT" = cpu ] || suffix="-$VARIANT"
      build services "$REGISTRY/specdec:$TAG$suffix" ;;
    operator)
      wheels operator ./operator "${records[@]}"
      build operator "$REGISTRY/specdec-operator:$TAG" ;;
    *) echo "unknown image $image (services, operator)" >&2; exit 2 ;;
  esac
done
