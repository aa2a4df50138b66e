#!/usr/bin/env bash
# test-env.sh: bring berth's integration-test environment up or down in one go:
# a local registry (hack/registry.sh) filled with the test images
# (hack/build-test-images.py).
#
# Usage:
#   hack/test-env.sh up DIR      start the registry in DIR, push the images,
#                                print the environment for the tests
#   hack/test-env.sh down DIR    stop the registry and remove DIR
#   eval "$(hack/test-env.sh up DIR)"   to export the variables into a shell
#
# `up` prints, on stdout and nothing else:
#   export BERTH_TEST_REGISTRY=127.0.0.1:PORT
#   export BERTH_TEST_IMAGES=DIR/images.json
# Progress goes to stderr. Packages are only checked (hack/install-deps.sh
# --check), never installed, so `up` works as non-root and never touches apt.
# `up` on a DIR whose registry is running re-pushes (a no-op for existing
# blobs) and rewrites images.json. On failure `up` stops what it started.
set -euo pipefail

hack=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() {
    echo "test-env.sh: $*" >&2
    exit 1
}

(($# == 2)) || die "usage: test-env.sh up|down DIR"
action=$1
dir=$(realpath -m -- "$2")

case "$action" in
    up)
        "$hack/install-deps.sh" --check >&2 ||
            die "missing packages; run hack/install-deps.sh as root"
        started=1
        if "$hack/registry.sh" status "$dir" >/dev/null 2>&1; then
            started=0
        fi
        addr=$("$hack/registry.sh" start "$dir")
        if ! "$hack/build-test-images.py" --registry "$addr" --out "$dir/images.json" >&2; then
            if ((started)); then
                "$hack/registry.sh" stop "$dir" || true
                die "building the test images failed; registry stopped"
            fi
            die "building the test images failed; the registry that was already running is left as it was"
        fi
        printf 'export BERTH_TEST_REGISTRY=%q\n' "$addr"
        printf 'export BERTH_TEST_IMAGES=%q\n' "$dir/images.json"
        ;;
    down)
        "$hack/registry.sh" stop "$dir"
        ;;
    *)
        die "usage: test-env.sh up|down DIR"
        ;;
esac
