#!/usr/bin/env bash
# Stops the local cluster of deploy/local/up.sh cleanly, leaving no process or mount:
#  1. what a user attached to the arrays under the state directory (README: nbdfuse +
#     losetup): filesystems on those loop devices are unmounted, the loop devices
#     detached, the nbdfuse mounts unmounted;
#  2. the agents get SIGTERM (every array stops cleanly: clients disconnected, I/O
#     drained, bitmap flushed, superblocks clean), then mdserver, then etcd; each is
#     killed if it has not exited within its bound;
#  3. any stray process carrying the state directory's mark is killed.
# The state (etcd data, disks) stays for the next up.sh; `down.sh --purge` removes it.
#
# Environment: MDCLUSTER_STATE (default /var/tmp/mdcluster-local), STOP_WAIT=60 (seconds).
set -euo pipefail
STATE=${MDCLUSTER_STATE:-/var/tmp/mdcluster-local}
STOP_WAIT=${STOP_WAIT:-60}
MARK="MDCLUSTER_LOCAL_STATE=$STATE"
purge=0
[[ ${1:-} == --purge ]] && purge=1

say() { echo "down: $*"; }

if [[ ! -d $STATE ]]; then
    say "nothing at $STATE"
    exit 0
fi
STATE=$(cd "$STATE" && pwd)
MARK="MDCLUSTER_LOCAL_STATE=$STATE"

# Mount points under the state directory, deepest first.
mounts_under() {
    awk -v s="$STATE/" 'index($2, s) == 1 { print $2 }' /proc/self/mounts | sort -r
}

# --- 1. what is attached to the arrays -----------------------------------------------
for lo in /sys/block/loop*; do
    f=$(cat "$lo/loop/backing_file" 2>/dev/null) || continue
    [[ $f == "$STATE"/* ]] || continue
    dev=/dev/${lo##*/}
    while read -r mp; do
        say "unmounting $mp ($dev)"
        timeout 30 umount "$mp" || timeout 30 umount -l "$mp" || true
    done < <(awk -v d="$dev" '$1 == d { print $2 }' /proc/self/mounts)
    say "detaching $dev ($f)"
    timeout 30 losetup -d "$dev" || true
done
while read -r mp; do
    [[ -n $mp ]] || continue
    say "unmounting $mp"
    timeout 30 fusermount3 -u "$mp" 2>/dev/null || timeout 30 umount "$mp" \
        || timeout 30 umount -l "$mp" || true
done < <(mounts_under)

# --- 2. the processes, agents first --------------------------------------------------
marked() { # marked PID: the process carries this state directory's mark
    tr '\0' '\n' 2>/dev/null <"/proc/$1/environ" | grep -qxF -- "$MARK"
}
alive() { # alive PID: running (a zombie waiting for its reaper counts as gone)
    kill -0 "$1" 2>/dev/null || return 1
    [[ $(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) != Z ]]
}
stop() { # stop NAME: SIGTERM, wait up to STOP_WAIT, then SIGKILL
    local name=$1 pid deadline
    pid=$(cat "$STATE/pids/$name.pid" 2>/dev/null) || return 0
    rm -f "$STATE/pids/$name.pid"
    if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null || ! marked "$pid"; then
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_WAIT))
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            say "$name (pid $pid) did not stop within ${STOP_WAIT}s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    say "$name stopped"
}
shopt -s nullglob
for f in "$STATE"/pids/node*.pid; do
    n=${f##*/}
    stop "${n%.pid}"
done
stop mdserver
stop etcd

# --- 3. strays (a pid file lost, a user's nbdfuse, ...) ------------------------------
# (Not when down.sh itself carries the mark: it would find its own callers.)
set -- /proc/[0-9]*
if [[ ${MDCLUSTER_LOCAL_STATE:-} == "$STATE" ]]; then set --; fi
for p in "$@"; do
    pid=${p#/proc/}
    [[ $pid == "$$" ]] && continue
    if marked "$pid"; then
        say "killing stray pid $pid ($(tr '\0' ' ' 2>/dev/null <"$p/cmdline" | cut -c1-80))"
        kill -KILL "$pid" 2>/dev/null || true
    fi
done

left=$(mounts_under)
[[ -z $left ]] || { echo "down: still mounted: $left" >&2; exit 1; }
if ((purge)); then
    rm -rf "$STATE"
    say "removed $STATE"
fi
say "stopped"
