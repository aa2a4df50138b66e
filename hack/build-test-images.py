#!/usr/bin/env python3
"""build-test-images.py: build berth's test images and push them to a local registry.

Usage:
  hack/build-test-images.py --registry 127.0.0.1:PORT --out DIR/images.json
                            [--busybox /bin/busybox] [--bench] [--quiet]

Builds small OCI / Docker images from Debian's busybox-static (/bin/busybox)
with nothing but the Python 3 standard library (and the `zstd` CLI for the
zstd layer), pushes them over the registry HTTP API (plain HTTP, loopback
only), reads every manifest back by digest to check what the registry serves,
and writes a description of everything pushed to --out (see IMAGES_JSON_DOC
below). Start a registry first with hack/registry.sh.

Images, all under berth-test/:
  busybox:latest          OCI manifest, one gzip layer: busybox, an applet
                          symlink in /bin for each applet, /etc/passwd+group
  busybox-docker:latest   the same layer as Docker v2 schema 2
  nonroot:latest          busybox + a layer adding user berth (1000:1000,
                          supplementary group extra 1001); config User "berth"
  nonroot:uid             the same layers, config User "1000:1000"
  layers:latest           busybox + 3 layers exercising whiteouts, an opaque
                          directory, a hardlink and symlinks
  multiarch:latest        OCI image index: linux/amd64 and linux/arm64/v8, each
                          busybox + a layer with /arch ("amd64\\n" / "arm64\\n")
  zstd:latest             one tar+zstd layer: busybox content + /zstd-marker
  pause:latest            the busybox layer alone, Cmd ["sleep", "2147483647"]:
                          the sandbox (pause) image for a containerd peer
                          (hack/containerd-peer.sh); berth needs none
  bench:8x25mb            only with --bench (for `berth bench --scenario pull`):
                          8 gzip layers, each one file /bench/layer-N.bin of
                          25 MiB of SHAKE-256 output seeded by N, so that it
                          does not compress (~210 MB to pull); ~5 s to build

Reproducible: entries sorted, mtimes fixed (FIXED_EPOCH), uid/gid numeric
with empty user/group names, gzip header mtime 0 and no file name, JSON
serialised deterministically. Digests therefore stay the same from run to run
and across registries on one machine. Another busybox-static or Python tarfile
changes the diff_ids; another zlib or zstd also changes the layer digests.

Every image config carries the label berth.test.image=<key>, so no two test
images share an image ID (a test that removes one image never removes another
image's tags); the busybox layer blob is shared by all images except zstd.

Registry behaviour (Debian bookworm docker-registry 2.8.2+ds1, observed; what
a puller tested against it must cope with):
  * An OCI manifest or index is served only to a client whose Accept header
    names its media type; otherwise GET (and HEAD) answer 404
    MANIFEST_UNKNOWN "OCI manifest found, but accept header does not support
    OCI manifests" (or "... OCI index ..."). Accepting only the OCI manifest
    type is not enough for the index. So a puller must always send every
    manifest type it handles in Accept (ALL_MANIFEST_TYPES below); this
    script reads each tag back with that list and each digest with its type.
  * A Docker schema 2 manifest requested without its media type in Accept is
    converted on the fly to a signed schema 1 manifest
    (application/vnd.docker.distribution.manifest.v1+prettyjws) with another
    digest. Same remedy.
  * An OCI index is rejected (400 MANIFEST_BLOB_UNKNOWN) unless every
    manifest it names is already in the repository, so the per-platform
    manifests are pushed first, by digest, and the index last.
  * tar+zstd layers need no workaround: 2.8 checks that each layer blob
    exists, not its media type (it even accepts a made-up layer type).
"""

import argparse
import gzip
import hashlib
import io
import ipaddress
import json
import os
import posixpath
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request

# 2023-11-14T22:13:20Z: a fixed, non-zero timestamp for every tar entry and
# config "created" (zero times are special-cased by some tools).
FIXED_EPOCH = 1700000000
FIXED_CREATED = "2023-11-14T22:13:20Z"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# What a puller sends in Accept; each tag must be served as pushed with it.
ALL_MANIFEST_TYPES = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST,
                                "application/vnd.docker.distribution.manifest.list.v2+json"])

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REQUIRED_APPLETS = [
    "sh", "sleep", "httpd", "nc", "id", "cat", "ls", "hostname", "mount",
    "echo", "true", "false", "env", "ps", "top", "wget",
]
HTTP_TIMEOUT_S = 60

