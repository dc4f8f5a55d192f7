#!/usr/bin/env bash
# The two-node reproducer of the md_open race (docs/LIFECYCLE.md §1), driven only
# through mdctl: create a clustered 2-disk mirror --assume-clean on node1, then 10 times
# assemble on node2, sleep, stop on node2 -- while `mdctl monitor` runs and clients keep
# opening the array on node2 (nbdinfo on node2's NBD socket, mdctl detail).
#
# It starts its own etcd, mdserver and two mdagents (node1 on 127.0.0.1, node2 on
# 127.0.0.2) from the built binaries (BIN, default target/debug), in a temporary
# directory, and kills them on exit. Every mdctl run is bounded by `timeout`, so a hung
# open or stop fails the script instead of hanging it.
#
# Passes (exit 0) when every cycle finishes within CYCLE_BOUND seconds, no client run
# hung, the monitor saw node2's assembles and stops, and after md0 is stopped on both
# nodes no lock is left in etcd.
#
# Usage: tests/scripts/two-node.sh        (env: BIN, CYCLES=10, SLEEP=1, CYCLE_BOUND=8)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-$PWD/target/debug}
CYCLES=${CYCLES:-10}
SLEEP=${SLEEP:-1}
CYCLE_BOUND=${CYCLE_BOUND:-8}
for b in mdctl mdserver mdagent; do
    [[ -x $BIN/$b ]] || { echo "two-node: $BIN/$b is not built: run cargo build --bins" >&2; exit 2; }
done
command -v etcd >/dev/null || { echo "two-node: etcd is not installed (apt-get install etcd-server)" >&2; exit 2; }

W=$(mktemp -d /tmp/mdcluster-two-node.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ ${KEEP:-0} == 1 ]]; then echo "two-node: kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT

# free_ports N: N distinct ports below the kernel's ephemeral range (so no outgoing
# connection takes one before its server binds it), each free on every address.
free_ports() {
    python3 - "$1" <<'PY'
import random, socket, sys
lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
lo, hi = (20000, lo) if lo >= 22000 else (61000, 65535)
got = []
for p in random.sample(range(lo, hi), hi - lo):
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", p))
        got.append(p)
    except OSError:
        pass
    finally:
        s.close()
    if len(got) == int(sys.argv[1]):
        break
print(*got)
PY
}
wait_for() { # wait_for SECONDS CMD...: retry CMD every 0.1 s until it succeeds or the deadline
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || { echo "two-node: timed out waiting for: $*" >&2; return 1; }
        sleep 0.1
    done
}

read -r EP PP SP A1 A2 < <(free_ports 5)
[[ -n ${A2:-} ]] || { echo "two-node: no 5 free ports" >&2; exit 1; }
ETCD=http://127.0.0.1:$EP
etcd --data-dir "$W/etcd" --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
    --listen-peer-urls "http://127.0.0.1:$PP" --initial-advertise-peer-urls "http://127.0.0.1:$PP" \
    --initial-cluster "default=http://127.0.0.1:$PP" --unsafe-no-fsync >"$W/etcd.log" 2>&1 &
PIDS+=($!)
wait_for 30 curl -sf "$ETCD/health"
"$BIN/mdserver" --insecure --listen "127.0.0.1:$SP" --etcd "$ETCD" --cluster-name two-node --session-ttl 3s \
    >"$W/mdserver.out" 2>"$W/mdserver.log" &
PIDS+=($!)
export MDCTL_SERVER=http://127.0.0.1:$SP
# A throwaway cluster on loopback: plain-text gRPC (mdctl warns on every run).
export MDCTL_INSECURE=true
wait_for 30 grep -q listening "$W/mdserver.out"
for i in 1 2; do
    port=$A1; [[ $i == 2 ]] && port=$A2
    RUST_LOG=info "$BIN/mdagent" --insecure --node "node$i" --server "$MDCTL_SERVER" --listen "127.0.0.$i:$port" \
        --run-dir "$W/run$i" --session-ttl 3s --fence-margin 750ms --stop-grace 2s \
        --device-allow "$W/disk*" >"$W/agent$i.out" 2>"$W/agent$i.log" &
    PIDS+=($!)
