#!/usr/bin/env bash
# A local mdcluster in one command: etcd, one mdserver and NODES mdagents (node1 on
# 127.0.0.1, node2 on 127.0.0.2, ...) with file-backed shared disks, all under one state
# directory; then a clustered mirror md0 assembled on every node, and `mdctl detail md0`.
#
# Safe to run again: what runs is kept (checked by pid file and command line), what is
# missing is started, md0 is created only if the cluster does not know it and assembled
# only where it is not active. deploy/local/down.sh stops everything.
#
# On a fresh Debian machine it installs what is missing (etcd-server, fuse3, libnbd-bin,
# curl; protobuf-compiler and libprotobuf-dev when it has to build) if run as root, and
# builds the binaries (cargo build --release) unless MDCLUSTER_BIN_DIR names a directory
# that has them.
#
# gRPC runs with mutual TLS: on first run up.sh makes a small PKI with openssl in
# $MDCLUSTER_STATE/pki (a cluster CA; mdserver; one certificate per node; an admin and a
# viewer operator) and $MDCLUSTER_STATE/env points mdctl at the admin's. INSECURE=1 runs
# plain text instead (every process warns).
#
# Environment (defaults):
#   MDCLUSTER_STATE=/var/tmp/mdcluster-local   state: etcd data, disks, run dirs, logs, pids, pki
#   MDCLUSTER_BIN_DIR=<repo>/target/release    mdctl, mdserver, mdagent
#   NODES=2  DISK_SIZE=256M  ETCD_PORT=23790  ETCD_PEER_PORT=23800  MDSERVER_PORT=7480
#   AGENT_PORT=7481  WAIT=60 (seconds, bound of every wait)  INSECURE=0
#   METRICS_PORT=9480 (mdserver's /metrics)  AGENT_METRICS_PORT=9481 (node<i> on 127.0.0.<i>)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
STATE=${MDCLUSTER_STATE:-/var/tmp/mdcluster-local}
NODES=${NODES:-2}
DISK_SIZE=${DISK_SIZE:-256M}
ETCD_PORT=${ETCD_PORT:-23790}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-23800}
MDSERVER_PORT=${MDSERVER_PORT:-7480}
AGENT_PORT=${AGENT_PORT:-7481}
METRICS_PORT=${METRICS_PORT:-9480}
AGENT_METRICS_PORT=${AGENT_METRICS_PORT:-9481}
WAIT=${WAIT:-60}
INSECURE=${INSECURE:-0}
ETCD_URL=http://127.0.0.1:$ETCD_PORT
PKI=$STATE/pki
# Only our own settings decide plain text or TLS (the two exclude each other).
unset MDSERVER_INSECURE MDAGENT_INSECURE MDCTL_INSECURE MDCTL_TLS_CA MDCTL_TLS_CERT MDCTL_TLS_KEY
if [[ $INSECURE == 1 ]]; then
    export MDCTL_SERVER=http://127.0.0.1:$MDSERVER_PORT MDCTL_INSECURE=true
    server_tls=(--insecure)
else
    export MDCTL_SERVER=https://127.0.0.1:$MDSERVER_PORT
    export MDCTL_TLS_CA=$PKI/ca.crt MDCTL_TLS_CERT=$PKI/admin.crt MDCTL_TLS_KEY=$PKI/admin.key
    server_tls=(--tls-ca "$PKI/ca.crt" --tls-cert "$PKI/mdserver.crt" --tls-key "$PKI/mdserver.key")
fi

say() { echo "up: $*"; }
die() { echo "up: $*" >&2; exit 1; }

# wait_for SECONDS CMD...: retry CMD every 0.2 s until it succeeds or the deadline.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# --- what is missing -----------------------------------------------------------------
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v nbdfuse >/dev/null || need+=(libnbd-bin)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
if [[ -z ${MDCLUSTER_BIN_DIR:-} ]]; then
    command -v cargo >/dev/null || die "cargo is not installed (https://rustup.rs), or set MDCLUSTER_BIN_DIR"
    command -v protoc >/dev/null || need+=(protobuf-compiler)
    # The well-known types (google/protobuf/*.proto) that etcd-client's protos import.
    [[ -e /usr/include/google/protobuf/descriptor.proto ]] || need+=(libprotobuf-dev)