IMAGES_JSON_DOC = """
images.json (version 1):
{
  "version": 1,
  "registry": "127.0.0.1:PORT",
  "images": {                              # keyed by a short name
    "<key>": {
      "name": "berth-test/busybox",        # repository path in the registry
      "tag": "latest",
      "reference": "127.0.0.1:PORT/berth-test/busybox:latest",
      "repo_digest": "127.0.0.1:PORT/berth-test/busybox@sha256:...",
      "media_type": "<media type of what the tag points to>",
      "manifest_digest": "sha256:...",     # digest of the bytes the tag points to
      "manifest_size": 123,                # (the index, for multiarch)
      # the image as resolved for linux/amd64:
      "platform": {"os": "linux", "architecture": "amd64"},
      "config_media_type": "...",
      "config_digest": "sha256:...",       # = image ID
      "image_id": "sha256:...",
      "config_size": 123,
      "layers": [{"media_type", "digest", "size", "diff_id",
                  "uncompressed_size"}],
      "diff_ids": ["sha256:..."],
      "layers_size": 123,                  # sum of compressed layer sizes
      "content_size": 123,                 # index (if any) + manifest + config + layers
      "cmd": ["sh"], "env": ["PATH=..."],
      "user": "",                          # config User, verbatim
      "cri_user": {"uid": null, "username": ""},   # as CRI Image.uid/username
      "identity": {"uid": 0, "gid": 0, "extra_gids": []},  # process ids for that user
      "platforms": [...]                   # multiarch only: per-platform manifest,
                                           # config and layers, as above
      "expected": {                        # what the unpacked rootfs must show
        "exist": ["/abs/path", ...],
        "absent": ["/abs/path", ...],
        "files": {"/path": "content"},
        "symlinks": {"/path": "target"},
        "hardlinks": [["/path", "/same/inode"]],
        "dirs": {"/path": ["sorted", "entries"]},
        "owners": {"/path": [uid, gid]},
        "modes": {"/path": "0755"}          # permission bits, octal, incl. sticky
      }
    }
  }
}
"""


def abspath(path):
    """path as an absolute, normalised container path ("//x" becomes "/x")."""
    return posixpath.normpath("/" + path.lstrip("/"))


def sha256_digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def log(msg):
    if not ARGS.quiet:
        print(f"build-test-images: {msg}", file=sys.stderr, flush=True)


class BuildError(Exception):
    pass


# --------------------------------------------------------------------------
# Layers


