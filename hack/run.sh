#!/usr/bin/env bash
# run.sh: set up and run the berth daemon with its embedded defaults. This is
# the README's run command.
#
# Usage (as root):
#   hack/run.sh [berth serve flags...]
#
# Installs protoc when missing (the CRI protos are compiled at build time),
# builds berth in release mode and runs `berth serve` in the foreground: CRI
# socket /run/berth/berth.sock, data in /var/lib/berth, state in /run/berth,
# /etc/berth/config.toml and its config.d/ drop-ins when present. Ctrl-C or
# SIGTERM stops the daemon; containers are never stopped by that.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if [ "$(id -u)" -ne 0 ]; then
    echo "run.sh: run as root: berth creates namespaces, mounts and cgroups" >&2
    exit 1
fi

if ! command -v protoc >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q </dev/null
    apt-get install -y -q --no-install-recommends protobuf-compiler </dev/null
fi

cargo build --release --locked
exec target/release/berth serve "$@"
