#!/usr/bin/env bash
# run.sh: run critest v1.32 against berth, offline, on this machine.
#
# Usage (as root, on Debian bookworm):
#   conformance/run.sh [--focus REGEX]... [--skip REGEX]... [--out DIR]
#                      [--timeout DURATION] [--berth PATH] [--keep]
#
#   --focus REGEX    only run specs matching REGEX (ginkgo focus; repeatable, OR-ed)
#   --skip REGEX     also skip specs matching REGEX (repeatable)
#   --out DIR        where the reports go (default: conformance/out); it keeps
#                    junit.xml, critest.log, berth.log, registry.log,
#                    images.json, config.toml, cni.conflist and summary.txt
#   --timeout DUR    critest's --ginkgo.timeout for the whole suite (default 2h)
#   --berth PATH     use this berth binary instead of `cargo build --release`
#   --keep           keep the temporary directory (berth's root and state, the
#                    registry storage) for debugging; processes, mounts and
#                    the CNI bridge are still removed
#
# Steps: installs the Debian packages it needs (hack/install-deps.sh, plus
# iptables for the CNI bridge and portmap plugins), builds berth, starts a
# registry (hack/registry.sh) in a temporary directory, builds and pushes the
# images critest pulls (conformance/build-images.py), writes a berth config
# whose registry mirrors send registry.k8s.io, gcr.io, public.ecr.aws and
# docker.io to that registry, a CNI bridge config on a free private /24,
# starts `berth serve` on its own socket, root and state, runs critest with
# explicit endpoints (never /etc/crictl.yaml), one spec at a time, and the
# skip list of specs that cannot pass on this host (conformance/README.md).
# It prints the failing spec names and, as its last line,
#   N passed, N failed, N skipped
# and exits 0 only when nothing failed. On exit, whatever the outcome, it
# stops berth and the registry, kills any process left under its temporary
# directory, unmounts everything below it, deletes the CNI bridge and the
# iptables rules of its network, removes the SysV shm segments critest's
# `ipcmk` left, and removes the temporary directory (unless --keep).
# Progress and critest's output go to stderr; stdout has only the result.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly repo
readonly hack="$repo/hack"
readonly BERTH_READY_TIMEOUT_S=60
readonly BERTH_STOP_TIMEOUT_S=15
# Specs that cannot pass on any offline host; see conformance/README.md.
readonly ALWAYS_SKIP=(
    # The digest is of upstream's manifest; a local registry cannot serve it.
    'Image Manager public image with digest should be pulled and removed'
)

say() {
    echo "run.sh: $*" >&2
}

die() {
    say "$*"
    exit 1
}

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

