#!/usr/bin/env bash
# containerd-peer.sh: run Debian's containerd beside berth, on its own socket
# and directories, so that `berth bench --compare` has a real peer on this
# machine.
#
# Usage (as root, on Debian bookworm):
#   hack/containerd-peer.sh start [--registry 127.0.0.1:PORT]
#                                 [--cni-conf-dir DIR] [--cni-bin-dir DIR]
#   hack/containerd-peer.sh stop      stop it and remove everything it made
#   hack/containerd-peer.sh status    exit 0 and print the socket if it answers
#
# start installs the packages containerd, runc and containernetworking-plugins
# when missing (apt-get, non-interactive, with service starts disabled: the
# system's containerd service is never started or touched), then starts
# containerd with:
#   socket  /run/berth-peer/containerd.sock   (print by start and status)
#   root    /var/lib/berth-peer               state /run/berth-peer/state
#   config  /run/berth-peer/config.toml       log   /run/berth-peer/containerd.log
#   runc    root /run/berth-peer/runc, cgroupfs driver
# and a CRI plugin set up the way berth's test rig is:
#   registry  the local test registry (--registry, else $BERTH_TEST_REGISTRY)
#             over plain HTTP, and mirrors that send registry.k8s.io, gcr.io,
#             public.ecr.aws and docker.io to REGISTRY/<host>/... (the layout
#             conformance/build-images.py pushes), via hosts.toml files;
#   sandbox   REGISTRY/berth-test/pause:latest, pushed by
#             hack/build-test-images.py (run here if the registry lacks it);
#   CNI       --cni-conf-dir / $BERTH_PEER_CNI_CONF_DIR, else a bridge
#             conflist written here (network "berth-peer", bridge berthpeer0,
#             10.209.0.0/16, no masquerade, no iptables); plugins from
#             --cni-bin-dir / $BERTH_PEER_CNI_BIN_DIR, else /usr/lib/cni.
# start returns once the CRI plugin answers; if a peer is already running it
# just prints the socket.
#
# stop kills the pods' processes (through ctr, then by signal), containerd and
# its shims (those whose -address is this socket), unmounts everything under
# the root and state dirs, removes the network namespaces its pods held, its
# shim sockets, the berthpeer0 bridge and CNI IPAM state of network
# berth-peer, and both directories. The packages stay installed.
set -euo pipefail

readonly PEER_RUN=/run/berth-peer
readonly SOCK=$PEER_RUN/containerd.sock
readonly STATE=$PEER_RUN/state
readonly ROOT=/var/lib/berth-peer
readonly CONFIG=$PEER_RUN/config.toml
readonly LOG=$PEER_RUN/containerd.log
readonly PIDFILE=$PEER_RUN/containerd.pid
readonly MARKER=$PEER_RUN/.berth-peer
readonly HOSTS_DIR=$PEER_RUN/certs.d
readonly DEFAULT_CNI_DIR=$PEER_RUN/net.d
readonly NETWORK=berth-peer
readonly BRIDGE=berthpeer0
readonly SUBNET=10.209.0.0/16
readonly NAMESPACE=k8s.io
# containerd 1.6 puts shim sockets here whatever its state dir is.
readonly SHIM_SOCKET_DIR=/run/containerd/s
readonly READY_TIMEOUT_S=30
readonly STOP_TIMEOUT_S=10
readonly PACKAGES=(containerd runc containernetworking-plugins)
readonly MIRRORED_HOSTS=(registry.k8s.io gcr.io public.ecr.aws docker.io)

die() {
    echo "containerd-peer.sh: $*" >&2
    exit 1
}

say() {
    echo "containerd-peer.sh: $*" >&2
}

usage() {
    sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# True if process $1 exists and is not a zombie.
alive() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [[ "${stat:0:1}" != Z ]]
}

