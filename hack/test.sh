#!/usr/bin/env bash
# test.sh: set up and run every berth test. This is the README's test command
# and what .ci/run calls.
#
# Usage (as root, on Debian bookworm; no stdin needed):
#   hack/test.sh
#
# Installs what is missing (hack/install-deps.sh), checks formatting, lints
# with clippy -D warnings and shellcheck, starts a throwaway registry on
# 127.0.0.1 with the test images built from busybox-static, runs all unit and
# integration tests, and removes the registry and its files on the way out,
# also when something fails.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: run as root: the tests create namespaces, mounts and cgroups" >&2
    exit 1
fi

hack/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== shellcheck"
shellcheck hack/*.sh .ci/run

workdir=$(mktemp -d /tmp/berth-test.XXXXXX)
cleanup() {
    hack/registry.sh stop "$workdir/registry" >/dev/null 2>&1 || true
    rm -rf "$workdir"
    # The tests' daemons put pods without a cgroup parent under berth's
    # default one, `/berth`, which a daemon leaves standing. Removed only
    # when empty: a pod cgroup a test leaked keeps it, and shows.
    local dir
    for dir in /sys/fs/cgroup/berth /sys/fs/cgroup/*/berth; do
        if [[ -d "$dir" ]]; then
            rmdir "$dir" 2>/dev/null || true
        fi
    done
}
trap cleanup EXIT

echo "== test registry and images"
hack/registry.sh start "$workdir/registry"
hack/build-test-images.py --registry "$(cat "$workdir/registry/address")" \
    --out "$workdir/images.json" --quiet
export BERTH_TEST_REGISTRY BERTH_TEST_IMAGES
BERTH_TEST_REGISTRY=$(cat "$workdir/registry/address")
BERTH_TEST_IMAGES="$workdir/images.json"

echo "== cargo test"
cargo test --all-targets --no-fail-fast