class Layer:
    """The entries of one layer tar, keyed by absolute path.

    Parent directories that are not given explicitly are added as root-owned
    0755 directories, as `docker build` does, so every tar is self-contained.
    """

    def __init__(self):
        self.entries = {}

    def _add(self, path, **entry):
        path = abspath(path)
        if path == "/":
            raise BuildError("a layer entry cannot be /")
        entry.setdefault("uid", 0)
        entry.setdefault("gid", 0)
        self.entries[path] = entry
        return self

    def dir(self, path, mode=0o755, uid=0, gid=0):
        return self._add(path, kind="dir", mode=mode, uid=uid, gid=gid)

    def file(self, path, data, mode=0o644, uid=0, gid=0):
        if isinstance(data, str):
            data = data.encode()
        return self._add(path, kind="file", data=data, mode=mode, uid=uid, gid=gid)

    def symlink(self, path, target):
        return self._add(path, kind="symlink", target=target, mode=0o777)

    def hardlink(self, path, target):
        return self._add(path, kind="hardlink", target=abspath(target), mode=0o644)

    def whiteout(self, path):
        """Hide path (and everything under it) of the layers below."""
        d, base = posixpath.split(abspath(path))
        return self._add(posixpath.join(d, ".wh." + base), kind="file", data=b"", mode=0o644)

    def opaque(self, path):
        """Hide everything the layers below have under directory path."""
        return self._add(posixpath.join(abspath(path), ".wh..wh..opq"), kind="file", data=b"", mode=0o644)

    def with_parents(self):
        entries = dict(self.entries)
        for path in list(entries):
            parent = posixpath.dirname(path)
            while parent != "/":
                entries.setdefault(parent, {"kind": "dir", "mode": 0o755, "uid": 0, "gid": 0})
                parent = posixpath.dirname(parent)
        return entries

    def tar(self):
        """The layer as an uncompressed, reproducible tar."""
        entries = self.with_parents()
        buf = io.BytesIO()
        written = set()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            # Sorted by path: a parent always precedes its children, and the
            # order never depends on insertion order.
            for path in sorted(entries):
                e = entries[path]
                name = path.lstrip("/")
                info = tarfile.TarInfo(name)
                info.mtime = FIXED_EPOCH
                info.mode = e["mode"]
                info.uid, info.gid = e["uid"], e["gid"]
                info.uname = info.gname = ""
                data = None
                if e["kind"] == "dir":
                    info.type = tarfile.DIRTYPE
                elif e["kind"] == "file":
                    info.type = tarfile.REGTYPE
                    data = e["data"]
                    info.size = len(data)
                elif e["kind"] == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = e["target"]
                elif e["kind"] == "hardlink":
                    if e["target"] not in written:
                        raise BuildError(f"hardlink {path} precedes its target {e['target']}")
                    info.type = tarfile.LNKTYPE
                    info.linkname = e["target"].lstrip("/")
                else:
                    raise BuildError(f"unknown entry kind {e['kind']}")
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
                written.add(path)
        return buf.getvalue()


def gzip_bytes(data):
    # mtime=0 and no file name in the header: the output depends only on data
    # (and on the zlib version).
    return gzip.compress(data, compresslevel=6, mtime=0)


def zstd_bytes(data):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSTD_")}
    try:
        out = subprocess.run(
            ["zstd", "-q", "-c", "-3", "-T1", "--no-progress"],
            input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, check=True,
        )
    except FileNotFoundError:
        raise BuildError("zstd not found; run hack/install-deps.sh") from None
    except subprocess.CalledProcessError as e:
        raise BuildError(f"zstd failed: {e.stderr.decode(errors='replace').strip()}") from None
    return out.stdout


class Blob:
    def __init__(self, data, media_type, diff_id=None, uncompressed_size=None):
        self.data = data
        self.media_type = media_type
        self.digest = sha256_digest(data)
        self.size = len(data)
        self.diff_id = diff_id
        self.uncompressed_size = uncompressed_size

    def descriptor(self, media_type=None):
        return {"mediaType": media_type or self.media_type, "digest": self.digest, "size": self.size}


class BuiltLayer:
    """A layer's entries, its tar and its compressed blob."""

    def __init__(self, layer, compression="gzip"):
        self.layer = layer
        tar = layer.tar()
        diff_id = sha256_digest(tar)
        if compression == "gzip":
            self.blob = Blob(gzip_bytes(tar), OCI_LAYER_GZIP, diff_id, len(tar))
        elif compression == "zstd":
            self.blob = Blob(zstd_bytes(tar), OCI_LAYER_ZSTD, diff_id, len(tar))
        else:
            raise BuildError(f"unknown compression {compression}")


# --------------------------------------------------------------------------
# Image content


PASSWD_BASE = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP_BASE = "root:x:0:\nnobody:x:65534:\n"


def busybox_layer(busybox_path):
    try:
        with open(busybox_path, "rb") as f:
            busybox = f.read()
    except OSError as e:
        raise BuildError(f"read {busybox_path}: {e.strerror}; run hack/install-deps.sh") from None
    try:
        out = subprocess.run([busybox_path, "--list"], stdout=subprocess.PIPE, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"{busybox_path} --list: {e}") from None
    applets = sorted({a for a in out.stdout.decode().split() if a and a != "busybox"})
    missing = [a for a in REQUIRED_APPLETS if a not in applets]
    if missing:
        raise BuildError(f"{busybox_path} lacks applets: {' '.join(missing)}")
    for a in applets:
        if "/" in a or a in (".", ".."):
            raise BuildError(f"unexpected applet name {a!r}")

    layer = Layer()
    for d in ("bin", "etc", "proc", "sys", "dev", "var", "home"):
        layer.dir(d)
    layer.dir("root", mode=0o700)
    layer.dir("tmp", mode=0o1777)
    layer.file("bin/busybox", busybox, mode=0o755)
    for a in applets:
        layer.symlink(f"bin/{a}", "busybox")
    layer.file("etc/passwd", PASSWD_BASE)
    layer.file("etc/group", GROUP_BASE)
    return layer, applets


