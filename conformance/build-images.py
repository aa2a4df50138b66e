#!/usr/bin/env python3
"""build-images.py: build every image critest v1.32 pulls and push it to a local registry.

Usage:
  conformance/build-images.py --registry 127.0.0.1:PORT [--out FILE]
                              [--busybox /bin/busybox] [--dynamic-busybox PATH | --static-only]
                              [--no-benchmark] [--quiet]

What is built follows conformance/IMAGES.md (section 5 sums it up). Every
image is pushed under "<upstream host>/<upstream path>" in the local
registry, so that berth's registry mirrors, one per upstream host with
location "127.0.0.1:PORT/<upstream host>", serve the original names:

  registry.k8s.io/e2e-test-images/busybox:1.29-2
    -> 127.0.0.1:PORT/registry.k8s.io/e2e-test-images/busybox:1.29-2

Contents: Debian's busybox with every applet a *hard link* (a bind mount on a
symlink would mask busybox itself), the upstream busybox passwd/group, /tmp
1777, and per image the stand-in scripts, users and config that IMAGES.md
specifies (nginx, hostnet-nginx and httpd stand-ins on busybox httpd, the
setuid nonewprivs stand-in, the predefined-group and image-user images, the
pull-only test-image-* images, test-image-tags as one manifest under three
tags, and, unless --no-benchmark, the public.ecr.aws busybox tags the
benchmarks list).

The default test image (registry.k8s.io/e2e-test-images/busybox:1.29-2) is
built from Debian's *dynamic* busybox (package `busybox`) plus the glibc
files it loads, because busybox-static's shell runs applets without a PATH
lookup and "runtime should support MaskedPaths" can then never see
"/bin/sh: ls: Permission denied". The `busybox` package conflicts with
busybox-static, so it is not installed: unless --dynamic-busybox names an
unpacked binary, its .deb is fetched with `apt-get download busybox` and
unpacked with `dpkg-deb -x` into a temporary directory. --static-only builds
that image from busybox-static too (MaskedPaths must then be skipped). Every
other image uses busybox-static.

The image code (layers, reproducible tars, blobs, the registry client) is
hack/build-test-images.py's, imported as a module; its CLI is untouched.
Reproducible as that rig is: entries sorted, fixed mtimes, numeric owners,
gzip without mtime or name, canonical JSON. The same busybox binaries, glibc
files, Python tarfile and zlib give the same digests on every run. Each image
config has the label berth.conformance.image=<key>, so every image that is
meant to be distinct has its own image ID (critest compares whole RepoTags
lists), while test-image-tags:1/2/3 are one manifest.

--out writes a JSON description: for every original reference its local
reference, manifest digest, image ID, config User and the repo digest the
runtime must report under the original name.
"""

import argparse
import importlib.util
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RIG_PATH = os.path.join(HERE, "..", "hack", "build-test-images.py")


def load_rig():
    spec = importlib.util.spec_from_file_location("berth_build_test_images", RIG_PATH)
    if spec is None or spec.loader is None:
        sys.exit(f"build-images: cannot load {RIG_PATH}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rig = load_rig()
BuildError = rig.BuildError

LABEL = "berth.conformance.image"
GCR = "gcr.io/k8s-staging-cri-tools"
E2E = "registry.k8s.io/e2e-test-images"
ECR = "public.ecr.aws/docker/library"

# Applets the specs run (IMAGES.md 1.1-1.5); pgrep and ipcs are scripts.
DEFAULT_APPLETS = [
    "sh", "top", "echo", "sleep", "ls", "cat", "mkdir", "mount", "dd", "touch", "grep",
    "hostname", "pidof", "netstat", "id", "brctl", "ping", "chmod", "[", "test", "true",
]
SERVER_APPLETS = ["sh", "httpd", "kill", "cat", "sleep", "grep", "[", "echo", "pidof"]

# Upstream busybox (1.29 .. 1.36) /etc/passwd and /etc/group.
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "bin:x:2:2:bin:/bin:/bin/false\n"
    "sys:x:3:3:sys:/dev:/bin/false\n"
    "sync:x:4:100:sync:/bin:/bin/sync\n"
    "mail:x:8:8:mail:/var/spool/mail:/bin/false\n"
    "www-data:x:33:33:www-data:/var/www:/bin/false\n"
    "operator:x:37:37:Operator:/var:/bin/false\n"
    "nobody:x:65534:65534:nobody:/home:/bin/false\n"
)
GROUP = (
    "root:x:0:\ndaemon:x:1:\nbin:x:2:\nsys:x:3:\nadm:x:4:\ntty:x:5:\ndisk:x:6:\nlp:x:7:\n"
    "mail:x:8:\nkmem:x:9:\nwheel:x:10:root\ncdrom:x:11:\ndialout:x:18:\nfloppy:x:19:\n"
    "video:x:28:\naudio:x:29:\ntape:x:32:\nwww-data:x:33:\noperator:x:37:\nutmp:x:43:\n"
    "plugdev:x:46:\nstaff:x:50:\nlock:x:54:\nnetdev:x:82:\nusers:x:100:\nnogroup:x:65534:\n"
)
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"

