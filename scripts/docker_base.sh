#!/usr/bin/env bash
# Builds what an offline `docker build` of dml needs, on a machine that reaches Debian's mirror and
# a Python package index but no container registry:
#   1. the base image dml-base:bookworm: a Debian bookworm root (debootstrap, minbase) with python3
#      and its venv module, imported into Docker;
#   2. a wheelhouse: every dependency of dml as a wheel for that image's Python (and the build
#      backend), kept OUTSIDE the clone, in DML_WHEEL_CACHE/py<X.Y>-<key>, where the key hashes
#      pyproject.toml's dependencies and build requirements, the torch requirement and the Python
#      version: a fresh clone, or a checkout whose dependencies did not change, reuses it;
#   3. unless --no-link, ./wheels: that wheelhouse hard-linked into the clone (copied across file
#      systems), the only place the Dockerfile's pip looks when the folder exists. dml itself is
#      installed from the source tree, so none of this is rebuilt when only the code changes.
# Then either of:
#   docker build --build-arg BASE_IMAGE=dml-base:bookworm -t dml:latest .
#   DML_BASE_IMAGE=dml-base:bookworm docker compose up --build --scale peer=4
# The last line on stdout is the wheelhouse's path (everything else goes to stderr).
#
# Usage: scripts/docker_base.sh [--rebuild-base] [--no-link]   (as root, with debootstrap and a running dockerd)
# Environment:
#   DML_BASE_IMAGE   the tag to build (default dml-base:bookworm); an existing one is kept unless
#                    --rebuild-base is given
#   DEBIAN_MIRROR    where debootstrap fetches from (default http://deb.debian.org/debian)
#   DML_WHEEL_CACHE  where wheelhouses are kept (default ${XDG_CACHE_HOME:-~/.cache}/dml/wheels)
#   DML_TORCH        the torch requirement for the wheelhouse (default: torch==2.13.0 where this
#                    machine pins a torch wheel on disk through /etc/xdg/pip/constraints.txt, as
#                    ./dev does; elsewhere torch from PyTorch's CPU index)
#   PYTHON           the Python that builds the wheelhouse (default python3); it must have the
#                    image's Python version, since the wheels are built for it
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${DML_BASE_IMAGE:-dml-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PY="${PYTHON:-python3}"
CACHE="${DML_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dml/wheels}"
rebuild=0
link=1
for arg in "$@"; do
  case "$arg" in
    --rebuild-base) rebuild=1 ;;
    --no-link) link=0 ;;
    *) echo "usage: $0 [--rebuild-base] [--no-link]" >&2; exit 2 ;;
  esac
done

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
# One line: the key, then every requirement (dependencies and build backend) to build wheels of.
read -r key reqs < <("$PY" - "$image_py" "${torch[*]}" <<'EOF'
import hashlib, json, sys, tomllib
with open("pyproject.toml", "rb") as f:
    t = tomllib.load(f)
reqs = t["project"]["dependencies"] + t["build-system"]["requires"]
key = hashlib.sha256(json.dumps([sys.argv[1], sys.argv[2], sorted(reqs)]).encode()).hexdigest()[:16]
print(key, json.dumps(reqs))
EOF
)
mapfile -t requirements < <("$PY" -c 'import json, sys; print("\n".join(json.loads(sys.argv[1])))' "$reqs")
wheels="$CACHE/py$image_py-$key"
if [ -f "$wheels/.complete" ]; then
  echo "docker_base: reusing the wheelhouse $wheels" >&2
else
  echo "docker_base: wheelhouse $wheels for Python $image_py (${torch[0]}, ${requirements[*]})" >&2
  mkdir -p "$CACHE"
  tmp="$(mktemp -d "$wheels.tmp.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip wheel -q --wheel-dir "$tmp" "${requirements[@]}" "${torch[@]}" >&2
  touch "$tmp/.complete"
  # Whole or not at all: a concurrent run that got there first wins, and this copy goes.
  mv -T "$tmp" "$wheels" 2>/dev/null || rm -rf "$tmp"
  trap - EXIT
fi
if [ "$link" = 1 ]; then
  rm -rf wheels
  cp -al "$wheels" wheels 2>/dev/null || { rm -rf wheels; cp -a "$wheels" wheels; }
  rm -f wheels/.complete
  echo "docker_base: ./wheels is $wheels ($(ls wheels | wc -l) wheels, $(du -sh wheels | cut -f1))" >&2
fi
echo "docker_base: $TAG and the wheelhouse are ready:" >&2
echo "  docker build --build-arg BASE_IMAGE=$TAG -t dml:latest ." >&2
echo "  DML_BASE_IMAGE=$TAG docker compose up --build --scale peer=4" >&2
echo "$wheels"