focus=()
skip=()
out="$repo/conformance/out"
timeout=2h
berth_bin=
keep=0
while (($#)); do
    case "$1" in
        --focus) (($# >= 2)) || usage; focus+=("$2"); shift 2 ;;
        --skip) (($# >= 2)) || usage; skip+=("$2"); shift 2 ;;
        --out) (($# >= 2)) || usage; out=$2; shift 2 ;;
        --timeout) (($# >= 2)) || usage; timeout=$2; shift 2 ;;
        --berth) (($# >= 2)) || usage; berth_bin=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        -h | --help) usage ;;
        *) say "unknown argument: $1"; usage ;;
    esac
done

((EUID == 0)) || die "run as root: berth and critest create namespaces, mounts and cgroups"

if ! command -v critest >/dev/null; then
    say "critest is not on PATH."
    say "build cri-tools v1.32's critest from source and put it on PATH"
    say "(https://github.com/kubernetes-sigs/cri-tools, tag v1.32.0: \`make critest\`, then copy build/bin/*/critest to /usr/local/bin)."
    exit 1
fi
if [[ -e /etc/crictl.yaml ]]; then
    say "warning: /etc/crictl.yaml exists; critest reads it before its flags. This run passes explicit endpoints and does not depend on it, but other keys in it may still apply."
fi

# State that the EXIT trap undoes; set as each piece comes up.
tmp=
berth_pid=
bridge=
netname=
shm_recorded=0
shm_before=
forward_before=
sock=
critest_pid=
cleaned=0

# ---------------------------------------------------------------------------
# Cleanup

# True if process $1 belongs to this run: its command line names the
# temporary directory (berth monitors, the registry), or its root mount comes
# from there (container processes; their rootfs lives in berth's root).
ours() {
    local pid=$1
    [[ -n "$tmp" ]] || return 1
    if grep -qaF -- "$tmp/" "/proc/$pid/cmdline" 2>/dev/null; then
        return 0
    fi
    awk -v t="$tmp/" '$5 == "/" && index($0, t) { found = 1 } END { exit !found }' \
        "/proc/$pid/mountinfo" 2>/dev/null
}

kill_leftovers() {
    local pid pids=() self=$$
    for pid in /proc/[0-9]*; do
        pid=${pid#/proc/}
        ((pid != self)) || continue
        if ours "$pid"; then
            pids+=("$pid")
        fi
    done
    ((${#pids[@]})) || return 0
    say "killing ${#pids[@]} leftover process(es) of this run: ${pids[*]}"
    for pid in "${pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    sleep 0.5
}

# Unmount everything mounted below the temporary directory, deepest first.
unmount_all() {
    local target i
    local -a targets
    [[ -n "$tmp" ]] || return 0
    for i in 1 2 3; do
        mapfile -t targets < <(awk -v t="$tmp/" 'index($5, t) == 1 { print $5 }' /proc/self/mountinfo |
            awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2- | uniq)
        ((${#targets[@]})) || return 0
        for target in "${targets[@]}"; do
            # mountinfo escapes space, tab, newline and backslash as \ooo.
            target=$(printf '%b' "$target")
            umount "$target" 2>/dev/null || umount -l "$target" 2>/dev/null || true
        done
    done
    if awk -v t="$tmp/" 'index($5, t) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
        say "warning: mounts are left below $tmp"
    fi
}

# Delete the iptables rules the CNI bridge/portmap plugins made for our
# network (their comments name it) and the per-container chains they jump to.
cleanup_iptables() {
    local table rules chains line target script
    [[ -n "$netname" ]] || return 0
    command -v iptables-save >/dev/null || return 0
    for table in nat filter mangle; do
        rules=$(iptables-save -t "$table" 2>/dev/null | grep -F -- "\"$netname\"" | grep '^-A ' || true)
        [[ -n "$rules" ]] || continue
        chains=()
        script="*$table"$'\n'
        while IFS= read -r line; do
            script+="-D ${line#-A }"$'\n'
            target=$(sed -n 's/.* -j \(CNI-[A-Za-z0-9-]*\).*/\1/p' <<<"$line")
            if [[ "$target" =~ ^CNI-(DN-)?[0-9a-f]+$ ]]; then
                chains+=("$target")
            fi
        done <<<"$rules"
        if ((${#chains[@]})); then
            mapfile -t chains < <(printf '%s\n' "${chains[@]}" | sort -u)
            for target in "${chains[@]}"; do
                script+="-F $target"$'\n'"-X $target"$'\n'
            done
        fi
        script+="COMMIT"$'\n'
        if ! iptables-restore --noflush <<<"$script" 2>/dev/null; then
            say "warning: could not remove all iptables $table rules of $netname"
        fi
    done
}

# Undo everything this run set up. Runs once: explicitly before the result
# is printed, or from the EXIT trap on any other way out.
cleanup() {
    local id i dir
    ((cleaned == 0)) || return 0
    cleaned=1
    if [[ -n "$critest_pid" ]] && kill -0 "$critest_pid" 2>/dev/null; then
        say "interrupting critest (pid $critest_pid)"
        kill -INT "$critest_pid" 2>/dev/null
        for ((i = 0; i < 300; i++)); do
            kill -0 "$critest_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$critest_pid" 2>/dev/null
        wait "$critest_pid" 2>/dev/null
    fi
    if [[ -n "$berth_pid" ]] && kill -0 "$berth_pid" 2>/dev/null; then
        if [[ -n "$sock" ]] && command -v crictl >/dev/null; then
            # Pods and containers critest left behind (berth never stops
            # containers on shutdown).
            crictl --runtime-endpoint "unix://$sock" --image-endpoint "unix://$sock" --timeout 30s \
                rmp --all --force >/dev/null 2>&1
            crictl --runtime-endpoint "unix://$sock" --image-endpoint "unix://$sock" --timeout 30s \
                rm --all --force >/dev/null 2>&1
        fi
        say "stopping berth (pid $berth_pid)"
        kill -TERM "$berth_pid" 2>/dev/null
        for ((i = 0; i < BERTH_STOP_TIMEOUT_S * 10; i++)); do
            kill -0 "$berth_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$berth_pid" 2>/dev/null; then
            say "berth ignored SIGTERM for ${BERTH_STOP_TIMEOUT_S}s; sending SIGKILL"
            kill -KILL "$berth_pid" 2>/dev/null
        fi
        wait "$berth_pid" 2>/dev/null
    fi
    if [[ -n "$tmp" && -d "$tmp/registry" ]]; then
        cp "$tmp/registry/registry.log" "$out/registry.log" 2>/dev/null
        "$hack/registry.sh" stop "$tmp/registry" >/dev/null || say "warning: registry.sh stop failed"
    fi
    kill_leftovers
    unmount_all
    # Pods that critest gives no cgroup parent go under berth's default
    # one, `/berth`, which berth leaves standing. Removed only when empty:
    # a pod cgroup berth leaked keeps it, and shows.
    for dir in /sys/fs/cgroup/berth /sys/fs/cgroup/*/berth; do
        if [[ -d "$dir" ]]; then
            rmdir "$dir" 2>/dev/null || true
        fi
    done
    if [[ -n "$bridge" ]] && ip link show "$bridge" >/dev/null 2>&1; then
        ip link delete "$bridge" || say "warning: could not delete bridge $bridge"
    fi
    cleanup_iptables
    # critest's HostIpc specs leave `ipcmk -M 1048576` segments behind.
    if ((shm_recorded)) && [[ -r /proc/sysvipc/shm ]]; then
        while read -r id; do
            ipcrm -m "$id" 2>/dev/null
        done < <(awk 'NR > 1 && $4 == 1048576 { print $2 }' /proc/sysvipc/shm |
            grep -vxF -f <(printf '%s\n' "$shm_before" | tr ' ' '\n') || true)
    fi
    # The bridge plugin (isGateway) turns on IPv4 forwarding; put it back.
    if [[ "$forward_before" == 0 ]] && [[ "$(cat /proc/sys/net/ipv4/ip_forward)" == 1 ]]; then
        echo 0 >/proc/sys/net/ipv4/ip_forward
    fi
    if [[ -n "$tmp" && -d "$tmp" ]]; then
        if ((keep)); then
            say "kept $tmp"
        else
            rm -rf --one-file-system -- "$tmp" || say "warning: could not remove $tmp"
        fi
    fi
}

# shellcheck disable=SC2317 # invoked by the EXIT trap
on_exit() {
    local rc=$?
    trap - EXIT
    set +e
    cleanup
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# Packages and berth

say "installing packages (hack/install-deps.sh)"
"$hack/install-deps.sh" </dev/null >&2
# Beyond install-deps.sh: iptables for the bridge (ipMasq) and portmap plugins.
extra=()
if [[ "$(dpkg-query -W -f='${db:Status-Status}' iptables 2>/dev/null || true)" != installed ]]; then
    extra+=(iptables)
fi
if ((${#extra[@]})) || ! apt-cache show busybox >/dev/null 2>&1; then
    say "apt-get update${extra[*]:+ and install ${extra[*]}}"
    apt-get update -q </dev/null >&2
    if ((${#extra[@]})); then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${extra[@]}" </dev/null >&2
    fi
fi
for tool in ipcmk ipcrm iptables ip; do
    command -v "$tool" >/dev/null || die "$tool not found after installing packages"
done

if [[ -n "$berth_bin" ]]; then
    [[ -x "$berth_bin" ]] || die "--berth $berth_bin is not an executable"
    berth_bin=$(realpath -- "$berth_bin")
else
    export PATH="$HOME/.cargo/bin:$PATH"
    command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
    say "building berth (cargo build --release)"
    (cd "$repo" && cargo build --release --locked) >&2 || die "cargo build failed"
    berth_bin="$repo/target/release/berth"
fi

mkdir -p "$out"
out=$(realpath -- "$out")
rm -f "$out"/{junit.xml,critest.log,berth.log,registry.log,images.json,config.toml,cni.conflist,summary.txt}

tmp=$(mktemp -d /tmp/berth-conformance.XXXXXX)
chmod 0755 "$tmp"
sock="$tmp/berth.sock"
shm_before=$(awk 'NR > 1 { print $2 }' /proc/sysvipc/shm 2>/dev/null | tr '\n' ' ')
shm_recorded=1
forward_before=$(cat /proc/sys/net/ipv4/ip_forward)

# ---------------------------------------------------------------------------
# Registry and images

say "starting a registry in $tmp/registry"
addr=$("$hack/registry.sh" start "$tmp/registry")
say "registry at $addr; building and pushing the critest images"
"$repo/conformance/build-images.py" --registry "$addr" --out "$out/images.json" >&2 ||
    die "building the images failed"

# ---------------------------------------------------------------------------
# CNI: a bridge on a free private /24, host-local IPAM kept in $tmp, portmap.

suffix=$(($$ % 100000))
bridge="berthcf$suffix"
netname="berth-conformance-$suffix"
ip link show "$bridge" >/dev/null 2>&1 && die "bridge $bridge already exists (another run?)"
subnet=
for n in $(seq 0 255); do
    candidate="10.231.$n.0/24"
    if [[ -z "$(ip -4 -o route show to match "$candidate" | grep -v '^default' || true)" ]] &&
        [[ -z "$(ip -4 -o route show root "$candidate")" ]] &&
        ! ip -4 -o addr show | grep -q " 10\.231\.$n\."; then
        subnet=$candidate
        break
    fi
done
[[ -n "$subnet" ]] || die "no free /24 in 10.231.0.0/16 for the CNI bridge"
mkdir -p "$tmp/cni" "$tmp/cni-ipam" "$tmp/critest-tmp"
cat >"$tmp/cni/10-berth-conformance.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$netname",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$tmp/cni-ipam",
        "ranges": [[{"subnet": "$subnet"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true}
    }
  ]
}
EOF
cp "$tmp/cni/10-berth-conformance.conflist" "$out/cni.conflist"
say "CNI network $netname: bridge $bridge on $subnet"

# ---------------------------------------------------------------------------
# berth

{
    echo "# Written by berth conformance/run.sh: offline critest run."
    echo 'log_level = "info"'
    echo
    echo '[network]'
    echo 'mode = "cni"'
    echo "cni_conf_dir = \"$tmp/cni\""
    echo 'cni_bin_dirs = ["/usr/lib/cni"]'
    echo
    echo '[image]'
    echo 'insecure_loopback = true'
    for prefix in registry.k8s.io gcr.io public.ecr.aws docker.io; do
        echo
        echo '[[registry]]'
        echo "prefix = \"$prefix\""
        echo '# Offline: only the local mirror; a missing image fails instead of leaking out.'
        echo 'blocked = true'
        echo '[[registry.mirror]]'
        echo "location = \"$addr/$prefix\""
        echo 'insecure = true'
    done
} >"$tmp/config.toml"
cp "$tmp/config.toml" "$out/config.toml"

say "starting berth ($berth_bin serve, socket $sock)"
setsid "$berth_bin" serve --config "$tmp/config.toml" --socket "$sock" \
    --root "$tmp/root" --state "$tmp/state" </dev/null >"$out/berth.log" 2>&1 &
berth_pid=$!
deadline=$((SECONDS + BERTH_READY_TIMEOUT_S))
until python3 -c 'import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])' "$sock" 2>/dev/null; do
    if ! kill -0 "$berth_pid" 2>/dev/null; then
        tail -n 20 "$out/berth.log" >&2
        berth_pid=
        die "berth exited during start (log: $out/berth.log)"
    fi
    ((SECONDS < deadline)) || die "berth did not listen on $sock within ${BERTH_READY_TIMEOUT_S}s"
    sleep 0.2
done
say "berth is up (pid $berth_pid)"

# Mirror smoke test with a benchmark-only image (no spec of a validation run
# pulls it): it must come through the mirror under its original name.
if command -v crictl >/dev/null; then
    smoke=public.ecr.aws/docker/library/busybox:1-musl
    cr=(crictl --runtime-endpoint "unix://$sock" --image-endpoint "unix://$sock" --timeout 60s)
    if "${cr[@]}" pull "$smoke" >&2 &&
        "${cr[@]}" inspecti -o json "$smoke" | python3 -c '
import json, sys
want = sys.argv[1]
st = json.load(sys.stdin)["status"]
tags, digests = st.get("repoTags", []), st.get("repoDigests", [])
ok = tags == [want] and any(d.startswith(want.rsplit(":", 1)[0] + "@sha256:") for d in digests)
print(f"run.sh: mirror check: {want}: repoTags {tags}, repoDigests {digests}", file=sys.stderr)
sys.exit(0 if ok else 1)' "$smoke"; then
        say "mirror check passed"
    else
        say "warning: mirror check failed: $smoke did not pull through the mirror under its own name"
    fi
    "${cr[@]}" rmi "$smoke" >/dev/null 2>&1 || true
fi

# ---------------------------------------------------------------------------
# critest

skips=("${ALWAYS_SKIP[@]}")
if [[ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null || true)" != Y ]]; then
    skips+=('\[k8s\.io\] AppArmor')
fi
if [[ ! -e /sys/fs/selinux/enforce ]]; then
    skips+=('\[k8s\.io\] SELinux')
fi
skips+=("${skip[@]}")
args=(--runtime-endpoint "unix://$sock" --image-endpoint "unix://$sock"
    --ginkgo.junit-report "$out/junit.xml" --ginkgo.timeout "$timeout" --ginkgo.no-color)
for s in "${skips[@]}"; do
    args+=(--ginkgo.skip "$s")
done
for f in "${focus[@]}"; do
    args+=(--ginkgo.focus "$f")
done

for port in 12000 12001 12002 12003; do
    if ss -Hltn "sport = :$port" | grep -q .; then
        say "warning: host port $port is in use; the port-mapping and port-forward specs need it"
    fi
done

say "running critest (log: $out/critest.log)"
say "critest ${args[*]}"
# In the background and waited for, so that a signal to this script runs the
# EXIT trap at once (which interrupts critest: ginkgo then runs its cleanups).
(cd "$tmp" && TMPDIR="$tmp/critest-tmp" exec critest "${args[@]}") > >(tee "$out/critest.log" >&2) 2>&1 &
critest_pid=$!
critest_rc=0
wait "$critest_pid" || critest_rc=$?
critest_pid=
say "critest exited with $critest_rc"
[[ -s "$out/junit.xml" ]] || die "critest wrote no JUnit report ($out/junit.xml)"

# ---------------------------------------------------------------------------
# Summary

python3 - "$out/junit.xml" >"$out/summary.txt" <<'EOF'
import sys
import xml.etree.ElementTree as ET

passed, failed, skipped = 0, [], 0
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    name = case.get("name", "")
    status = case.get("status")
    if status is None:
        tags = {child.tag for child in case}
        status = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
    bad = status not in ("passed", "skipped", "pending")
    # Suite nodes ([BeforeSuite], [AfterSuite], ...) count only if they fail.
    if not name.startswith("[It]") and not bad:
        continue
    if bad:
        failed.append(name[len("[It] "):] if name.startswith("[It] ") else name)
    elif status == "passed":
        passed += 1
    else:
        skipped += 1
for name in failed:
    print(f"FAILED: {name}")
print(f"{passed} passed, {len(failed)} failed, {skipped} skipped")
EOF

# Clean up now, so that the result is the last thing printed.
set +e
cleanup
set -e
cat "$out/summary.txt"
if grep -q '^FAILED: ' "$out/summary.txt"; then
    exit 1
fi
exit 0