done
wait_for 30 bash -c "[[ \$(timeout 10 $BIN/mdctl --json nodes | grep -c '\"node\"') == 2 ]]"
timeout 10 "$BIN/mdctl" nodes

truncate -s 64M "$W/disk0" "$W/disk1"
echo "--- node1: mdctl create md0 --bitmap clustered --assume-clean"
timeout 60 "$BIN/mdctl" --node node1 create md0 --level 1 --raid-devices 2 --bitmap clustered \
    --assume-clean "$W/disk0" "$W/disk1"

echo "--- monitor and openers on node2"
timeout 600 "$BIN/mdctl" --json monitor >"$W/monitor.jsonl" 2>"$W/monitor.err" &
MON=$!; PIDS+=($MON)
touch "$W/openers.run"
opener() {
    local hung=0 opens=0 details=0
    while [[ -e $W/openers.run ]]; do
        timeout 10 nbdinfo --size "nbd+unix:///md0?socket=$W/run2/md0.nbd" >/dev/null 2>&1 || \
            { [[ $? == 124 ]] && hung=$((hung + 1)); }
        opens=$((opens + 1))
        timeout 10 "$BIN/mdctl" detail md0 >/dev/null 2>&1 || { [[ $? == 124 ]] && hung=$((hung + 1)); }
        details=$((details + 1))
    done
    echo "$opens $details $hung" >"$W/openers.result"
}
opener &
OPENER=$!

fail=0
for i in $(seq 1 "$CYCLES"); do
    start=$(date +%s.%N)
    timeout 30 "$BIN/mdctl" --node node2 assemble md0 || { echo "cycle $i: assemble failed ($?)"; fail=1; }
    sleep "$SLEEP"
    timeout 30 "$BIN/mdctl" --node node2 stop md0 || { echo "cycle $i: stop failed ($?)"; fail=1; }
    took=$(echo "$(date +%s.%N) - $start - $SLEEP" | bc)
    echo "cycle $i: assemble + stop on node2 took ${took}s (plus ${SLEEP}s sleep)"
    if (( $(echo "$took > $CYCLE_BOUND" | bc) )); then echo "cycle $i: slower than ${CYCLE_BOUND}s"; fail=1; fi
done
rm -f "$W/openers.run"
wait "$OPENER"
read -r opens details hung <"$W/openers.result"
echo "openers: $opens nbdinfo runs, $details mdctl detail runs, $hung hung"
(( hung == 0 )) || fail=1

sleep 1
kill "$MON" 2>/dev/null || true
new=$(grep '"node":"node2"' "$W/monitor.jsonl" | grep -c '"event":"NewArray"' || true)
gone=$(grep '"node":"node2"' "$W/monitor.jsonl" | grep -c '"event":"DeviceDisappeared"' || true)
echo "monitor: node2 NewArray x$new, DeviceDisappeared x$gone"
(( new >= CYCLES - 1 && gone >= CYCLES - 1 )) || { echo "monitor missed events"; fail=1; }

echo "--- node1: mdctl stop md0; nothing may stay locked in etcd"
timeout 30 "$BIN/mdctl" --node node1 stop md0
timeout 10 "$BIN/mdctl" detail md0 | tail -4
key=$(printf '/mdcluster/two-node/locks/' | base64 -w0)
end=$(printf '/mdcluster/two-node/locks0' | base64 -w0)
locks=$(curl -sf "$ETCD/v3/kv/range" -d "{\"key\":\"$key\",\"range_end\":\"$end\",\"count_only\":true}" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin).get("count", 0))')
echo "locks left in etcd: $locks"
[[ $locks == 0 ]] || fail=1

if (( fail )); then echo "two-node: FAILED (logs in $W)"; KEEP=1; exit 1; fi
echo "two-node: OK ($CYCLES cycles)"