def nonroot_layer():
    return (
        Layer()
        .file("etc/passwd", PASSWD_BASE + "berth:x:1000:1000:berth:/home/berth:/bin/sh\n")
        .file("etc/group", GROUP_BASE + "berth:x:1000:\nextra:x:1001:berth\n")
        .dir("home/berth", mode=0o755, uid=1000, gid=1000)
    )


def data_layers():
    """The three layers of berth-test/layers on top of busybox."""
    add = (
        Layer()
        .file("data/a", "a\n").file("data/b", "b\n")
        .file("data/dir/x", "x\n").file("data/dir/y", "y\n")
        .file("data/keep/k", "k\n")
    )
    # The opaque marker hides x and y of the layer below, never z of its own
    # layer; the whiteout hides a.
    hide = Layer().whiteout("data/a").opaque("data/dir").file("data/dir/z", "z\n")
    links = (
        Layer()
        .file("data/c", "c\n")
        .hardlink("data/c-hardlink", "data/c")
        .symlink("data/c-symlink", "c")
        .symlink("data/abs-symlink", "/data/keep/k")
    )
    return [add, hide, links]


def merge(layers):
    """Apply layers in order as an overlay would; return {path: entry}."""
    tree = {}

    def remove_tree(path):
        for p in [p for p in tree if p == path or p.startswith(path + "/")]:
            del tree[p]

    for layer in layers:
        entries = layer.with_parents()
        # Whiteouts hide only what the layers below provide.
        for path in entries:
            d, base = posixpath.split(path)
            if base == ".wh..wh..opq":
                for p in [p for p in tree if p.startswith(d + "/")]:
                    del tree[p]
            elif base.startswith(".wh."):
                remove_tree(posixpath.join(d, base[len(".wh."):]))
        for path, e in entries.items():
            if posixpath.basename(path).startswith(".wh."):
                continue
            old = tree.get(path)
            if old is not None and (old["kind"] != "dir" or e["kind"] != "dir"):
                remove_tree(path)
            tree[path] = e
    return tree


def expected_view(layers, under):
    """What the merged rootfs shows below directory `under`."""
    tree = merge(layers)
    seen = set()
    for layer in layers:
        for path in layer.with_parents():
            d, base = posixpath.split(path)
            if base == ".wh..wh..opq":
                seen.add(path)
            elif base.startswith(".wh."):
                seen.update((path, posixpath.join(d, base[len(".wh."):])))
            else:
                seen.add(path)

    def in_scope(p):
        return p == under or p.startswith(under + "/")

    exist = sorted(p for p in tree if in_scope(p))
    view = {
        "exist": exist,
        "absent": sorted(p for p in seen if in_scope(p) and p not in tree),
        "files": {}, "symlinks": {}, "hardlinks": [], "dirs": {}, "owners": {}, "modes": {},
    }
    for p in exist:
        e = tree[p]
        view["owners"][p] = [e["uid"], e["gid"]]
        if e["kind"] == "file":
            view["files"][p] = e["data"].decode()
            view["modes"][p] = f"{e['mode']:04o}"
        elif e["kind"] == "hardlink":
            view["files"][p] = tree[e["target"]]["data"].decode()
            view["hardlinks"].append([e["target"], p])
        elif e["kind"] == "symlink":
            view["symlinks"][p] = e["target"]
        elif e["kind"] == "dir":
            view["modes"][p] = f"{e['mode']:04o}"
            view["dirs"][p] = sorted(
                posixpath.basename(c) for c in tree if posixpath.dirname(c) == p
            )
    return view