# `pgrep NAME`: pids whose process name matches, never the command line (so
# `sh -c "pgrep sleep || true"` does not find itself). Silent, exit 1 when none.
PGREP = """#!/bin/sh
# berth conformance stand-in for procps pgrep: `pgrep NAME` only.
found=1
for p in $(pidof "$1"); do
    echo "$p"
    found=0
done
exit $found
"""

# `ipcs -m`: the shared memory segments of this IPC namespace; column 2 of
# /proc/sysvipc/shm is the shmid. No digits in the header: the POD-mode check
# is "the output does not contain <id>", and the id can be 0.
IPCS = """#!/bin/sh
# berth conformance stand-in for util-linux ipcs: shared memory segments only.
echo "------ Shared Memory Segments --------"
echo "key        shmid      owner      perms      bytes      nattch     status"
if [ -r /proc/sysvipc/shm ]; then
    tail -n +2 /proc/sysvipc/shm | while read -r key shmid perms size cpid lpid nattch uid rest; do
        echo "$key $shmid $uid $perms $size $nattch"
    done
fi
"""

INDEX_HTML = "<html><body><h1>It works!</h1></body></html>\n"

# registry.k8s.io/e2e-test-images/nginx:1.14-2 stand-in (IMAGES.md 1.2).
# Started through its shebang, its comm is "nginx"; argv carries
# "master process"; it writes its own pid to /var/run/nginx.pid.
NGINX = """#!/bin/sh
# berth conformance stand-in for nginx 1.14: busybox httpd on port 80.
# comm "nginx" (this script's name), "master process" in argv (the image Cmd),
# its own pid in /var/run/nginx.pid, and it exits 0 on SIGTERM even as PID 1.
httpd -f -p 80 -h /usr/share/nginx/html &
pid=$!
trap 'kill "$pid" 2>/dev/null; exit 0' TERM INT
echo $$ > /var/run/nginx.pid
wait "$pid"
"""

# gcr.io/k8s-staging-cri-tools/hostnet-nginx-amd64 stand-in (IMAGES.md 1.3).
HOSTNET_NGINX = """#!/bin/sh
# berth conformance stand-in for hostnet-nginx (nginx listening on 12003).
httpd -f -p 12003 -h /usr/share/nginx/html &
pid=$!
trap 'kill "$pid" 2>/dev/null; exit 0' TERM INT
echo $$ > /var/run/nginx.pid
wait "$pid"
"""

# registry.k8s.io/e2e-test-images/httpd:2.4.39-4 stand-in (IMAGES.md 1.4):
# the log must contain "httpd" before any request arrives.
HTTPD_FOREGROUND = """#!/bin/sh
# berth conformance stand-in for Apache httpd 2.4.39: busybox httpd on port 80.
echo "httpd: berth conformance stand-in for Apache httpd 2.4.39, serving /usr/local/apache2/htdocs on port 80"
httpd -f -v -p 80 -h /usr/local/apache2/htdocs &
pid=$!
trap 'kill "$pid" 2>/dev/null; exit 0' TERM INT
wait "$pid"
"""

# registry.k8s.io/e2e-test-images/nonewprivs:1.3 stand-in (IMAGES.md 1.5).
# /nnp/id is a setuid-root busybox copy and /etc/busybox.conf lets its `id`
# applet keep euid 0 ("id = ssx root.root"). With no_new_privs the setuid bit
# is not honoured, and busybox then dies in its suid check (setresuid to
# root: EPERM) instead of printing anything. So the fallback after `||` reads
# the effective uid (field 3 of "Uid:") from /proc/self/status with shell
# builtins only: with that busybox.conf present, busybox-static applets run
# by a non-root user misbehave (`id` hits the same rule, `awk` segfaults).
# If the runtime ignores NoNewPrivs, /nnp/id prints 0; if it loses the setuid
# bit (nosuid, mode or owner not kept) without NoNewPrivs, the fallback prints
# 1000: either way the spec fails, as it should.
NNP_ENTRYPOINT = [
    "/bin/sh", "-c",
    'echo "Effective uid: $(/nnp/id -u 2>/dev/null || '
    'while read -r key real effective rest; do [ "$key" = Uid: ] && echo "$effective"; done </proc/self/status)"',
]

