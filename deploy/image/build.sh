#!/usr/bin/env bash
# Builds the mdcluster image from deploy/Dockerfile with no image registry and no network
# inside the build: the base images are made here, and podman keeps its storage (vfs
# driver) in a directory of its own, removed at exit unless KEEP=1.
#
#   base     debootstrap --variant=minbase of this machine's Debian release, `podman import`
#            (the runtime image of both targets)
#   builder  (target runtime) the base + gcc, libc6-dev, protobuf-compiler,
#            libprotobuf-dev from Debian +
#            this machine's Rust toolchain (`rustc --print sysroot`: cargo, rustc and
#            their libraries), imported as localhost/mdcluster-rust:<version>-<suite>
#   context  (target runtime) the repository's files (git ls-files: tracked and untracked,
#            not ignored) + `cargo vendor` output, so cargo builds offline in the image;
#            (target prebuilt) the host's binaries under bin/, stripped
#
# Then it checks each image: the three binaries run, the default user is not root, and
# with SMOKE_ETCD=URL set, mdserver started in the image (host network) serves mdctl on
# 127.0.0.1:SMOKE_PORT and stops with status 0 on SIGTERM (`podman stop`).
#
# Containers run with `podman run` (and the Dockerfile's RUN steps with `podman build`)
# using the OCI runtime and limits that work on this machine: podman's defaults if they
# do, else runc with the machine's own open-files limit and a lower process limit (crun
# refuses hybrid cgroup v1/v2 hosts, and a sandbox without CAP_SYS_RESOURCE refuses
# podman's raised rlimits). If no container can start, the checks run the image's root
# filesystem in a chroot as the image's user instead (only the prebuilt target can be
# built then: the runtime target has RUN steps).
#
# Usage: deploy/image/build.sh
# Environment (defaults):
#   TARGETS="runtime"  space-separated Dockerfile targets to build: runtime, prebuilt
#   IMAGE=localhost/mdcluster:dev (target runtime; target prebuilt: IMAGE-prebuilt when
#     both are built)  CARGO_PROFILE=release (target runtime)  BIN_DIR=target/release
#     (target prebuilt)  SUITE=<this machine's Debian codename>
#   DEBIAN_MIRROR=http://deb.debian.org/debian  WORK=$(mktemp -d /var/tmp/mdcluster-image.XXXXXX)
#   KEEP=0  SMOKE_ETCD=  SMOKE_PORT=17480  MDCTL=<BIN_DIR or target/release>/mdctl
#   WAIT=60 (bound of each wait, seconds)  BUILD_TIMEOUT=1800 (bound of the runtime build)
# Needs root (debootstrap, chroot, podman import of a root filesystem), debootstrap,
# podman, and for target runtime git, cargo and rustc >= 1.88 on the host.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
TARGETS=${TARGETS:-runtime}
IMAGE=${IMAGE:-localhost/mdcluster:dev}
CARGO_PROFILE=${CARGO_PROFILE:-release}
# shellcheck disable=SC1091 # the machine's own os-release
SUITE=${SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WAIT=${WAIT:-60}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-1800}
SMOKE_PORT=${SMOKE_PORT:-17480}
WORK=${WORK:-$(mktemp -d /var/tmp/mdcluster-image.XXXXXX)}
mkdir -p "$WORK"
BASE=localhost/mdcluster-base:$SUITE

say() { echo "image: $* ($SECONDS s)"; }
die() { echo "image: $*" >&2; exit 1; }
want() { [[ " $TARGETS " == *" $1 "* ]]; }
for t in $TARGETS; do
    [[ $t == runtime || $t == prebuilt ]] || { echo "image: unknown target $t (runtime, prebuilt)" >&2; exit 2; }
done
need=(debootstrap podman chroot)
! want runtime || need+=(git cargo rustc)
for t in "${need[@]}"; do
    command -v "$t" >/dev/null || { echo "image: $t is not installed" >&2; exit 2; }
done
if want prebuilt; then
    BIN_DIR=$(cd "${BIN_DIR:-$REPO/target/release}" && pwd)
    for b in mdserver mdagent mdctl; do
        [[ -x $BIN_DIR/$b ]] || { echo "image: $BIN_DIR/$b is not built" >&2; exit 2; }
    done