cmdline_of() {
    { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null
}

# The pid of our containerd, if it runs (checked by its command line, so
# that a recycled pid is never signalled).
daemon_pid() {
    local pid
    [[ -f "$PIDFILE" ]] || return 1
    { read -r pid <"$PIDFILE"; } 2>/dev/null || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    [[ "$(cmdline_of "$pid")" == *containerd" --config $CONFIG"* ]] || return 1
    echo "$pid"
}

# Our shims: containerd-shim* processes serving this socket.
shim_pids() {
    local dir pid cmd
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        cmd=$(cmdline_of "$pid") || continue
        [[ "$cmd" == *containerd-shim* && "$cmd" == *"-address $SOCK "* ]] || continue
        echo "$pid"
    done
}

# Every descendant of the pids given (not the pids themselves).
descendants() {
    local -A parent_of=()
    local dir pid stat rest ppid
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        { read -r stat <"$dir/stat"; } 2>/dev/null || continue
        rest=${stat##*) }
        read -r _ ppid _ <<<"$rest"
        parent_of[$pid]=$ppid
    done
    local -A wanted=()
    for pid in "$@"; do
        wanted[$pid]=1
    done
    local changed=1
    while ((changed)); do
        changed=0
        for pid in "${!parent_of[@]}"; do
            if [[ -z "${wanted[$pid]-}" && -n "${wanted[${parent_of[$pid]}]-}" ]]; then
                wanted[$pid]=2
                changed=1
            fi
        done
    done
    for pid in "${!wanted[@]}"; do
        [[ "${wanted[$pid]}" == 2 ]] && echo "$pid"
    done
    return 0
}

installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        installed "$pkg" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' postinst from starting containerd.service: only our
    # own policy when the machine has none, removed right after.
    local policy=/usr/sbin/policy-rc.d ours=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# temporary, from berth hack/containerd-peer.sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        ours=1
    fi
    local rc=0
    {
        apt-get update -q &&
            apt-get install -y -q --no-install-recommends \
                -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
                "${missing[@]}"
    } </dev/null >&2 || rc=$?
    if ((ours)); then
        rm -f "$policy"
    fi
    ((rc == 0)) || die "apt-get install ${missing[*]} failed"
    for pkg in "${missing[@]}"; do
        installed "$pkg" || die "$pkg is still not installed"
    done
}

check_registry() {
    local addr=$1 host port
    [[ "$addr" =~ ^(127\.[0-9]+\.[0-9]+\.[0-9]+|localhost):([0-9]+)$ ]] ||
        die "registry $addr: expected 127.0.0.1:PORT (a loopback test registry)"
    host=${BASH_REMATCH[1]}
    port=${BASH_REMATCH[2]}
    ((port > 0 && port < 65536)) || die "registry $addr: bad port"
    curl --silent --fail --max-time 5 --noproxy '*' --output /dev/null "http://$host:$port/v2/" ||
        die "no registry answers at http://$addr/v2/; start one with hack/registry.sh"
}

has_pause_image() {
    curl --silent --fail --max-time 5 --noproxy '*' --output /dev/null \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        "http://$1/v2/berth-test/pause/manifests/latest"
}

write_hosts() {
    local registry=$1 host server dir
    rm -rf "$HOSTS_DIR"
    mkdir -p "$HOSTS_DIR/$registry"
    cat >"$HOSTS_DIR/$registry/hosts.toml" <<EOF
# Written by berth hack/containerd-peer.sh: the test registry, plain HTTP.
server = "http://$registry"

[host."http://$registry"]
  capabilities = ["pull", "resolve"]
EOF
    for host in "${MIRRORED_HOSTS[@]}"; do
        server="https://$host"
        [[ "$host" == docker.io ]] && server=https://registry-1.docker.io
        dir="$HOSTS_DIR/$host"
        mkdir -p "$dir"
        cat >"$dir/hosts.toml" <<EOF
# Written by berth hack/containerd-peer.sh: $host from the test registry,
# under $registry/$host/ (the layout conformance/build-images.py pushes).
server = "$server"

[host."http://$registry/v2/$host"]
  capabilities = ["pull", "resolve"]
  override_path = true
EOF
    done
}

write_default_cni() {
    mkdir -p "$DEFAULT_CNI_DIR"
    cat >"$DEFAULT_CNI_DIR/10-$NETWORK.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$SUBNET"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
}

write_config() {
    local pause=$1 cni_conf=$2 cni_bin=$3
    cat >"$CONFIG" <<EOF
# Written by berth hack/containerd-peer.sh for containerd 1.6 (config v2).
version = 2
root = "$ROOT"
state = "$STATE"
oom_score = 0

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Pod netns pins under the state dir, not /run/netns: stop finds them all.
  netns_mounts_under_state_dir = true
  enable_selinux = false
  # Never below containerd's own score: lowering it needs CAP_SYS_RESOURCE,
  # which some hosts (VM sandboxes) withhold even from root.
  restrict_oom_score_adj = true
  max_container_log_line_size = 16384

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "$PEER_RUN/runc"
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$cni_bin"
    conf_dir = "$cni_conf"
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$HOSTS_DIR"

[plugins."io.containerd.internal.v1.opt"]
  path = "$ROOT/opt"
EOF
}

# True once containerd answers and its CRI plugin loaded.
cri_ready() {
    local plugins
    plugins=$(ctr --address "$SOCK" plugins ls 2>/dev/null) || return 1
    grep -Eq '^io\.containerd\.grpc\.v1[[:space:]]+cri[[:space:]].*[[:space:]]ok[[:space:]]*$' <<<"$plugins"
}

cmd_status() {
    daemon_pid >/dev/null || return 1
    cri_ready || return 1
    echo "$SOCK"
}

cmd_start() {
    local registry=${BERTH_TEST_REGISTRY-} cni_conf=${BERTH_PEER_CNI_CONF_DIR-}
    local cni_bin=${BERTH_PEER_CNI_BIN_DIR-/usr/lib/cni}
    registry=${BERTH_PEER_REGISTRY:-$registry}
    while (($#)); do
        case "$1" in
            --registry) registry=${2-}; shift 2 ;;
            --cni-conf-dir) cni_conf=${2-}; shift 2 ;;
            --cni-bin-dir) cni_bin=${2-}; shift 2 ;;
            *) usage ;;
        esac
    done
    ((EUID == 0)) || die "run as root: containerd mounts, makes namespaces and cgroups"
    if cmd_status >/dev/null; then
        echo "$SOCK"
        return 0
    fi
    if [[ -e "$PEER_RUN" || -e "$ROOT" ]]; then
        say "a stopped or broken peer left files; removing them first"
        cmd_stop
    fi
    [[ -n "$registry" ]] ||
        die "no registry: pass --registry 127.0.0.1:PORT or set BERTH_TEST_REGISTRY (see hack/test-env.sh)"
    install_packages
    command -v curl >/dev/null || die "curl not found; run hack/install-deps.sh"
    check_registry "$registry"

    mkdir -p "$PEER_RUN" "$STATE" "$ROOT"
    touch "$MARKER"
    if ! has_pause_image "$registry"; then
        say "pushing the test images (with berth-test/pause) to $registry"
        "$(dirname "$0")/build-test-images.py" --registry "$registry" \
            --out "$PEER_RUN/images.json" --quiet ||
            die "hack/build-test-images.py failed"
    fi
    write_hosts "$registry"
    if [[ -z "$cni_conf" ]]; then
        write_default_cni
        cni_conf=$DEFAULT_CNI_DIR
        touch "$PEER_RUN/.owns-bridge"
    fi
    [[ -d "$cni_conf" ]] || die "CNI config dir $cni_conf does not exist"
    [[ -x "$cni_bin/bridge" && -x "$cni_bin/loopback" ]] ||
        die "$cni_bin lacks the bridge and loopback CNI plugins"
    write_config "$registry/berth-test/pause:latest" "$cni_conf" "$cni_bin"
    # containerd 1.6 keeps shim sockets in /run/containerd/s even with its own
    # state dir; note whether those dirs are ours to remove on stop.
    [[ -e /run/containerd ]] || touch "$PEER_RUN/.owns-run-containerd"
    # Likewise the CNI plugins' state dir (host-local IPAM, result cache),
    # and the /k8s.io cgroups runc makes as the pods' parent.
    [[ -e /var/lib/cni ]] || touch "$PEER_RUN/.owns-var-lib-cni"
    compgen -G "/sys/fs/cgroup/*/$NAMESPACE" >/dev/null ||
        [[ -e "/sys/fs/cgroup/$NAMESPACE" ]] || touch "$PEER_RUN/.owns-k8s-cgroups"

    : >"$LOG"
    # setsid: its own session, so that the caller's terminal never signals it.
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        setsid containerd --config "$CONFIG" </dev/null >>"$LOG" 2>&1 &
    echo $! >"$PIDFILE"

    local deadline=$((SECONDS + READY_TIMEOUT_S)) pid
    pid=$(cat "$PIDFILE")
    while ((SECONDS < deadline)); do
        if ! alive "$pid"; then
            say "containerd exited during start; log tail:"
            tail -n 30 "$LOG" >&2 || true
            cmd_stop
            exit 1
        fi
        if cri_ready; then
            say "containerd $(containerd --version | awk '{print $3}') (pid $pid) serves CRI on $SOCK"
            echo "$SOCK"
            return 0
        fi
        sleep 0.2
    done
    say "containerd did not serve CRI within ${READY_TIMEOUT_S}s; log tail:"
    tail -n 30 "$LOG" >&2 || true
    cmd_stop
    exit 1
}