NGINX_CMD = ["/usr/sbin/nginx", "nginx: master process nginx -g daemon off;"]


def log(msg):
    if not ARGS.quiet:
        print(f"build-images: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Content


def read_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BuildError(f"read {path}: {e.strerror}") from None


def applets_of(binary, required):
    try:
        out = subprocess.run([binary, "--list"], stdout=subprocess.PIPE, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"{binary} --list: {e}") from None
    applets = sorted({a for a in out.stdout.decode().split() if a})
    for a in applets:
        if "/" in a or a in (".", ".."):
            raise BuildError(f"{binary}: unexpected applet name {a!r}")
    missing = [a for a in required if a not in applets]
    if missing:
        raise BuildError(f"{binary} lacks applets: {' '.join(missing)}")
    return applets


def shared_libraries(binary):
    """{path in the image: host file} for what the dynamic binary loads, as
    ldd resolves it (the paths ld.so will look at inside the image)."""
    try:
        out = subprocess.run(["ldd", binary], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"ldd {binary}: {e}") from None
    libs = {}
    for line in out.stdout.decode().splitlines():
        line = line.strip()
        m = re.match(r"^(\S+) => (/\S+) \(0x[0-9a-f]+\)$", line) or re.match(r"^(/\S+) \(0x[0-9a-f]+\)$", line)
        if not m:
            if line.startswith("linux-vdso") or line.startswith("linux-gate"):
                continue
            raise BuildError(f"ldd {binary}: unexpected line {line!r}")
        path = m.group(m.lastindex)
        libs[path] = os.path.realpath(path)
    if not libs:
        raise BuildError(f"ldd {binary}: no libraries; is it dynamic?")
    return libs


def busybox_layer(binary, required, libs=None, extra=None):
    """A busybox rootfs: the binary once, every applet a hard link to it."""
    applets = applets_of(binary, required)
    names = sorted(set(applets) | {"busybox"})
    layer = rig.Layer()
    for d in ("bin", "dev", "etc", "home", "proc", "sys", "usr", "usr/bin", "usr/sbin",
              "usr/local/bin", "var", "var/spool/mail", "var/www", "var/run"):
        layer.dir(d)
    layer.dir("root", mode=0o700)
    layer.dir("tmp", mode=0o1777)
    # The rig writes entries sorted by path and a hard link must follow its
    # target, so the regular file is the name that sorts first ("/bin/[" for
    # Debian's busybox) and /bin/busybox is one of its links.
    first = names[0]
    layer.file(f"bin/{first}", read_file(binary), mode=0o755)
    for a in names[1:]:
        layer.hardlink(f"bin/{a}", f"bin/{first}")
        # The rig gives link entries mode 0644; an unpacker that applies a
        # link entry's mode would then make busybox non-executable.
        layer.entries[f"/bin/{a}"]["mode"] = 0o755
    layer.file("etc/passwd", PASSWD)
    layer.file("etc/group", GROUP)
    for path, host in sorted((libs or {}).items()):
        layer.file(path, read_file(host), mode=0o755)
    if libs:
        layer.file("etc/nsswitch.conf", NSSWITCH)
    for path, (data, mode) in sorted((extra or {}).items()):
        layer.file(path, data, mode=mode)
    return layer, applets


def fetch_dynamic_busybox(tmp):
    """Debian's dynamic busybox, from its .deb (it conflicts with
    busybox-static, so it is downloaded and unpacked, not installed)."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found: pass --dynamic-busybox PATH or --static-only")
    # _apt must be able to write there, or apt warns about an unsandboxed download.
    os.chmod(tmp, 0o755)
    dl = os.path.join(tmp, "dl")
    os.mkdir(dl)
    try:
        shutil.chown(dl, user="_apt")
    except (LookupError, OSError):
        pass
    r = subprocess.run(["apt-get", "download", "-q", "busybox"], cwd=dl, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    debs = [f for f in os.listdir(dl) if f.endswith(".deb")]
    if r.returncode != 0 or len(debs) != 1:
        raise BuildError("apt-get download busybox failed (run apt-get update first?): "
                         + r.stdout.decode(errors="replace").strip()[-500:])
    deb = os.path.join(dl, debs[0])
    root = os.path.join(tmp, "root")
    r = subprocess.run(["dpkg-deb", "-x", deb, root], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise BuildError(f"dpkg-deb -x {deb}: {r.stdout.decode(errors='replace').strip()}")
    binary = os.path.join(root, "bin", "busybox")
    if not os.path.isfile(binary):
        raise BuildError(f"{deb} has no bin/busybox")
    log(f"dynamic busybox from {debs[0]}")
    return binary


# --------------------------------------------------------------------------
# Images


class Image:
    """One single-platform OCI image (config, layers, manifest) with the
    config fields these images need; blobs and layers are the rig's."""

    def __init__(self, key, built_layers, cmd=None, entrypoint=None, user="", env=None):
        self.key = key
        self.layers = built_layers
        self.user = user
        config = {"Env": env or [rig.PATH_ENV], "Labels": {LABEL: key}}
        if entrypoint:
            config["Entrypoint"] = entrypoint
        if cmd:
            config["Cmd"] = cmd
        if user:
            config["User"] = user
        cfg = {
            "created": rig.FIXED_CREATED,
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [b.blob.diff_id for b in built_layers]},
            "history": [
                {"created": rig.FIXED_CREATED, "created_by": f"berth conformance/build-images.py: {key} layer {i}"}
                for i in range(len(built_layers))
            ],
        }
        self.config = rig.Blob(rig.canonical_json(cfg), rig.OCI_CONFIG)
        self.media_type = rig.OCI_MANIFEST
        self.manifest = rig.canonical_json({
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": self.config.descriptor(),
            "layers": [b.blob.descriptor() for b in built_layers],
        })
        self.digest = rig.sha256_digest(self.manifest)

    def blobs(self):
        return [self.config] + [b.blob for b in self.layers]


