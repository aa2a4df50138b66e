#!/usr/bin/env bash
# install-deps.sh: install the Debian packages berth's build and test rig need.
#
# Usage (as root, on Debian bookworm):
#   hack/install-deps.sh            install whatever is missing
#   hack/install-deps.sh --check    only report what is missing; exit 1 if any
#
# Idempotent and non-interactive: it asks dpkg which packages are missing,
# runs `apt-get update` once and `apt-get install` only when something is, and
# never reads stdin. Packages whose postinst would start a system service
# (docker-registry ships one) are installed with service starts disabled: the
# rig runs its own registry with hack/registry.sh and never uses the system one.
set -euo pipefail

PACKAGES=(
    protobuf-compiler           # protoc, for the CRI protos (tonic-build)
    docker-registry             # /usr/bin/docker-registry, hack/registry.sh
    busybox-static              # /bin/busybox, the content of the test images
    containernetworking-plugins # bridge/host-local/portmap/loopback for CNI tests
    iptables                    # what Debian's portmap plugin programs (CNI tests)
    iproute2                    # ip, ss
    nftables                    # nft: the built-in network's hostPort and masquerade rules
    zstd                        # the zstd test image layer
    curl                        # registry.sh readiness checks
    python3                     # build-test-images.py, free port selection
    ca-certificates
    openssl                     # a throwaway TLS key pair for the streaming server's TLS test
    procps                      # ps, for process checks in tests
    util-linux                  # nsenter, unshare, mount, setsid
    shellcheck                  # lint for hack/*.sh
)

check_only=0
case "${1-}" in
    "") ;;
    --check) check_only=1 ;;
    -h | --help)
        sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "install-deps.sh: unknown argument: $1 (try --help)" >&2
        exit 2
        ;;
esac

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != installed ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    echo "install-deps.sh: all ${#PACKAGES[@]} packages already installed"
    exit 0
fi

echo "install-deps.sh: missing: ${missing[*]}"
if ((check_only)); then
    exit 1
fi

if ((EUID != 0)); then
    echo "install-deps.sh: must run as root to install packages" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

# Keep package postinst scripts from starting services (invoke-rc.d honours
# policy-rc.d). Only install our own policy when the machine has none, and
# remove exactly that file afterwards.
policy=/usr/sbin/policy-rc.d
our_policy=0
cleanup() {
    if ((our_policy)); then
        rm -f "$policy"
    fi
}
trap cleanup EXIT
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# temporary, from berth hack/install-deps.sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    our_policy=1
fi

apt-get update -q </dev/null
apt-get install "${apt_opts[@]}" --no-install-recommends "${missing[@]}" </dev/null

still=()
for pkg in "${missing[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == installed ]] || still+=("$pkg")
done
if ((${#still[@]})); then
    echo "install-deps.sh: still not installed: ${still[*]}" >&2
    exit 1
fi
echo "install-deps.sh: installed: ${missing[*]}"