# Kill and delete every task and container of the k8s.io namespace through
# containerd, so that runc removes its cgroups and rootfs mounts.
remove_tasks() {
    local id
    local -a ctr_cmd=(timeout 10 ctr --address "$SOCK" --namespace "$NAMESPACE")
    while read -r id; do
        [[ -n "$id" ]] || continue
        "${ctr_cmd[@]}" tasks kill --all --signal SIGKILL "$id" >/dev/null 2>&1 || true
    done < <("${ctr_cmd[@]}" tasks ls --quiet 2>/dev/null || true)
    sleep 0.5
    while read -r id; do
        [[ -n "$id" ]] || continue
        "${ctr_cmd[@]}" tasks delete --force "$id" >/dev/null 2>&1 || true
    done < <("${ctr_cmd[@]}" tasks ls --quiet 2>/dev/null || true)
    while read -r id; do
        [[ -n "$id" ]] || continue
        "${ctr_cmd[@]}" containers delete "$id" >/dev/null 2>&1 || true
    done < <("${ctr_cmd[@]}" containers ls --quiet 2>/dev/null || true)
}

signal_and_wait() {
    local pid=$1 deadline
    kill -TERM "$pid" 2>/dev/null || return 0
    deadline=$((SECONDS + STOP_TIMEOUT_S))
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            say "pid $pid ignored SIGTERM for ${STOP_TIMEOUT_S}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    for _ in $(seq 50); do
        alive "$pid" || break
        sleep 0.1
    done
}

