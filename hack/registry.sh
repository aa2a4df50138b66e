#!/usr/bin/env bash
# registry.sh: run a throwaway local OCI registry (Debian's docker-registry,
# distribution 2.8) for berth's tests.
#
# Usage:
#   hack/registry.sh start DIR    start a registry owned by DIR; prints its address
#   hack/registry.sh stop DIR     stop it and remove DIR
#   hack/registry.sh status DIR   exit 0 and print the address if it answers
#
# start creates DIR (it must be absent, empty, or a DIR from an earlier start),
# writes DIR/config.yml, keeps blobs in DIR/storage, the log in DIR/registry.log,
# the pid in DIR/registry.pid and `127.0.0.1:PORT` in DIR/address. The port is
# a free one chosen at start (retried if another process takes it first); the
# registry listens on 127.0.0.1 only, plain HTTP, no auth, deletes enabled.
# start returns once GET /v2/ answers, and fails with the log tail otherwise
# (keeping DIR and its log; `stop DIR` removes it).
# If DIR already holds a running, answering registry, start just prints its
# address. The system's docker-registry service (/etc/docker/registry, port
# 5000) is never used or touched.
#
# Example:
#   hack/registry.sh start /tmp/berth-reg
#   addr=$(cat /tmp/berth-reg/address)
#   hack/build-test-images.py --registry "$addr" --out /tmp/berth-reg/images.json
#   hack/registry.sh stop /tmp/berth-reg
set -euo pipefail

readonly BINARY=/usr/bin/docker-registry
readonly MARKER=.berth-registry   # says "this DIR was made by registry.sh"
readonly START_ATTEMPTS=5
readonly READY_TIMEOUT_S=30
readonly STOP_TIMEOUT_S=10