def busybox_expected():
    return {
        "exist": sorted(["/bin/busybox", "/etc/group", "/etc/passwd", "/tmp", "/root", "/home"]
                        + [f"/bin/{a}" for a in REQUIRED_APPLETS]),
        "absent": [],
        "files": {"/etc/passwd": PASSWD_BASE, "/etc/group": GROUP_BASE},
        "symlinks": {f"/bin/{a}": "busybox" for a in REQUIRED_APPLETS},
        "hardlinks": [],
        "dirs": {},
        "owners": {"/bin/busybox": [0, 0], "/tmp": [0, 0]},
        "modes": {"/tmp": "1777", "/root": "0700", "/bin/busybox": "0755", "/etc": "0755"},
    }


def image_config(key, built_layers, user="", arch="amd64", variant=None, cmd=None):
    cfg = {
        "created": FIXED_CREATED,
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": [PATH_ENV],
            "Cmd": cmd or ["sh"],
            "Labels": {"berth.test.image": key},
        },
        "rootfs": {"type": "layers", "diff_ids": [b.blob.diff_id for b in built_layers]},
        "history": [
            {"created": FIXED_CREATED, "created_by": f"berth hack/build-test-images.py: {key} layer {i}"}
            for i in range(len(built_layers))
        ],
    }
    if user:
        cfg["config"]["User"] = user
    if variant:
        cfg["variant"] = variant
    return cfg


class Image:
    """One single-platform image: config + layers + manifest."""

    def __init__(self, key, built_layers, docker=False, user="", arch="amd64", variant=None, cmd=None):
        self.key = key
        self.layers = built_layers
        self.user = user
        self.cmd = cmd or ["sh"]
        self.platform = {"os": "linux", "architecture": arch}
        if variant:
            self.platform["variant"] = variant
        config_type = DOCKER_CONFIG if docker else OCI_CONFIG
        self.config = Blob(canonical_json(image_config(key, built_layers, user, arch, variant, cmd)), config_type)
        if docker:
            for b in built_layers:
                if b.blob.media_type != OCI_LAYER_GZIP:
                    raise BuildError("a Docker schema 2 image can only carry gzip layers")
            self.media_type = DOCKER_MANIFEST
            self.layer_descriptors = [b.blob.descriptor(DOCKER_LAYER_GZIP) for b in built_layers]
        else:
            self.media_type = OCI_MANIFEST
            self.layer_descriptors = [b.blob.descriptor() for b in built_layers]
        manifest = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": self.config.descriptor(),
            "layers": self.layer_descriptors,
        }
        self.manifest = canonical_json(manifest)
        self.digest = sha256_digest(self.manifest)

    def blobs(self):
        return [self.config] + [b.blob for b in self.layers]

    def describe(self):
        layers = [
            {
                "media_type": d["mediaType"],
                "digest": d["digest"],
                "size": d["size"],
                "diff_id": b.blob.diff_id,
                "uncompressed_size": b.blob.uncompressed_size,
            }
            for d, b in zip(self.layer_descriptors, self.layers)
        ]
        layers_size = sum(l["size"] for l in layers)
        return {
            "platform": self.platform,
            "media_type": self.media_type,
            "manifest_digest": self.digest,
            "manifest_size": len(self.manifest),
            "config_media_type": self.config.media_type,
            "config_digest": self.config.digest,
            "image_id": self.config.digest,
            "config_size": self.config.size,
            "layers": layers,
            "diff_ids": [l["diff_id"] for l in layers],
            "layers_size": layers_size,
            "content_size": len(self.manifest) + self.config.size + layers_size,
            "cmd": self.cmd,
            "env": [PATH_ENV],
            "user": self.user,
        }


class Index:
    """An OCI image index over single-platform images."""

    def __init__(self, images):
        self.images = images
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": i.media_type, "digest": i.digest, "size": len(i.manifest), "platform": i.platform}
                for i in images
            ],
        }
        self.manifest = canonical_json(index)
        self.digest = sha256_digest(self.manifest)
        self.media_type = OCI_INDEX


def cri_user(user):
    """Image.uid / Image.username as a CRI runtime reports them (containerd's
    rule): the user part of "user[:group]"; numeric means uid."""
    part = user.split(":", 1)[0]
    if part.isdigit():
        return {"uid": int(part), "username": ""}
    return {"uid": None, "username": part}


# --------------------------------------------------------------------------
# Registry client


