#!/usr/bin/env bash
# code-order.sh: profile a release build of berth and write link/code-order.txt,
# the order in which build.rs has release builds link berth's functions.
#
# Usage (as root, on a machine that runs hack/test.sh):
#   hack/code-order.sh
#
# Why: on a kernel that maps a whole page-cache folio per fault (6.18 with
# large folios), a process maps every folio its code touches. berth's hot
# functions are scattered through 15 MB of code, so an idle daemon mapped
# 6 MiB of it and every monitor ~900 KiB. Placed together, they stay within
# a few folios (docs/performance.md, session 8).
#
# How: a copy of the release binary, evicted from the page cache, runs as a
# daemon while the block device's readahead is off, so that a page enters
# the cache only when a process touches it. `berth bench` (from another
# copy) then makes kubelet's periodic calls (phase "steady"), runs pods
# whose monitors are sampled while they live, and a pod lifecycle. Each
# process's mapped code pages (/proc/PID/pagemap) give the functions on them
# (hack/code-order.py). The daemon runs on its own socket, dirs, bridge and
# nft table; all of it is removed on the way out, and readahead restored,
# also when something fails.
#
# The list names functions by their mangled symbols, which stay the same
# while a function's crate, path and signature do. Functions added later are
# placed after the listed ones, as before; run this again after large
# changes. The list depends on the build profile (Cargo.toml's LTO setting).
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if [ "$(id -u)" -ne 0 ]; then
    echo "code-order.sh: run as root: the profiled daemon runs pods" >&2
    exit 1
fi

readonly QUIET_S=17      # the daemon gives back its code after 15 s quiet (src/idle.rs)
readonly BRIDGE=berth-order0
readonly TABLE=berth_order

hack/install-deps.sh
# The list in place or not, the names are the same: build with the list out.
BERTH_CODE_ORDER=off cargo build --release --locked

work=$(mktemp -d "$PWD/target/code-order.XXXXXX")
readahead=""
readahead_was=""
daemon=""
cleanup() {
    if [[ -n "$daemon" ]] && kill -0 "$daemon" 2>/dev/null; then
        kill "$daemon"
        while kill -0 "$daemon" 2>/dev/null; do sleep 0.1; done
    fi
    if [[ -n "$readahead" ]]; then
        echo "$readahead_was" >"$readahead"
    fi
    hack/registry.sh stop "$work/registry" >/dev/null 2>&1 || true
    ip link del "$BRIDGE" 2>/dev/null || true
    nft delete table inet "$TABLE" 2>/dev/null || true
    local dir
    for dir in /sys/fs/cgroup/berth /sys/fs/cgroup/*/berth; do
        if [[ -d "$dir" ]]; then
            rmdir "$dir" 2>/dev/null || true
        fi
    done
    rm -rf "$work" "/run/berth-code-order"
}
trap cleanup EXIT

# The readahead of the block device under the work dir.
source=$(readlink -f "$(findmnt -no SOURCE -T "$work")")
device=$(basename "$source")
if [[ -e "/sys/class/block/$device/partition" ]]; then
    device=$(basename "$(dirname "$(readlink -f "/sys/class/block/$device")")")
fi
if [[ ! -w "/sys/class/block/$device/queue/read_ahead_kb" ]]; then
    echo "code-order.sh: $work is not on a block device whose readahead can be turned off" >&2
    exit 1
fi

hack/registry.sh start "$work/registry" >/dev/null
registry=$(cat "$work/registry/address")
hack/build-test-images.py --registry "$registry" --out "$work/images.json" --quiet
image="$registry/berth-test/busybox:latest"

cat >"$work/config.toml" <<EOF
[network]
mode = "builtin"
bridge = "$BRIDGE"
nft_table = "$TABLE"
pod_cidr = "10.213.0.0/24"

[image]
insecure_loopback = true
EOF

profiled="$work/berth"
client="$work/berth-client"
cp target/release/berth "$profiled"
cp target/release/berth "$client"
sync "$profiled"
evict() {
    python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$profiled"
}
evict
readahead="/sys/class/block/$device/queue/read_ahead_kb"
readahead_was=$(cat "$readahead")
echo 0 >"$readahead"

socket="$work/berth.sock"
endpoint="unix://$socket"
"$profiled" --config "$work/config.toml" serve --socket "$socket" \
    --root "$work/root" --state /run/berth-code-order >"$work/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 100); do
    [[ -S "$socket" ]] && break
    sleep 0.1
done
bench() {
    "$client" bench --endpoint "$endpoint" "$@" >>"$work/bench.log" 2>&1
}
touched() {
    local phase=$1
    shift
    hack/code-order.py touched "$profiled" "$phase" "$work/profile.jsonl" "$@"
}
helpers() {
    local pid
    for pid in $(pgrep -x 'berth-monitor|berth-zygote'); do
        if [[ "$(readlink "/proc/$pid/exe")" == "$profiled" ]]; then
            echo "$pid"
        fi
    done
}

echo "== steady: kubelet's periodic calls"
bench --scenario idle --iterations 3
sleep "$QUIET_S"
# What start-up and the first calls touched is out of the cache now, unless
# still mapped: the steady calls start from nothing.
evict
bench --scenario idle --iterations 20
touched steady "$daemon"

echo "== pods: monitors while they run"
bench --scenario density --pods 3 --iterations 5 --relist-after 20 --image "$image" &
density=$!
for _ in $(seq 300); do
    [[ $(helpers | wc -l) -ge 4 ]] && break # the zygote and three monitors
    sleep 0.1
done
sleep 5
# shellcheck disable=SC2046 # one PID per word
touched pods $(helpers)
wait "$density"

echo "== lifecycle"
bench --scenario lifecycle --iterations 3 --image "$image"
touched lifecycle "$daemon"

mkdir -p link
hack/code-order.py order "$profiled" "$work/profile.jsonl" link/code-order.txt
echo "code-order.sh: wrote link/code-order.txt ($(wc -l <link/code-order.txt) functions)"