fi
MDCTL=${MDCTL:-${BIN_DIR:-$REPO/target/release}/mdctl}
if [[ -n ${SMOKE_ETCD:-} && ! -x $MDCTL ]]; then
    echo "image: $MDCTL is not built (needed for the smoke test; set MDCTL)" >&2
    exit 2
fi

# podman's temporary files and build cache mounts go under TMPDIR: keep them in WORK.
export TMPDIR=$WORK/tmp
mkdir -p "$TMPDIR"
P=(podman --root "$WORK/storage" --runroot "$WORK/runroot" --storage-driver vfs)
SMOKE_PID=
SMOKE_CTR=
cleanup() {
    [[ -z $SMOKE_PID ]] || kill -KILL "$SMOKE_PID" 2>/dev/null || true
    [[ -z $SMOKE_CTR ]] || "${P[@]}" rm -f "$SMOKE_CTR" >/dev/null 2>&1 || true
    "${P[@]}" image unmount -a >/dev/null 2>&1 || true
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

# --- base image ----------------------------------------------------------------------
say "base image $BASE: debootstrap --variant=minbase $SUITE"
timeout 600 debootstrap --variant=minbase "$SUITE" "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
if want runtime; then
    # The builder starts from the same root filesystem, before it is trimmed.
    cp -a "$WORK/rootfs" "$WORK/builder"
fi
rm -rf "$WORK"/rootfs/var/cache/apt/* "$WORK"/rootfs/var/lib/apt/lists/* \
    "$WORK"/rootfs/usr/share/doc/* "$WORK"/rootfs/usr/share/man/*
tar -C "$WORK/rootfs" -c . | timeout 300 "${P[@]}" import -q - "$BASE" >/dev/null
rm -rf "$WORK/rootfs"

# --- how containers run here -----------------------------------------------------------
# RUN_OPTS: what podman run and podman build need on this machine (see the header).
RUN_OPTS=()
MODE=chroot
RUNC_OPTS=(--runtime runc --ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
if timeout 60 "${P[@]}" run --pull=never --rm --network none "$BASE" true >/dev/null 2>"$WORK/run.err"; then
    MODE=podman
elif command -v runc >/dev/null \
    && timeout 60 "${P[@]}" run --pull=never --rm --network none "${RUNC_OPTS[@]}" "$BASE" true \
        >/dev/null 2>>"$WORK/run.err"; then
    MODE=podman
    RUN_OPTS=("${RUNC_OPTS[@]}")
fi
if [[ $MODE == podman ]]; then
    echo "image: containers run with podman run ${RUN_OPTS[*]}"
else
    echo "image: podman run does not work here ($(tail -1 "$WORK/run.err")): checking in a chroot"
    ! want runtime || die "target runtime needs podman to run the Dockerfile's RUN steps: $(tail -1 "$WORK/run.err")"
fi

# --- builder image and source context (target runtime) --------------------------------
if want runtime; then
    sysroot=$(rustc --print sysroot)
    rust_version=$("$sysroot/bin/rustc" --version | awk '{ print $2 }')
    # At least the workspace's rust-version (Cargo.toml).
    msrv=$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' "$REPO/Cargo.toml")
    [[ -n $msrv && $(printf '%s\n%s\n' "$rust_version" "$msrv" | sort -V | head -1) == "$msrv" ]] \
        || die "the host's rustc is $rust_version; the workspace needs >= ${msrv:-?} (rustup update)"
    BUILDER=localhost/mdcluster-rust:$rust_version-$SUITE
    say "builder image $BUILDER: gcc, libc6-dev, protoc + the host's Rust $rust_version"
    # apt in the chroot uses the mirror debootstrap wrote and the host's resolv.conf.
    timeout 600 chroot "$WORK/builder" sh -c 'apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           gcc libc6-dev protobuf-compiler libprotobuf-dev' >"$WORK/builder-apt.log" 2>&1 \
        || { tail -20 "$WORK/builder-apt.log" >&2; die "installing the builder's packages failed"; }
    rm -rf "$WORK"/builder/var/cache/apt/* "$WORK"/builder/var/lib/apt/lists/* \
        "$WORK"/builder/usr/share/doc/* "$WORK"/builder/usr/share/man/*
    # cargo and rustc with what they load (lib/: librustc_driver, LLVM, the standard
    # library); rustc finds its sysroot from its own path. No docs, no rustup proxy.
    mkdir -p "$WORK/builder/usr/local/rust/bin" "$WORK/builder/usr/local/cargo"
    cp "$sysroot/bin/cargo" "$sysroot/bin/rustc" "$WORK/builder/usr/local/rust/bin/"
    cp -a "$sysroot/lib" "$WORK/builder/usr/local/rust/"
    tar -C "$WORK/builder" -c . | timeout 300 "${P[@]}" import \
        --change "ENV=PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV=CARGO_HOME=/usr/local/cargo" \
        -q - "$BUILDER" >/dev/null
    rm -rf "$WORK/builder"
    "${P[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$BUILDER"

    say "context: the repository's files + cargo vendor"
    mkdir -p "$WORK/src/.cargo"
    if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
        # Tracked and untracked files of the work tree, not what .gitignore excludes;
        # files deleted but not yet committed are skipped.
        (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
            | while IFS= read -r -d '' f; do if [[ -e $f ]]; then printf '%s\0' "$f"; fi; done \
            | tar --null -T - -cf -) | tar -C "$WORK/src" -xf -
    else
        tar -C "$REPO" --exclude-vcs --exclude='./target*' --exclude='*.img' -cf - . \
            | tar -C "$WORK/src" -xf -
    fi
    [[ -f $WORK/src/Cargo.lock ]] || die "no Cargo.lock in the context"
    # cargo vendor prints the source replacement for .cargo/config.toml (not with
    # --quiet); offline: the build in the image must not need the network.
    (cd "$WORK/src" && timeout 600 cargo vendor --locked vendor >.cargo/config.toml 2>"$WORK/vendor.log") \
        || { tail -20 "$WORK/vendor.log" >&2; die "cargo vendor failed (the host must reach the crates registry once)"; }
    grep -q '^replace-with = "vendored-sources"' "$WORK/src/.cargo/config.toml" \
        || die "cargo vendor printed no source replacement: $(cat "$WORK/src/.cargo/config.toml")"
    printf '\n[net]\noffline = true\n' >>"$WORK/src/.cargo/config.toml"
    echo "image: context $(du -sh "$WORK/src" | cut -f1), vendored crates: $(find "$WORK/src/vendor" -mindepth 1 -maxdepth 1 | wc -l)"
fi

# --- build ---------------------------------------------------------------------------
declare -A IMAGES=()
if want runtime; then
    say "podman build --target runtime (cargo profile $CARGO_PROFILE, offline)"
    t0=$SECONDS
    # An empty ignore file: the context is exactly what was prepared above.
    # --layers=false: no intermediate image per instruction; on vfs each one is a full
    # copy of the builder's root filesystem (about 1 GB).
    : >"$WORK/empty.ignore"
    timeout "$BUILD_TIMEOUT" "${P[@]}" build --pull=never --network none --layers=false "${RUN_OPTS[@]}" \
        --ignorefile "$WORK/empty.ignore" \
        --build-arg BUILDER_IMAGE="$BUILDER" --build-arg RUNTIME_IMAGE="$BASE" \
        --build-arg CARGO_PROFILE="$CARGO_PROFILE" \
        --target runtime -f "$REPO/deploy/Dockerfile" -t "$IMAGE" "$WORK/src" \
        >"$WORK/build-runtime.log" 2>&1 \
        || { tail -40 "$WORK/build-runtime.log" >&2; die "podman build --target runtime failed"; }
    grep -E '^ *Finished ' "$WORK/build-runtime.log" || true
    echo "image: target runtime built in $((SECONDS - t0)) s"
    IMAGES[runtime]=$IMAGE
    rm -rf "$WORK/src"
fi
if want prebuilt; then
    PREBUILT=$IMAGE
    ! want runtime || PREBUILT=$IMAGE-prebuilt
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
    timeout 600 "${P[@]}" build --pull=never --network none --layers=false -q "${RUN_OPTS[@]}" \
        --build-arg BUILDER_IMAGE="$BASE" --build-arg RUNTIME_IMAGE="$BASE" \
        --target prebuilt -f "$REPO/deploy/Dockerfile" -t "$PREBUILT" "$WORK/ctx" >/dev/null
    IMAGES[prebuilt]=$PREBUILT
fi

# --- checks ----------------------------------------------------------------------------
# check TARGET IMAGE: runs the image's binaries as its default user, with podman run
# where containers start here, else in a chroot of the image's mounted root filesystem
# (which still runs the image's own files, libc included, as the image's user).
check() {
    local target=$1 image=$2 user uid v rootfs deadline
    local -a in_image
    "${P[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$image"
    user=$("${P[@]}" image inspect -f '{{.Config.User}}' "$image")
    [[ -n $user && ${user%%:*} != 0 && ${user%%:*} != root ]] \
        || die "$target: runs as root by default (User=$user)"
    echo "image: $target: default user $user"
    if [[ $MODE == podman ]]; then
        in_image=("${P[@]}" run --pull=never --rm --network host "${RUN_OPTS[@]}" "$image")
    else
        rootfs=$("${P[@]}" image mount "$image")
        in_image=(chroot --userspec="$user" "$rootfs")
    fi
    say "$target: checks ($MODE)"
    for b in mdserver mdagent mdctl; do
        v=$(timeout 60 "${in_image[@]}" "/usr/local/bin/$b" --version)
        echo "image: $target: $b in the image: $v"
    done
    uid=$(timeout 60 "${in_image[@]}" id -u)
    [[ $uid != 0 ]] || die "$target: runs as root by default"
    echo "image: $target: runs as uid $uid"

    if [[ -n ${SMOKE_ETCD:-} ]]; then
        say "$target: mdserver in the image against $SMOKE_ETCD"
        # Plain text on loopback for this smoke test only (a warning is logged).
        local smoke=(/usr/local/bin/mdserver --insecure --listen "127.0.0.1:$SMOKE_PORT"
            --etcd "$SMOKE_ETCD" --cluster-name image-smoke)
        # alive: whether mdserver still runs; stop_smoke: SIGTERM, as the kubelet or
        # `podman stop` sends it to the container's process, then its exit status in $code.
        if [[ $MODE == podman ]]; then
            SMOKE_CTR=mdcluster-smoke-$target
            "${P[@]}" run -d --name "$SMOKE_CTR" --pull=never --network host "${RUN_OPTS[@]}" \
                "$image" "${smoke[@]}" >/dev/null
            alive() { [[ $("${P[@]}" inspect -f '{{.State.Running}}' "$SMOKE_CTR" 2>/dev/null) == true ]]; }
            stop_smoke() {
                timeout 60 "${P[@]}" stop --time 30 "$SMOKE_CTR" >/dev/null \
                    || die "$target: podman stop failed"
                code=$("${P[@]}" inspect -f '{{.State.ExitCode}}' "$SMOKE_CTR")
                "${P[@]}" logs "$SMOKE_CTR" >"$WORK/smoke.log" 2>&1 || true
                "${P[@]}" rm "$SMOKE_CTR" >/dev/null
                SMOKE_CTR=
            }
        else
            "${in_image[@]}" "${smoke[@]}" >"$WORK/smoke.out" 2>"$WORK/smoke.log" &
            SMOKE_PID=$!
            alive() { kill -0 "$SMOKE_PID" 2>/dev/null; }
            stop_smoke() {
                kill -TERM "$SMOKE_PID"
                timeout 30 tail --pid="$SMOKE_PID" -f /dev/null || die "$target: mdserver ignored SIGTERM"
                code=0
                wait "$SMOKE_PID" || code=$?
                SMOKE_PID=
            }
        fi
        deadline=$((SECONDS + WAIT))
        until timeout 10 "$MDCTL" --insecure --server "http://127.0.0.1:$SMOKE_PORT" nodes >/dev/null 2>&1; do
            if ((SECONDS >= deadline)) || ! alive; then
                [[ $MODE != podman ]] || "${P[@]}" logs "$SMOKE_CTR" >"$WORK/smoke.log" 2>&1 || true
                cat "$WORK/smoke.log" >&2
                die "$target: mdserver in the image did not serve within ${WAIT}s"
            fi
            sleep 0.2
        done
        echo "image: $target: mdctl nodes answered by mdserver in the image"
        stop_smoke
        echo "image: $target: mdserver exit status after SIGTERM: $code"
        [[ $code == 0 ]] || { cat "$WORK/smoke.log" >&2; exit 1; }
    fi
    say "OK: $target: $image"
}
for t in $TARGETS; do
    check "$t" "${IMAGES[$t]}"
done