class Registry:
    def __init__(self, addr):
        self.addr = addr
        self.base = f"http://{addr}"
        # No proxy: the registry is on loopback and the traffic must stay there.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method, url, data=None, headers=None, expect=(200,)):
        url = urllib.parse.urljoin(self.base, url)
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with self.opener.open(req, timeout=HTTP_TIMEOUT_S) as resp:
                status, hdrs, body = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, hdrs, body = e.code, e.headers, e.read()
        except OSError as e:
            raise BuildError(f"{method} {url}: {e}") from None
        if status not in expect:
            text = body[:500].decode(errors="replace").strip()
            raise BuildError(f"{method} {url}: HTTP {status} (expected {'/'.join(map(str, expect))}): {text}")
        return status, hdrs, body

    def check_v2(self):
        _, hdrs, _ = self.request("GET", "/v2/")
        if not (hdrs.get("Docker-Distribution-Api-Version") or "").startswith("registry/2.0"):
            raise BuildError(f"{self.base}/v2/ does not look like a distribution registry")

    def blob_exists(self, name, digest):
        status, _, _ = self.request("HEAD", f"/v2/{name}/blobs/{digest}", expect=(200, 404))
        return status == 200

    def push_blob(self, name, blob):
        if self.blob_exists(name, blob.digest):
            return False
        # Monolithic upload: POST opens an upload session, PUT with ?digest=
        # sends all bytes and commits it.
        _, hdrs, _ = self.request(
            "POST", f"/v2/{name}/blobs/uploads/", data=b"", headers={"Content-Length": "0"}, expect=(202,)
        )
        location = hdrs.get("Location")
        if not location:
            raise BuildError(f"POST /v2/{name}/blobs/uploads/: no Location header")
        sep = "&" if "?" in location else "?"
        _, hdrs, _ = self.request(
            "PUT",
            f"{location}{sep}digest={urllib.parse.quote(blob.digest)}",
            data=blob.data,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)},
            expect=(201,),
        )
        got = hdrs.get("Docker-Content-Digest")
        if got and got != blob.digest:
            raise BuildError(f"registry stored blob {blob.digest} as {got}")
        return True

    def put_manifest(self, name, ref, body, media_type):
        _, hdrs, _ = self.request(
            "PUT", f"/v2/{name}/manifests/{ref}", data=body, headers={"Content-Type": media_type}, expect=(201,)
        )
        want = sha256_digest(body)
        got = hdrs.get("Docker-Content-Digest")
        if got != want:
            raise BuildError(f"PUT manifest {name}:{ref}: registry says digest {got}, pushed {want}")

    def verify_manifest(self, name, ref, digest, media_type, body=None, accept=None):
        """GET name:ref accepting media_type (or `accept`); it must be the
        digest we pushed, served with its media type."""
        _, hdrs, got_body = self.request(
            "GET", f"/v2/{name}/manifests/{ref}", headers={"Accept": accept or media_type}
        )
        ctype = (hdrs.get("Content-Type") or "").split(";")[0].strip()
        if ctype != media_type:
            raise BuildError(f"GET {name}:{ref}: Content-Type {ctype!r}, expected {media_type}")
        if sha256_digest(got_body) != digest or hdrs.get("Docker-Content-Digest") != digest:
            raise BuildError(f"GET {name}:{ref}: served digest {sha256_digest(got_body)}, expected {digest}")
        if body is not None and got_body != body:
            raise BuildError(f"GET {name}:{ref}: served bytes differ from pushed bytes")

    def verify_blob(self, name, blob):
        _, hdrs, _ = self.request("HEAD", f"/v2/{name}/blobs/{blob.digest}")
        if hdrs.get("Content-Length") != str(blob.size):
            raise BuildError(f"HEAD blob {name}@{blob.digest}: size {hdrs.get('Content-Length')}, expected {blob.size}")
        if blob.media_type in (OCI_CONFIG, DOCKER_CONFIG):
            _, _, body = self.request("GET", f"/v2/{name}/blobs/{blob.digest}")
            if sha256_digest(body) != blob.digest:
                raise BuildError(f"GET blob {name}@{blob.digest}: content digest {sha256_digest(body)}")


# --------------------------------------------------------------------------