def plan(args, tmp):
    """[(original reference, image)]; one image may appear under several tags."""
    t0 = time.monotonic()
    static_layer, _ = busybox_layer(args.busybox, sorted(set(DEFAULT_APPLETS + SERVER_APPLETS)))
    static = rig.BuiltLayer(static_layer)

    scripts = {"usr/bin/pgrep": (PGREP, 0o755), "usr/bin/ipcs": (IPCS, 0o755)}
    if args.static_only:
        default_base = rig.BuiltLayer(busybox_layer(args.busybox, DEFAULT_APPLETS, extra=scripts)[0])
        log("default test image from busybox-static: 'runtime should support MaskedPaths' cannot pass")
    else:
        dyn = args.dynamic_busybox or fetch_dynamic_busybox(tmp)
        default_base = rig.BuiltLayer(
            busybox_layer(dyn, DEFAULT_APPLETS, libs=shared_libraries(dyn), extra=scripts)[0])

    nginx = rig.BuiltLayer(
        rig.Layer()
        .file("usr/sbin/nginx", NGINX, mode=0o755)
        .file("usr/share/nginx/html/index.html", INDEX_HTML)
        .dir("var/run"))
    hostnet = rig.BuiltLayer(
        rig.Layer()
        .file("usr/sbin/nginx", HOSTNET_NGINX, mode=0o755)
        .file("usr/share/nginx/html/index.html", INDEX_HTML)
        .dir("var/run"))
    httpd = rig.BuiltLayer(
        rig.Layer()
        .file("usr/local/bin/httpd-foreground", HTTPD_FOREGROUND, mode=0o755)
        .file("usr/local/apache2/htdocs/index.html", INDEX_HTML))
    # A setuid-root busybox copy named `id`; busybox.conf lets it keep euid 0.
    nnp = rig.BuiltLayer(
        rig.Layer()
        .file("nnp/id", read_file(args.busybox), mode=0o4755)
        .file("etc/busybox.conf", "[SUID]\nid = ssx root.root\n", mode=0o644))
    predefined = rig.BuiltLayer(
        rig.Layer()
        .file("etc/passwd", PASSWD + "default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n")
        .file("etc/group", GROUP + "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n")
        .dir("home/default-user", mode=0o755, uid=1000, gid=1000))
    log(f"built layers in {time.monotonic() - t0:.1f}s")

    out = [
        (f"{E2E}/busybox:1.29-2", Image("e2e-busybox", [default_base], cmd=["sh"])),
        (f"{E2E}/nginx:1.14-2", Image("e2e-nginx", [static, nginx], cmd=NGINX_CMD)),
        (f"{E2E}/httpd:2.4.39-4", Image("e2e-httpd", [static, httpd], cmd=["httpd-foreground"])),
        (f"{E2E}/nonewprivs:1.3", Image("e2e-nonewprivs", [static, nnp], entrypoint=NNP_ENTRYPOINT)),
        (f"{GCR}/hostnet-nginx-amd64:latest", Image("hostnet-nginx", [static, hostnet], cmd=NGINX_CMD)),
        (f"{GCR}/test-image-predefined-group:latest",
         Image("test-image-predefined-group", [static, predefined], cmd=["sh"], user="1000")),
    ]
    for name, user in (("uid", "1002"), ("username", "www-data"), ("uid-group", "1003:1004"),
                       ("username-group", "www-data:1004")):
        out.append((f"{GCR}/test-image-user-{name}:latest",
                    Image(f"test-image-user-{name}", [static], cmd=["sh"], user=user)))
    for name in ("test-image-latest:latest", "test-image-tag:test", "test-image-tag:all",
                 "test-image-1:latest", "test-image-2:latest", "test-image-3:latest"):
        out.append((f"{GCR}/{name}", Image(name.replace(":", "-"), [static], cmd=["sh"])))
    tags = Image("test-image-tags", [static], cmd=["sh"])
    for t in ("1", "2", "3"):
        out.append((f"{GCR}/test-image-tags:{t}", tags))
    if not args.no_benchmark:
        for t in ("1.35.0-glibc", "1-uclibc", "1", "1-glibc", "1-musl"):
            out.append((f"{ECR}/busybox:{t}", Image(f"ecr-busybox-{t}", [static], cmd=["sh"])))
    return out


