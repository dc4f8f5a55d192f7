#!/usr/bin/env bash
# Builds the mdcluster image from deploy/Dockerfile with no image registry: the base image
# is made here (debootstrap of a minimal Debian, `podman import`), the binaries come from
# the host (the Dockerfile's `prebuilt` target, see its header), and podman keeps its
# storage (vfs driver) in a directory of its own, removed at exit unless KEEP=1.
#
# Then it checks the image: the three binaries run, the default user is not root, and
# with SMOKE_ETCD=URL set, mdserver started in the image (host network) serves mdctl on
# 127.0.0.1:SMOKE_PORT and stops with status 0 on SIGTERM (podman stop).
#
# Usage: deploy/image/build.sh
# Environment (defaults): BIN_DIR=target/release  IMAGE=localhost/mdcluster:dev
#   SUITE=<this machine's Debian codename>  DEBIAN_MIRROR=http://deb.debian.org/debian
#   WORK=$(mktemp -d /var/tmp/mdcluster-image.XXXXXX)  KEEP=0  SMOKE_ETCD=  SMOKE_PORT=17480
#   MDCTL=BIN_DIR/mdctl  WAIT=60 (bound of each wait, seconds)
# Needs root (debootstrap, podman import of a root filesystem), debootstrap and podman.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BIN_DIR=$(cd "${BIN_DIR:-$REPO/target/release}" && pwd)
IMAGE=${IMAGE:-localhost/mdcluster:dev}
# shellcheck disable=SC1091 # the machine's own os-release
SUITE=${SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WAIT=${WAIT:-60}
SMOKE_PORT=${SMOKE_PORT:-17480}
MDCTL=${MDCTL:-$BIN_DIR/mdctl}
WORK=${WORK:-$(mktemp -d /var/tmp/mdcluster-image.XXXXXX)}
mkdir -p "$WORK"
BASE=localhost/mdcluster-base:$SUITE

say() { echo "image: $* ($SECONDS s)"; }
for t in debootstrap podman; do
    command -v "$t" >/dev/null || { echo "image: $t is not installed (apt-get install $t)" >&2; exit 2; }
done
for b in mdserver mdagent mdctl; do
    [[ -x $BIN_DIR/$b ]] || { echo "image: $BIN_DIR/$b is not built" >&2; exit 2; }
done

P=(podman --root "$WORK/storage" --runroot "$WORK/runroot" --storage-driver vfs)
# The host's limits as they are: a container (or CI sandbox) may forbid raising them.
RUN=(--pull=never --ulimit host)
SMOKE_PID=
MODE=
cleanup() {
    [[ -z $SMOKE_PID ]] || kill -KILL "$SMOKE_PID" 2>/dev/null || true
    [[ $MODE != chroot ]] || "${P[@]}" image unmount -a >/dev/null 2>&1 || true
    if [[ ${KEEP:-0} == 1 ]]; then
        echo "image: kept $WORK (podman --root $WORK/storage --runroot $WORK/runroot --storage-driver vfs)"
    else
        # vfs layers are plain directories; unmount anything podman left mounted first.
        awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r \
            | while read -r m; do umount -l "$m" 2>/dev/null || true; done
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

say "base image $BASE: debootstrap --variant=minbase $SUITE"
timeout 600 debootstrap --variant=minbase "$SUITE" "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
rm -rf "$WORK"/rootfs/var/cache/apt/* "$WORK"/rootfs/var/lib/apt/lists/* \
    "$WORK"/rootfs/usr/share/doc/* "$WORK"/rootfs/usr/share/man/*
tar -C "$WORK/rootfs" -c . | timeout 300 "${P[@]}" import - "$BASE" >/dev/null
rm -rf "$WORK/rootfs"

say "context: the host's binaries, stripped"
mkdir -p "$WORK/ctx/bin"
for b in mdserver mdagent mdctl; do
    if command -v strip >/dev/null; then
        strip -o "$WORK/ctx/bin/$b" "$BIN_DIR/$b"
    else
        cp "$BIN_DIR/$b" "$WORK/ctx/bin/$b"
    fi
done

say "podman build --target prebuilt"
timeout 600 "${P[@]}" build --pull=never --network none -q \
    --build-arg BUILDER_IMAGE="$BASE" --build-arg RUNTIME_IMAGE="$BASE" \
    --target prebuilt -f "$REPO/deploy/Dockerfile" -t "$IMAGE" "$WORK/ctx" >/dev/null
"${P[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE"

# "${IN_IMAGE[@]}" CMD...: runs CMD in the image as its default user. With podman run where the
# machine's container runtime works; else (crun refuses some machines' hybrid cgroups or
# rlimits, as on our CI) in a chroot of the image's mounted root filesystem, which still
# runs the image's own files, libc included, as the image's user.
"${P[@]}" image inspect -f '{{.Config.User}}' "$IMAGE" >"$WORK/user"
USERSPEC=$(cat "$WORK/user")
[[ -n $USERSPEC && ${USERSPEC%%:*} != 0 && ${USERSPEC%%:*} != root ]] \
    || { echo "image: runs as root by default (User=$USERSPEC)" >&2; exit 1; }
echo "image: default user $USERSPEC"
if timeout 60 "${P[@]}" run "${RUN[@]}" --rm --network none "$IMAGE" true >/dev/null 2>"$WORK/run.err"; then
    MODE=podman
else
    MODE=chroot
    echo "image: podman run does not work here ($(tail -1 "$WORK/run.err")): checking in a chroot"
    ROOTFS=$("${P[@]}" image mount "$IMAGE")
fi
if [[ $MODE == podman ]]; then
    IN_IMAGE=("${P[@]}" run "${RUN[@]}" --rm --network host "$IMAGE")
else
    IN_IMAGE=(chroot --userspec="$USERSPEC" "$ROOTFS")
fi

say "checks ($MODE)"
for b in mdserver mdagent mdctl; do
    v=$(timeout 60 "${IN_IMAGE[@]}" "/usr/local/bin/$b" --version)
    echo "image: $b in the image: $v"
done
uid=$(timeout 60 "${IN_IMAGE[@]}" id -u)
[[ $uid != 0 ]] || { echo "image: runs as root by default" >&2; exit 1; }

if [[ -n ${SMOKE_ETCD:-} ]]; then
    say "mdserver in the image against $SMOKE_ETCD"
    "${IN_IMAGE[@]}" /usr/local/bin/mdserver --listen "127.0.0.1:$SMOKE_PORT" --etcd "$SMOKE_ETCD" \
        --cluster-name image-smoke >"$WORK/smoke.out" 2>"$WORK/smoke.log" &
    SMOKE_PID=$!
    deadline=$((SECONDS + WAIT))
    until timeout 10 "$MDCTL" --server "http://127.0.0.1:$SMOKE_PORT" nodes >/dev/null 2>&1; do
        if ((SECONDS >= deadline)) || ! kill -0 "$SMOKE_PID" 2>/dev/null; then
            cat "$WORK/smoke.log" >&2
            echo "image: mdserver in the image did not serve within ${WAIT}s" >&2
            exit 1
        fi
        sleep 0.2
    done
    echo "image: mdctl nodes answered by mdserver in the image"
    kill -TERM "$SMOKE_PID"
    code=0
    timeout 30 tail --pid="$SMOKE_PID" -f /dev/null || { echo "image: mdserver ignored SIGTERM" >&2; exit 1; }
    wait "$SMOKE_PID" || code=$?
    SMOKE_PID=
    echo "image: mdserver exit status after SIGTERM: $code"
    [[ $code == 0 ]] || exit 1
fi
say "OK: $IMAGE"