BENCH_LAYERS = 8
BENCH_LAYER_BYTES = 25 * 1024 * 1024


def bench_layers():
    """The layers of berth-test/bench:8x25mb: incompressible, yet the same on
    every run (SHAKE-256 is a deterministic stream)."""
    layers = []
    for i in range(BENCH_LAYERS):
        data = hashlib.shake_256(f"berth-bench-layer-{i}".encode()).digest(BENCH_LAYER_BYTES)
        layers.append(BuiltLayer(Layer().file(f"bench/layer-{i}.bin", data)))
    return layers


def bench_expected():
    return {
        "exist": [f"/bench/layer-{i}.bin" for i in range(BENCH_LAYERS)], "absent": [],
        "files": {}, "symlinks": {}, "hardlinks": [], "dirs": {}, "owners": {}, "modes": {},
    }


def build(busybox_path, bench=False):
    t0 = time.monotonic()
    bb_layer, applets = busybox_layer(busybox_path)
    bb = BuiltLayer(bb_layer)
    nonroot = BuiltLayer(nonroot_layer())
    data = [BuiltLayer(layer) for layer in data_layers()]
    arch_layers = {a: BuiltLayer(Layer().file("arch", f"{a}\n")) for a in ("amd64", "arm64")}
    zstd_layer = Layer()
    zstd_layer.entries.update(bb_layer.entries)
    zstd_layer.file("zstd-marker", "zstd\n")
    zst = BuiltLayer(zstd_layer, compression="zstd")
    log(f"built layers in {time.monotonic() - t0:.1f}s ({len(applets)} busybox applets)")

    bb_expected = busybox_expected()
    nonroot_identity = {"uid": 1000, "gid": 1000, "extra_gids": [1001]}
    nonroot_expected = {
        "exist": ["/bin/sh", "/etc/group", "/etc/passwd", "/home/berth"],
        "absent": [],
        "files": {
            "/etc/passwd": nonroot.layer.entries["/etc/passwd"]["data"].decode(),
            "/etc/group": nonroot.layer.entries["/etc/group"]["data"].decode(),
        },
        "symlinks": {}, "hardlinks": [], "dirs": {},
        "owners": {"/home/berth": [1000, 1000]},
        "modes": {"/home/berth": "0755"},
    }
    layers_expected = expected_view([bb_layer] + [d.layer for d in data], "/data")
    root = {"uid": 0, "gid": 0, "extra_gids": []}

    # (key, repository, tag, image or index, identity, expected)
    plan = [
        ("busybox", "berth-test/busybox", "latest", Image("busybox", [bb]), root, bb_expected),
        ("busybox-docker", "berth-test/busybox-docker", "latest",
         Image("busybox-docker", [bb], docker=True), root, bb_expected),
        ("nonroot", "berth-test/nonroot", "latest",
         Image("nonroot", [bb, nonroot], user="berth"), nonroot_identity, nonroot_expected),
        ("nonroot-uid", "berth-test/nonroot", "uid",
         Image("nonroot-uid", [bb, nonroot], user="1000:1000"), nonroot_identity, nonroot_expected),
        ("layers", "berth-test/layers", "latest", Image("layers", [bb] + data), root, layers_expected),
        ("multiarch", "berth-test/multiarch", "latest", Index([
            Image("multiarch", [bb, arch_layers["amd64"]], arch="amd64"),
            Image("multiarch", [bb, arch_layers["arm64"]], arch="arm64", variant="v8"),
        ]), root, None),
        ("zstd", "berth-test/zstd", "latest", Image("zstd", [zst]), root, {
            "exist": ["/zstd-marker", "/bin/busybox", "/bin/sh"], "absent": [],
            "files": {"/zstd-marker": "zstd\n"}, "symlinks": {"/bin/sh": "busybox"},
            "hardlinks": [], "dirs": {}, "owners": {}, "modes": {"/tmp": "1777"},
        }),
        # Adds only a config and a manifest: the busybox layer is shared.
        ("pause", "berth-test/pause", "latest",
         Image("pause", [bb], cmd=["sleep", "2147483647"]), root, bb_expected),
    ]
    if bench:
        t1 = time.monotonic()
        plan.append(("bench-8x25mb", "berth-test/bench", "8x25mb",
                     Image("bench-8x25mb", bench_layers()), root, bench_expected()))
        log(f"built the bench image in {time.monotonic() - t1:.1f}s")
    return plan


