#!/usr/bin/env bash
# apparmor-vm.sh: run berth's AppArmor tests on a kernel that has AppArmor,
# for hosts (CI VMs, dev containers) whose own kernel does not.
#
# Usage (as root, on Debian bookworm; no stdin needed):
#   hack/apparmor-vm.sh
#
# Installs qemu, busybox-static and apparmor with apt-get, downloads (does
# not install) Debian's kernel package, builds the lib test binary, and boots
# that kernel under qemu with AppArmor on. The guest's init, from a small
# busybox initramfs, mounts the host's / read-only over 9p and switches to it,
# mounts proc, sysfs, securityfs, cgroup2 and a tmpfs for writes, and runs
# the test binary's AppArmor tests (`apparmor` and `executor::lsm::`), which
# load berth-default with the host's apparmor_parser. Prints the tests'
# output and exits with their status. Slow (TCG emulation where the CPU has
# no virtualisation), so neither hack/test.sh nor CI runs it.
#
# Environment: CARGO_TARGET_DIR and CARGO_BUILD_JOBS as for cargo;
# BERTH_VM_ACCEL=kvm|tcg to override the accelerator; BERTH_VM_TIMEOUT
# (seconds, default 900) bounds the VM's run.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if [ "$(id -u)" -ne 0 ]; then
    echo "apparmor-vm.sh: run as root (apt-get, and the tests need root in the VM)" >&2
    exit 1
fi

work=$(mktemp -d /tmp/berth-apparmor-vm.XXXXXX)
qemu_pid=
cleanup() {
    if [ -n "$qemu_pid" ]; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends busybox-static apparmor gzip jq >/dev/null
if ! command -v qemu-system-x86_64 >/dev/null; then
    # Where qemu-utils came from backports, qemu-system must too.
    # shellcheck source=/dev/null
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    apt-get install -y -q --no-install-recommends qemu-system-x86 >/dev/null ||
        apt-get install -y -q --no-install-recommends -t "$codename-backports" qemu-system-x86 >/dev/null
fi

# The kernel is only unpacked into $work: the host's /boot stays as it is.
kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
if [ -z "$kpkg" ]; then
    echo "apparmor-vm.sh: no linux-image-amd64 dependency found" >&2
    exit 1
fi
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >/dev/null)
dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/kernel"
kver=${kpkg#linux-image-}
vmlinuz="$work/kernel/boot/vmlinuz-$kver"
kmod="$work/kernel/lib/modules/$kver/kernel"
if ! grep -q '^CONFIG_SECURITY_APPARMOR=y' "$work/kernel/boot/config-$kver"; then
    echo "apparmor-vm.sh: $kpkg has no AppArmor built in" >&2
    exit 1
fi
echo "kernel: $kpkg"

echo "== build the test binary"
test_bin=$(cargo test --lib --no-run --message-format=json |
    jq -r 'select(.reason == "compiler-artifact" and .target.kind == ["lib"]
                  and .profile.test and .executable != null) | .executable' |
    tail -n 1)
if [ -z "$test_bin" ] || [ ! -x "$test_bin" ]; then
    echo "apparmor-vm.sh: cargo reported no lib test binary" >&2
    exit 1
fi
# The guest sees the host's / (hence $work) read-only over 9p.
cp "$test_bin" "$work/berth-tests"
echo "test binary: $test_bin"

echo "== initramfs"
initrd="$work/initrd"
mkdir -p "$initrd"/{bin,mod,proc,sys,dev,newroot}
cp /bin/busybox "$initrd/bin/busybox"
# 9p over virtio-pci, in dependency order; a module the kernel has built in
# is simply absent.
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
netfs fscache 9pnet 9pnet_virtio 9p"
for m in $modules; do
    find "$kmod" -name "$m.ko" -exec cp {} "$initrd/mod/" \;
done
cat >"$initrd/init" <<EOF
#!/bin/busybox sh
bb=/bin/busybox
\$bb mount -t proc proc /proc
\$bb mount -t sysfs sysfs /sys
\$bb mount -t devtmpfs dev /dev
for m in $(echo "$modules" | tr '\n' ' '); do
    [ -e /mod/\$m.ko ] && \$bb insmod /mod/\$m.ko
done
if ! \$bb mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000 hostroot /newroot; then
    echo "berth-apparmor-vm: cannot mount the host's root over 9p"
    \$bb poweroff -f
fi
\$bb mount -t tmpfs -o mode=755 run /newroot/run
\$bb umount /proc /sys
\$bb mount --move /dev /newroot/dev
exec \$bb switch_root /newroot /bin/sh $work/inner.sh
EOF
chmod +x "$initrd/init"
(cd "$initrd" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 >"$work/initrd.gz")

# Runs as pid 1 on the host's read-only root.
cat >"$work/inner.sh" <<EOF
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/run/home TMPDIR=/run/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t securityfs securityfs /sys/kernel/security
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p /dev/pts /dev/shm "\$HOME" "\$TMPDIR"
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
echo "berth-apparmor-vm: kernel \$(uname -r), lsm \$(cat /sys/kernel/security/lsm)," \
    "apparmor enabled: \$(cat /sys/module/apparmor/parameters/enabled)"
$work/berth-tests apparmor executor::lsm:: --test-threads=1 --nocapture
rc=\$?
echo "berth-apparmor-vm: the kernel's apparmor audit messages:"
dmesg | grep 'apparmor="'
echo "berth-apparmor-vm: rc=\$rc"
# Powers off at once, before pid 1 can exit (a kernel panic).
exec busybox poweroff -f
EOF

accel=${BERTH_VM_ACCEL:-}
if [ -z "$accel" ]; then
    # /dev/kvm may exist where the CPU offers no virtualisation (nested
    # guests); KVM then hangs, so ask the CPU flags.
    if [ -w /dev/kvm ] && grep -qE '^flags.*\b(vmx|svm)\b' /proc/cpuinfo; then
        accel=kvm
    else
        accel=tcg
    fi
fi
cpu=max
[ "$accel" = kvm ] && cpu=host

echo "== boot $kpkg ($accel)"
log="$work/console.log"
: >"$log"
timeout "${BERTH_VM_TIMEOUT:-900}" qemu-system-x86_64 \
    -accel "$accel" -cpu "$cpu" -m 1024 -smp 1 \
    -display none -monitor none -serial "file:$log" -no-reboot \
    -kernel "$vmlinuz" -initrd "$work/initrd.gz" \
    -append "console=ttyS0 panic=-1 loglevel=4 audit=1 apparmor=1 security=apparmor" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on &
qemu_pid=$!
tail -n +1 -f --pid="$qemu_pid" "$log" &
wait "$qemu_pid" || echo "apparmor-vm.sh: qemu exited with status $?" >&2
qemu_pid=
wait

rc=$(sed -n 's/^berth-apparmor-vm: rc=\([0-9]*\).*/\1/p' "$log" | tail -n 1)
if [ -z "$rc" ]; then
    echo "apparmor-vm.sh: the tests did not finish in the VM" >&2
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    echo "apparmor-vm.sh: AppArmor tests failed in the VM (exit $rc)" >&2
    exit "$rc"
fi
echo "apparmor-vm.sh: AppArmor tests passed on $kpkg"