def split_ref(ref):
    name, _, tag = ref.rpartition(":")
    if "/" in tag or not name:
        raise BuildError(f"{ref}: expected NAME:TAG")
    return name, tag


def push(reg, entries):
    described = []
    uploaded = 0
    for ref, img in entries:
        t0 = time.monotonic()
        name, tag = split_ref(ref)
        for blob in img.blobs():
            uploaded += reg.push_blob(name, blob)
        reg.put_manifest(name, tag, img.manifest, img.media_type)
        reg.verify_manifest(name, img.digest, img.digest, img.media_type, img.manifest)
        reg.verify_manifest(name, tag, img.digest, img.media_type, accept=rig.ALL_MANIFEST_TYPES)
        for blob in img.blobs():
            reg.verify_blob(name, blob)
        log(f"pushed {reg.addr}/{ref} {img.digest} in {time.monotonic() - t0:.1f}s")
        described.append({
            "reference": ref,
            "local": f"{reg.addr}/{ref}",
            "repo_digest": f"{name}@{img.digest}",
            "manifest_digest": img.digest,
            "image_id": img.config.digest,
            "user": img.user,
            "key": img.key,
        })
    log(f"uploaded {uploaded} blobs (the rest were already there)")
    return described


def check_distinct(entries):
    """Every image ID belongs to one image; only test-image-tags has 3 tags."""
    by_id = {}
    for ref, img in entries:
        by_id.setdefault(img.config.digest, set()).add(img.key)
    for digest, keys in by_id.items():
        if len(keys) != 1:
            raise BuildError(f"images {sorted(keys)} share image ID {digest}")


def main():
    global ARGS
    parser = argparse.ArgumentParser(
        description="Build the images critest v1.32 pulls and push them to a local registry.",
        epilog="See conformance/IMAGES.md and conformance/README.md.",
    )
    parser.add_argument("--registry", required=True, help="registry address, 127.0.0.1:PORT")
    parser.add_argument("--out", help="write a JSON description of what was pushed here")
    parser.add_argument("--busybox", default="/bin/busybox", help="busybox-static binary (default /bin/busybox)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--dynamic-busybox", metavar="PATH",
                   help="Debian's dynamic busybox binary (default: fetched with apt-get download busybox)")
    g.add_argument("--static-only", action="store_true",
                   help="build the default test image from busybox-static too (MaskedPaths then fails)")
    parser.add_argument("--no-benchmark", action="store_true", help="skip the public.ecr.aws benchmark images")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ARGS = parser.parse_args()
    rig.ARGS = argparse.Namespace(quiet=ARGS.quiet)

    t0 = time.monotonic()
    try:
        rig.check_registry_arg(ARGS.registry)
        reg = rig.Registry(ARGS.registry)
        reg.check_v2()
        with tempfile.TemporaryDirectory(prefix="berth-conformance-busybox.") as tmp:
            entries = plan(ARGS, tmp)
        check_distinct(entries)
        images = push(reg, entries)
    except BuildError as e:
        print(f"build-images: {e}", file=sys.stderr)
        return 1

    if ARGS.out:
        doc = {"version": 1, "registry": ARGS.registry, "images": images}
        out = os.path.abspath(ARGS.out)
        os.makedirs(posixpath.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, out)
    log(f"{len(images)} references pushed to {ARGS.registry} in {time.monotonic() - t0:.1f}s")
    return 0


ARGS = None

if __name__ == "__main__":
    sys.exit(main())