def push_and_describe(reg, plan):
    out = {}
    pushed_blobs = 0
    for key, name, tag, target, identity, expected in plan:
        t0 = time.monotonic()
        images = target.images if isinstance(target, Index) else [target]
        for img in images:
            for blob in img.blobs():
                pushed_blobs += reg.push_blob(name, blob)
            if isinstance(target, Index):
                # An index may only name manifests the repository holds.
                reg.put_manifest(name, img.digest, img.manifest, img.media_type)
        reg.put_manifest(name, tag, target.manifest, target.media_type)
        log(f"pushed {name}:{tag} {target.digest} in {time.monotonic() - t0:.1f}s")

        # Read back what a puller will see.
        reg.verify_manifest(name, target.digest, target.digest, target.media_type, target.manifest)
        reg.verify_manifest(name, tag, target.digest, target.media_type)
        reg.verify_manifest(name, tag, target.digest, target.media_type, accept=ALL_MANIFEST_TYPES)
        for img in images:
            if isinstance(target, Index):
                reg.verify_manifest(name, img.digest, img.digest, img.media_type, img.manifest)
            for blob in img.blobs():
                reg.verify_blob(name, blob)

        resolved = next(i for i in images if i.platform["architecture"] == "amd64")
        desc = resolved.describe()
        desc.update({
            "name": name,
            "tag": tag,
            "reference": f"{reg.addr}/{name}:{tag}",
            "repo_digest": f"{reg.addr}/{name}@{target.digest}",
            "media_type": target.media_type,
            "manifest_digest": target.digest,
            "manifest_size": len(target.manifest),
            "cri_user": cri_user(resolved.user),
            "identity": identity,
        })
        if isinstance(target, Index):
            desc["content_size"] += len(target.manifest)
            desc["platforms"] = []
            for img in images:
                p = img.describe()
                p["expected"] = {
                    "exist": ["/arch", "/bin/busybox"], "absent": [],
                    "files": {"/arch": f"{img.platform['architecture']}\n"},
                    "symlinks": {}, "hardlinks": [], "dirs": {}, "owners": {}, "modes": {},
                }
                desc["platforms"].append(p)
            expected = desc["platforms"][0]["expected"]
        desc["expected"] = expected
        out[key] = desc
    log(f"uploaded {pushed_blobs} blobs (the rest were already there)")
    return out


def check_registry_arg(addr):
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BuildError(f"--registry {addr!r}: expected HOST:PORT")
    bare = host.strip("[]")
    try:
        loopback = ipaddress.ip_address(bare).is_loopback
    except ValueError:
        loopback = bare == "localhost"
    if not loopback:
        raise BuildError(f"--registry {addr!r}: only a loopback registry is supported (plain HTTP)")


def main():
    global ARGS
    parser = argparse.ArgumentParser(
        description="Build berth's test images from busybox-static and push them to a local registry.",
        epilog=IMAGES_JSON_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--registry", required=True, help="registry address, 127.0.0.1:PORT")
    parser.add_argument("--out", required=True, help="where to write images.json")
    parser.add_argument("--busybox", default="/bin/busybox", help="static busybox binary (default /bin/busybox)")
    parser.add_argument("--bench", action="store_true",
                        help="also build berth-test/bench:8x25mb (~210 MB, for `berth bench`)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ARGS = parser.parse_args()

    t0 = time.monotonic()
    try:
        check_registry_arg(ARGS.registry)
        reg = Registry(ARGS.registry)
        reg.check_v2()
        plan = build(ARGS.busybox, bench=ARGS.bench)
        images = push_and_describe(reg, plan)
    except BuildError as e:
        print(f"build-test-images: {e}", file=sys.stderr)
        return 1

    doc = {"version": 1, "registry": ARGS.registry, "images": images}
    out = os.path.abspath(ARGS.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, out)
    log(f"wrote {out} ({len(images)} images) in {time.monotonic() - t0:.1f}s")
    return 0


ARGS = None

if __name__ == "__main__":
    sys.exit(main())
