#!/usr/bin/env bash
# Builds what an offline `docker build` of dml needs, on a machine that reaches Debian's mirror and
# a Python package index but no container registry:
#   1. the base image dml-base:bookworm: a Debian bookworm root (debootstrap, minbase) with python3
#      and its venv module, imported into Docker;
#   2. ./wheels: every dependency of dml as a wheel for that image's Python (and the build backend),
#      the only place the Dockerfile's pip looks when the folder exists. dml itself is installed
#      from the source tree, so the wheelhouse needs rebuilding only when the dependencies change.
# Then either of:
#   docker build --build-arg BASE_IMAGE=dml-base:bookworm -t dml:latest .
#   DML_BASE_IMAGE=dml-base:bookworm docker compose up --build --scale peer=4
#
# Usage: scripts/docker_base.sh [--rebuild-base]   (as root, with debootstrap and a running dockerd)
# Environment:
#   DML_BASE_IMAGE  the tag to build (default dml-base:bookworm); an existing one is kept unless
#                   --rebuild-base is given
#   DEBIAN_MIRROR   where debootstrap fetches from (default http://deb.debian.org/debian)
#   DML_TORCH       the torch requirement for the wheelhouse (default: torch==2.13.0 where this
#                   machine pins a torch wheel on disk through /etc/xdg/pip/constraints.txt, as
#                   ./dev does; elsewhere torch from PyTorch's CPU index)
#   PYTHON          the Python that builds the wheelhouse (default python3); it must have the
#                   image's Python version, since the wheels are built for it
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${DML_BASE_IMAGE:-dml-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PY="${PYTHON:-python3}"
WHEELS=wheels
rebuild=0
case "${1:-}" in
  "") ;;
  --rebuild-base) rebuild=1 ;;
  *) echo "usage: $0 [--rebuild-base]" >&2; exit 2 ;;
esac

die() { echo "docker_base: $*" >&2; exit 1; }
command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the Docker daemon (is dockerd running?)"

if [ "$rebuild" = 1 ] || ! docker image inspect "$TAG" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  root="$(mktemp -d /tmp/dml-base.XXXXXX)"
  trap 'rm -rf "$root"' EXIT
  echo "docker_base: debootstrap bookworm (minbase, python3) into $root from $MIRROR" >&2
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; die "debootstrap failed (log: $root.log)"; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  echo "docker_base: importing $root as $TAG" >&2
  tar -C "$root" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$TAG" >/dev/null
  rm -rf "$root" "$root.log"
  trap - EXIT
fi

image_py="$(docker run --rm --network none "$TAG" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
host_py="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$image_py" = "$host_py" ] || die "$TAG has Python $image_py but $PY is $host_py: set PYTHON to a python$image_py"

if [ -n "${DML_TORCH:-}" ]; then
  torch=("$DML_TORCH")
elif [ -f /etc/xdg/pip/constraints.txt ]; then
  torch=("torch==2.13.0")
else
  torch=(torch --extra-index-url https://download.pytorch.org/whl/cpu)
fi
read -r -a backend < <("$PY" -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
echo "docker_base: wheelhouse ./$WHEELS for Python $image_py (${torch[0]}, ${backend[*]})" >&2
mkdir -p "$WHEELS"
"$PY" -m pip wheel -q --wheel-dir "$WHEELS" --find-links "$WHEELS" . "${backend[@]}" "${torch[@]}"
rm -f "$WHEELS"/dml-*.whl  # the image installs dml from the source tree
echo "docker_base: $TAG and ./$WHEELS ($(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)) are ready:" >&2
echo "  docker build --build-arg BASE_IMAGE=$TAG -t dml:latest ." >&2
echo "  DML_BASE_IMAGE=$TAG docker compose up --build --scale peer=4" >&2