die() {
    echo "registry.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# The pid in DIR/registry.pid, if it is alive and is our registry serving
# DIR/config.yml (so that a recycled pid is never signalled).
running_pid() {
    local dir=$1 pid cmdline
    [[ -f "$dir/registry.pid" ]] || return 1
    # `read`, not $(<file): a failed $(<file) ends a `set -e` script even
    # under `||`, and these files can vanish under us.
    { read -r pid <"$dir/registry.pid"; } 2>/dev/null || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    { cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline"); } 2>/dev/null || return 1
    [[ "$cmdline" == *docker-registry*" serve $dir/config.yml"* ]] || return 1
    echo "$pid"
}

# True if process $1 exists and is not a zombie (a zombie also passes kill -0,
# and the process that reaps it may be slow or absent).
alive() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [[ "${stat:0:1}" != Z ]]
}

# True if a distribution registry answers GET /v2/ at $1.
answers() {
    local headers
    headers=$(curl --silent --show-error --fail --max-time 2 --noproxy '*' \
        --output /dev/null --dump-header - "http://$1/v2/" 2>/dev/null) || return 1
    grep -qi '^docker-distribution-api-version: registry/2.0' <<<"$headers"
}

free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

write_config() {
    local dir=$1 port=$2 secret
    secret=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    cat >"$dir/config.yml" <<EOF
# Written by berth hack/registry.sh; throwaway test registry.
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
  fields:
    service: berth-test-registry
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
    readonly:
      enabled: false
http:
  addr: 127.0.0.1:$port
  secret: $secret
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: false
EOF
}

cmd_status() {
    local dir=$1 addr
    running_pid "$dir" >/dev/null || return 1
    { read -r addr <"$dir/address"; } 2>/dev/null || return 1
    answers "$addr" || return 1
    echo "$addr"
}

cmd_start() {
    local dir=$1 attempt port pid addr deadline
    [[ -x "$BINARY" ]] || die "$BINARY not found; run hack/install-deps.sh"
    command -v curl >/dev/null || die "curl not found; run hack/install-deps.sh"
    command -v python3 >/dev/null || die "python3 not found; run hack/install-deps.sh"

    if [[ -e "$dir" ]]; then
        [[ -d "$dir" ]] || die "$dir exists and is not a directory"
        if [[ -e "$dir/$MARKER" ]]; then
            if addr=$(cmd_status "$dir"); then
                echo "$addr"
                return 0
            fi
            # A registry from an earlier start that died or hangs: replace it.
            cmd_stop_process "$dir"
        elif [[ -n "$(ls -A "$dir")" ]]; then
            die "$dir is not empty and was not made by registry.sh; refusing to use it"
        fi
    fi
    mkdir -p "$dir/storage"
    touch "$dir/$MARKER"
    rm -f "$dir/address" "$dir/registry.pid"

    # The registry reads REGISTRY_* variables as config overrides (for
    # example REGISTRY_HTTP_ADDR); none of the caller's may leak in.
    local -a clean_env=()
    local var
    while read -r var; do
        clean_env+=(-u "$var")
    done < <(compgen -e | grep '^REGISTRY_' || true)

    for ((attempt = 1; attempt <= START_ATTEMPTS; attempt++)); do
        port=$(free_port)
        addr="127.0.0.1:$port"
        write_config "$dir" "$port"
        : >"$dir/registry.log"
        # setsid: its own session, so the caller's terminal signals and job
        # control never reach it; stop sends the signal explicitly.
        env "${clean_env[@]}" setsid "$BINARY" serve "$dir/config.yml" \
            </dev/null >>"$dir/registry.log" 2>&1 &
        pid=$!
        echo "$pid" >"$dir/registry.pid"

        deadline=$((SECONDS + READY_TIMEOUT_S))
        while ((SECONDS < deadline)); do
            if ! alive "$pid"; then
                break
            fi
            if answers "$addr"; then
                echo "$addr" >"$dir/address"
                echo "$addr"
                return 0
            fi
            sleep 0.1
        done

        if alive "$pid"; then
            # Alive but silent for READY_TIMEOUT_S: not a port race; give up.
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            echo "registry.sh: registry (pid $pid) did not answer http://$addr/v2/ within ${READY_TIMEOUT_S}s; log tail:" >&2
            tail -n 30 "$dir/registry.log" >&2 || true
            exit 1
        fi
        wait "$pid" 2>/dev/null || true
        if grep -q 'address already in use' "$dir/registry.log"; then
            echo "registry.sh: port $port was taken before the registry bound it; retrying ($attempt/$START_ATTEMPTS)" >&2
            continue
        fi
        echo "registry.sh: registry exited during start; log tail:" >&2
        tail -n 30 "$dir/registry.log" >&2 || true
        exit 1
    done
    echo "registry.sh: no free port after $START_ATTEMPTS attempts; log tail:" >&2
    tail -n 30 "$dir/registry.log" >&2 || true
    exit 1
}

# Stop the registry of DIR, if any is running; keep DIR.
cmd_stop_process() {
    local dir=$1 pid deadline
    pid=$(running_pid "$dir") || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    deadline=$((SECONDS + STOP_TIMEOUT_S))
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            echo "registry.sh: pid $pid ignored SIGTERM for ${STOP_TIMEOUT_S}s; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    # Wait for SIGKILL to land, so storage is not in use when DIR is removed.
    for _ in $(seq 50); do
        alive "$pid" || break
        sleep 0.1
    done
    rm -f "$dir/registry.pid" "$dir/address"
}

cmd_stop() {
    local dir=$1
    if [[ ! -e "$dir" ]]; then
        return 0
    fi
    [[ -e "$dir/$MARKER" ]] || die "$dir was not made by registry.sh; refusing to remove it"
    cmd_stop_process "$dir"
    rm -rf -- "$dir"
}

(($# == 2)) || usage
action=$1
dir=$2
[[ -n "$dir" ]] || usage
# Absolute and normalised: the pid check matches the path in the registry's
# command line, and a relative DIR must mean the same thing for start and stop.
dir=$(realpath -m -- "$dir")
[[ "$dir" != / ]] || die "refusing to use / as DIR"

case "$action" in
    start) cmd_start "$dir" ;;
    stop) cmd_stop "$dir" ;;
    status) cmd_status "$dir" || die "no registry answering for $dir" ;;
    *) usage ;;
esac