fi
if ((${#need[@]})); then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
        # Debian's etcd-server starts a system etcd on 2379; ours uses its own ports.
    else
        die "missing: ${need[*]} (apt-get install ${need[*]})"
    fi
fi

# --- binaries ------------------------------------------------------------------------
if [[ -n ${MDCLUSTER_BIN_DIR:-} ]]; then
    BIN=$(cd "$MDCLUSTER_BIN_DIR" && pwd)
else
    BIN=$REPO/target/release
    say "building the binaries (cargo build --release; a no-op when they are current)"
    (cd "$REPO" && cargo build --release --workspace --bins --quiet)
fi
for b in mdctl mdserver mdagent; do
    [[ -x $BIN/$b ]] || die "$BIN/$b is not built (cargo build --release --workspace --bins)"
done
MDCTL=$BIN/mdctl

mkdir -p "$STATE"/{logs,pids,disks,etcd}
chmod 0700 "$STATE"

# --- the PKI (kept across runs; a missing certificate is issued) ---------------------
# issue NAME SUBJECT EXTENSIONS: an ECDSA P-256 key and a certificate signed by the CA.
issue() {
    [[ -s $PKI/$1.crt && -s $PKI/$1.key ]] && return 0
    printf '%b' "$3" >"$PKI/$1.ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" \
        -keyout "$PKI/$1.key" -out "$PKI/$1.csr" 2>/dev/null
    openssl x509 -req -in "$PKI/$1.csr" -days 365 -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
        -CAcreateserial -extfile "$PKI/$1.ext" -out "$PKI/$1.crt" 2>/dev/null
    chmod 0600 "$PKI/$1.key"
    say "issued $PKI/$1.crt ($2)"
}
if [[ $INSECURE != 1 ]]; then
    mkdir -p "$PKI"
    chmod 0700 "$PKI"
    if [[ ! -s $PKI/ca.crt ]]; then
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
            -subj "/CN=mdcluster local CA" -keyout "$PKI/ca.key" -out "$PKI/ca.crt" 2>/dev/null
        chmod 0600 "$PKI/ca.key"
        say "made the cluster CA $PKI/ca.crt"
    fi
    issue mdserver /O=mdcluster:server/CN=mdserver \
        'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n'
    for i in $(seq 1 "$NODES"); do
        issue "node$i" "/O=mdcluster:nodes/CN=node$i" \
            "subjectAltName=DNS:node$i\nextendedKeyUsage=serverAuth,clientAuth\n"
    done
    issue admin /O=mdcluster:admin/CN=admin 'extendedKeyUsage=clientAuth\n'
    issue viewer /O=mdcluster:viewer/CN=viewer 'extendedKeyUsage=clientAuth\n'
fi

# Every process up.sh starts carries MARK in its environment: a pid file is trusted only
# while its process still has it (no pid reuse), and down.sh finds strays by it.
MARK="MDCLUSTER_LOCAL_STATE=$STATE"

# running NAME: the process of pids/NAME.pid is alive and is still what we started.
running() {
    local pid
    pid=$(cat "$STATE/pids/$1.pid" 2>/dev/null) || return 1
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF -- "$MARK"
}

# start NAME CMD...: starts CMD in its own session, detached, unless NAME runs.
start() {
    local name=$1
    shift
    if running "$name"; then
        say "$name runs (pid $(cat "$STATE/pids/$name.pid"))"
        return 0
    fi
    env "$MARK" setsid "$@" </dev/null >"$STATE/logs/$name.out" 2>"$STATE/logs/$name.log" &
    echo $! >"$STATE/pids/$name.pid"
    say "$name started (pid $!)"
}

# --- etcd ----------------------------------------------------------------------------
start etcd etcd --name local --data-dir "$STATE/etcd" \
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "local=http://127.0.0.1:$ETCD_PEER_PORT"
wait_for "$WAIT" curl -sf "$ETCD_URL/health" || die "etcd not healthy within ${WAIT}s (see $STATE/logs/etcd.log)"

# --- mdserver ------------------------------------------------------------------------
start mdserver env RUST_LOG=info "$BIN/mdserver" "${server_tls[@]}" \
    --listen "127.0.0.1:$MDSERVER_PORT" --etcd "$ETCD_URL" --cluster-name local \
    --metrics-listen "127.0.0.1:$METRICS_PORT"
wait_for "$WAIT" timeout 10 "$MDCTL" nodes || die "mdserver not serving within ${WAIT}s (see $STATE/logs/mdserver.log)"

# --- the agents and their disks ------------------------------------------------------
for d in 0 1; do
    [[ -e $STATE/disks/disk$d ]] || truncate -s "$DISK_SIZE" "$STATE/disks/disk$d"
done
for i in $(seq 1 "$NODES"); do
    agent_tls=(--insecure)
    [[ $INSECURE == 1 ]] ||
        agent_tls=(--tls-ca "$PKI/ca.crt" --tls-cert "$PKI/node$i.crt" --tls-key "$PKI/node$i.key")
    start "node$i" env RUST_LOG=info "$BIN/mdagent" "${agent_tls[@]}" --node "node$i" --server "$MDCTL_SERVER" \
        --listen "127.0.0.$i:$AGENT_PORT" --run-dir "$STATE/run/node$i" \
        --device-allow "$STATE/disks/*" --metrics-listen "127.0.0.$i:$AGENT_METRICS_PORT"
done
live_nodes() {
    [[ $(timeout 10 "$MDCTL" --json nodes | grep -Eo '"reachable": *true' | wc -l) == "$NODES" ]]
}
wait_for "$WAIT" live_nodes || die "not all $NODES nodes live within ${WAIT}s (see $STATE/logs/node*.log)"
timeout 10 "$MDCTL" nodes

# --- md0: a clustered mirror, assembled on every node --------------------------------
if timeout 30 "$MDCTL" detail md0 >/dev/null 2>&1; then
    say "md0 exists"
else
    say "creating md0 on node1 (blank disks are identical: --assume-clean)"
    timeout 60 "$MDCTL" --node node1 create md0 --level 1 --raid-devices 2 \
        --bitmap clustered --nodes 4 --assume-clean "$STATE/disks/disk0" "$STATE/disks/disk1"
fi
for i in $(seq 1 "$NODES"); do
    if timeout 30 "$MDCTL" --node "node$i" mdstat | grep -q '^md0 : active'; then
        say "md0 is active on node$i"
    else
        say "assembling md0 on node$i"
        timeout 60 "$MDCTL" --node "node$i" assemble md0
    fi
done
timeout 30 "$MDCTL" detail md0

if [[ $INSECURE == 1 ]]; then
    cat >"$STATE/env" <<EOF
export MDCTL_SERVER=$MDCTL_SERVER MDCTL_INSECURE=true
export PATH=$BIN:\$PATH
EOF
else
    cat >"$STATE/env" <<EOF
export MDCTL_SERVER=$MDCTL_SERVER
export MDCTL_TLS_CA=$MDCTL_TLS_CA MDCTL_TLS_CERT=$MDCTL_TLS_CERT MDCTL_TLS_KEY=$MDCTL_TLS_KEY
export PATH=$BIN:\$PATH
EOF
fi
cat <<EOF

up: the cluster runs ($NODES nodes, state in $STATE). Next:
    . $STATE/env
    mdctl nodes
    mdctl --node node2 mdstat
    curl -s http://127.0.0.1:$METRICS_PORT/metrics     # mdserver; node<i>: 127.0.0.<i>:$AGENT_METRICS_PORT
    nbdinfo 'nbd+unix:///md0?socket=$STATE/run/node2/md0.nbd'
    mkdir -p $STATE/mnt/md0 && nbdfuse $STATE/mnt/md0/disk --unix $STATE/run/node2/md0.nbd &
    losetup -f --show $STATE/mnt/md0/disk # /dev/loopN: mkfs.ext4, mount, ...
    $REPO/deploy/local/down.sh            # stops everything (detaches the loop device first)
EOF