# Mount points at or under $1, deepest first.
mounts_under() {
    findmnt --raw --noheadings --output TARGET |
        awk -v p="$1" '$0 == p || index($0, p "/") == 1' |
        awk '{ print length($0) " " $0 }' | sort -rn | cut -d' ' -f2-
}

unmount_under() {
    local target
    while read -r target; do
        [[ -n "$target" ]] || continue
        umount "$target" 2>/dev/null || umount --lazy "$target" 2>/dev/null ||
            say "cannot unmount $target"
    done < <(mounts_under "$1")
}

cmd_stop() {
    ((EUID == 0)) || die "run as root"
    if [[ -e "$PEER_RUN" && ! -e "$MARKER" ]]; then
        die "$PEER_RUN was not made by containerd-peer.sh; refusing to remove it"
    fi

    # What the pods hold, found before anything is killed: their processes,
    # network namespaces (by inode) and cgroups.
    local -a shims=() procs=()
    local -A netns_inodes=() cgroups=()
    local pid host_netns inode line path
    local -a shim_ids=() args=()
    mapfile -t shims < <(shim_pids)
    if ((${#shims[@]})); then
        mapfile -t procs < <(descendants "${shims[@]}")
    fi
    local i
    for pid in "${shims[@]}"; do
        mapfile -d '' -t args 2>/dev/null <"/proc/$pid/cmdline" || continue
        for ((i = 0; i + 1 < ${#args[@]}; i++)); do
            [[ "${args[i]}" == -id ]] && shim_ids+=("${args[i + 1]}")
        done
    done
    host_netns=$(stat -L -c %i /proc/self/ns/net)
    for pid in "${procs[@]}"; do
        inode=$(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null) || continue
        [[ "$inode" == "$host_netns" ]] || netns_inodes[$inode]=1
        while IFS= read -r line; do
            path=${line#*:*:}
            [[ "$path" != / ]] || continue
            local ctrl=${line#*:}
            ctrl=${ctrl%%:*}
            ctrl=${ctrl#name=}
            [[ -n "$ctrl" ]] || ctrl=unified
            # The container's cgroup and its parents (runc makes /k8s.io);
            # rmdir below removes only those left empty.
            while [[ "$path" != / && -n "$path" ]]; do
                cgroups["$ctrl:$path"]=1
                path=$(dirname "$path")
            done
        done <"/proc/$pid/cgroup" 2>/dev/null || true
    done

    if pid=$(daemon_pid); then
        remove_tasks
        signal_and_wait "$pid"
    fi
    # Whatever survived: the shims and the pods' processes.
    for pid in "${shims[@]}" "${procs[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in "${shims[@]}" "${procs[@]}"; do
        for _ in $(seq 50); do
            alive "$pid" || break
            sleep 0.1
        done
    done

    # Shim sockets: containerd names them by sha256 of <socket>/<namespace>/<id>.
    local id
    for id in "${shim_ids[@]}"; do
        rm -f "$SHIM_SOCKET_DIR/$(printf '%s' "$SOCK/$NAMESPACE/$id" | sha256sum | cut -d' ' -f1)"
    done

    # Network namespaces the pods held (containerd pins them in /run/netns).
    local ns
    for ns in /run/netns/*; do
        [[ -e "$ns" ]] || continue
        inode=$(stat -L -c %i "$ns" 2>/dev/null) || continue
        if [[ -n "${netns_inodes[$inode]-}" ]]; then
            umount "$ns" 2>/dev/null || umount --lazy "$ns" 2>/dev/null || true
            rm -f "$ns"
        fi
    done

    unmount_under "$ROOT"
    unmount_under "$PEER_RUN"

    # The pods' cgroups, deepest first, once their processes are gone.
    local key ctrl dir
    for key in "${!cgroups[@]}"; do
        ctrl=${key%%:*}
        path=${key#*:}
        if [[ "$ctrl" == unified ]]; then
            dir=/sys/fs/cgroup/unified$path
            [[ -d "$dir" ]] || dir=/sys/fs/cgroup$path
        else
            dir=/sys/fs/cgroup/${ctrl%%,*}$path
        fi
        echo "$dir"
    done | awk '{ print length($0) " " $0 }' | sort -rn | cut -d' ' -f2- |
        while read -r dir; do
            if [[ -d "$dir" ]]; then
                rmdir "$dir" 2>/dev/null || true
            fi
        done

    if [[ -e "$PEER_RUN/.owns-k8s-cgroups" ]]; then
        for dir in /sys/fs/cgroup/*/"$NAMESPACE" "/sys/fs/cgroup/$NAMESPACE"; do
            [[ -d "$dir" ]] || continue
            rmdir "$dir" 2>/dev/null || say "cgroup $dir is not empty; left in place"
        done
    fi

    if [[ -e "$PEER_RUN/.owns-bridge" ]] && ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link delete "$BRIDGE" || say "cannot delete bridge $BRIDGE"
    fi
    rm -rf "/var/lib/cni/networks/$NETWORK"
    rm -f /var/lib/cni/results/"$NETWORK"-*
    for id in "${shim_ids[@]}"; do
        rm -f /var/lib/cni/results/*-"$id"-*
    done
    if [[ -e "$PEER_RUN/.owns-var-lib-cni" ]]; then
        rmdir /var/lib/cni/networks /var/lib/cni/results /var/lib/cni 2>/dev/null || true
    fi

    if [[ -e "$PEER_RUN/.owns-run-containerd" ]]; then
        rmdir "$SHIM_SOCKET_DIR" 2>/dev/null || true
        rmdir /run/containerd 2>/dev/null || true
    fi
    rm -rf -- "$ROOT" "$PEER_RUN"
    local left
    left=$(findmnt --raw --noheadings --output TARGET | grep -E "^($ROOT|$PEER_RUN)(/|$)" || true)
    [[ -z "$left" ]] || die "still mounted after stop: $left"
    return 0
}

(($# >= 1)) || usage
action=$1
shift
case "$action" in
    start) cmd_start "$@" ;;
    stop) (($# == 0)) || usage; cmd_stop ;;
    status) (($# == 0)) || usage; cmd_status || die "no containerd peer answering on $SOCK" ;;
    *) usage ;;
esac
