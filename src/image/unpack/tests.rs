//! Layer unpack against real directories. Most of these need root (chown,
//! mknod, trusted.* xattrs, mount) and say so when skipped.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tar::{Builder, EntryType, Header};
use tempfile::TempDir;

use super::*;

const LIMITS: Limits = Limits {
    max_uncompressed_bytes: 1 << 30,
    max_entries: 100_000,
};
const MTIME: u64 = 1_600_000_000;

/// Whether the test can run; prints why not when it cannot.
fn root_or_skip(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipping {test}: needs root (chown, mknod, trusted.* xattrs)");
    }
    root
}

/// A tar stream under construction.
struct Layer(Builder<Vec<u8>>);

impl Layer {
    fn new() -> Layer {
        Layer(Builder::new(Vec::new()))
    }

    fn header(kind: EntryType, mode: u32, uid: u64, gid: u64) -> Header {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_mtime(MTIME);
        header.set_size(0);
        header
    }

    fn file(mut self, path: &str, data: &[u8]) -> Layer {
        self = self.file_owned(path, data, 0o644, 0, 0);
        self
    }

    fn file_owned(mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> Layer {
        let mut header = Layer::header(EntryType::Regular, mode, uid, gid);
        header.set_size(data.len() as u64);
        self.0
            .append_data(&mut header, path, data)
            .expect("append file");
        self
    }

    fn dir(mut self, path: &str, mode: u32) -> Layer {
        let mut header = Layer::header(EntryType::Directory, mode, 0, 0);
        self.0
            .append_data(&mut header, path, &[][..])
            .expect("append dir");
        self
    }

    fn link(mut self, kind: EntryType, path: &str, target: &str) -> Layer {
        let mut header = Layer::header(kind, 0o777, 0, 0);
        self.0
            .append_link(&mut header, path, target)
            .expect("append link");
        self
    }

    fn device(mut self, kind: EntryType, path: &str, major: u32, minor: u32) -> Layer {
        let mut header = Layer::header(kind, 0o620, 0, 5);
        header.set_device_major(major).expect("major");
        header.set_device_minor(minor).expect("minor");
        self.0
            .append_data(&mut header, path, &[][..])
            .expect("append device");
        self
    }

    fn pax(mut self, records: &[(&str, &[u8])]) -> Layer {
        self.0
            .append_pax_extensions(records.iter().copied())
            .expect("append pax");
        self
    }

    /// An entry with name and link name written byte for byte into the
    /// header, past the checks `Builder` makes: how a hostile layer looks.
    fn raw(mut self, kind: EntryType, name: &[u8], link: &[u8], data: &[u8]) -> Layer {
        let mut header = Layer::header(kind, 0o644, 0, 0);
        header.set_size(data.len() as u64);
        let old = header.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
        header.set_cksum();
        self.0.append(&header, data).expect("append raw");
        self
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().expect("finish tar")
    }
}

/// A temp dir holding the layer dir `layer/` and nothing else, so that any
/// write beside the layer shows.
struct Scratch {
    tmp: TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::create_dir(tmp.path().join("layer")).expect("mkdir layer");
        Scratch { tmp }
    }

    fn dest(&self) -> PathBuf {
        self.tmp.path().join("layer")
    }

    fn unpack(&self, tar: &[u8]) -> Result<UnpackResult, UnpackError> {
        unpack_layer(tar, Compression::None, &self.dest(), &LIMITS)
    }

    /// Fails when anything but `layer/` (and `allowed`) is beside the layer.
    fn assert_nothing_beside_layer(&self, allowed: &[&str]) {
        for entry in fs::read_dir(self.tmp.path()).expect("read tmp") {
            let name = entry.expect("entry").file_name();
            let name = name.to_string_lossy();
            assert!(
                name == "layer" || allowed.contains(&name.as_ref()),
                "{name} written outside the layer"
            );
        }
    }
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 1024];
    match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(rustix::io::Errno::NODATA) => None,
        Err(errno) => panic!("getxattr {name} on {}: {errno}", path.display()),
    }
}

fn assert_whiteout(path: &Path) {
    let meta = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        meta.file_type().is_char_device(),
        "{} is not a char device",
        path.display()
    );
    assert_eq!(meta.rdev(), 0, "{} is not 0/0", path.display());
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), MTIME)
}

#[test]
fn regular_file_keeps_contents_mode_owner_and_mtime() {
    if !root_or_skip("regular_file_keeps_contents_mode_owner_and_mtime") {
        return;
    }
    let s = Scratch::new();
    let tar = Layer::new()
        .file_owned("etc/app.conf", b"key = value\n", 0o640, 1234, 5678)
        .finish();
    let result = s.unpack(&tar).expect("unpack");
    assert_eq!(result.entries, 1);
    let path = s.dest().join("etc/app.conf");
    assert_eq!(fs::read(&path).expect("read"), b"key = value\n");
    let meta = fs::metadata(&path).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    assert_eq!(meta.mtime(), MTIME as i64);
    // The parent had no entry: made 0755, root-owned.
    let parent = fs::metadata(s.dest().join("etc")).expect("stat etc");
    assert_eq!(parent.permissions().mode() & 0o7777, 0o755);
    assert_eq!(parent.uid(), 0);
}

/// Files of a MiB and more are written with O_DIRECT, whole blocks at a
/// time and the tail through the page cache; a file that ends mid-block,
/// one that ends on a block and a replaced one must all come out whole.
#[test]
fn large_files_keep_contents_mode_owner_and_mtime() {
    if !root_or_skip("large_files_keep_contents_mode_owner_and_mtime") {
        return;
    }
    let s = Scratch::new();
    let data = |len: usize, seed: u8| -> Vec<u8> {
        (0..len)
            .map(|i| (i % 253) as u8 ^ seed)
            .collect::<Vec<u8>>()
    };
    let ragged = data((3 << 20) + 1234, 1);
    let blocks = data((1 << 20) + 8192, 2);
    let first = data(2 << 20, 3);
    let second = data((1 << 20) + 1, 4);
    let tar = Layer::new()
        .file_owned("opt/ragged.bin", &ragged, 0o4750, 1000, 2000)
        .file("opt/blocks.bin", &blocks)
        .file("opt/again.bin", &first)
        .file("opt/again.bin", &second)
        .finish();
    s.unpack(&tar).expect("unpack");
    let path = s.dest().join("opt/ragged.bin");
    assert!(fs::read(&path).expect("read ragged") == ragged);
    let meta = fs::metadata(&path).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o4750);
    assert_eq!((meta.uid(), meta.gid()), (1000, 2000));
    assert_eq!(meta.mtime(), MTIME as i64);
    assert!(fs::read(s.dest().join("opt/blocks.bin")).expect("read blocks") == blocks);
    assert!(fs::read(s.dest().join("opt/again.bin")).expect("read again") == second);
}

#[test]
fn setuid_setgid_and_sticky_bits_are_kept_after_chown() {
    if !root_or_skip("setuid_setgid_and_sticky_bits_are_kept_after_chown") {
        return;
    }
    let s = Scratch::new();
    let tar = Layer::new()
        .file_owned("bin/su", b"\x7fELF", 0o4755, 1000, 1000)
        .file_owned("bin/wall", b"\x7fELF", 0o2755, 0, 5)
        .dir("tmp", 0o1777)
        .finish();
    s.unpack(&tar).expect("unpack");
    let mode = |p: &str| {
        fs::metadata(s.dest().join(p))
            .expect(p)
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("bin/su"), 0o4755);
    assert_eq!(mode("bin/wall"), 0o2755);
    assert_eq!(mode("tmp"), 0o1777);
}

#[test]
fn device_nodes_and_fifos_are_created() {
    if !root_or_skip("device_nodes_and_fifos_are_created") {
        return;
    }
    let s = Scratch::new();
    let tar = Layer::new()
        .device(EntryType::Char, "dev/null", 1, 3)
        .device(EntryType::Block, "dev/loop7", 7, 7)
        .device(EntryType::Fifo, "run/fifo", 0, 0)
        .finish();
    s.unpack(&tar).expect("unpack");
    let null = fs::symlink_metadata(s.dest().join("dev/null")).expect("null");
    assert!(null.file_type().is_char_device());
    assert_eq!(
        (
            rustix::fs::major(null.rdev()),
            rustix::fs::minor(null.rdev())
        ),
        (1, 3)
    );
    assert_eq!(null.permissions().mode() & 0o7777, 0o620);
    assert_eq!(null.gid(), 5);
    let loop7 = fs::symlink_metadata(s.dest().join("dev/loop7")).expect("loop7");
    assert!(loop7.file_type().is_block_device());
    assert_eq!(
        (
            rustix::fs::major(loop7.rdev()),
            rustix::fs::minor(loop7.rdev())
        ),
        (7, 7)
    );
    let fifo = fs::symlink_metadata(s.dest().join("run/fifo")).expect("fifo");
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mtime(), MTIME as i64);
}

#[test]
fn symlinks_are_stored_verbatim_and_hardlinks_share_the_inode() {
    if !root_or_skip("symlinks_are_stored_verbatim_and_hardlinks_share_the_inode") {
        return;
    }
    let s = Scratch::new();
    let mut layer = Layer::new().file("usr/bin/busybox", b"box");
    let mut header = Layer::header(EntryType::Symlink, 0o777, 42, 43);
    layer
        .0
        .append_link(&mut header, "bin/passwd-link", "/etc/passwd")
        .expect("symlink");
    let tar = layer
        .link(EntryType::Symlink, "bin/sh", "../usr/bin/busybox")
        .link(EntryType::Link, "bin/ls", "usr/bin/busybox")
        .raw(EntryType::Link, b"/bin/cat", b"/usr/bin/busybox", b"")
        .finish();
    s.unpack(&tar).expect("unpack");
    let dest = s.dest();
    assert_eq!(
        fs::read_link(dest.join("bin/sh")).expect("readlink"),
        Path::new("../usr/bin/busybox")
    );
    // Absolute targets are kept as they are, and never followed here.
    let abs = dest.join("bin/passwd-link");
    assert_eq!(
        fs::read_link(&abs).expect("readlink"),
        Path::new("/etc/passwd")
    );
    let link_meta = fs::symlink_metadata(&abs).expect("lstat");
    assert_eq!((link_meta.uid(), link_meta.gid()), (42, 43));
    assert_eq!(link_meta.mtime(), MTIME as i64);
    let original = fs::metadata(dest.join("usr/bin/busybox")).expect("stat");
    for link in ["bin/ls", "bin/cat"] {
        assert_eq!(
            fs::metadata(dest.join(link)).expect(link).ino(),
            original.ino(),
            "{link}"
        );
    }
    assert_eq!(original.nlink(), 3);
}

#[test]
fn xattrs_are_applied_and_overlay_ones_from_the_image_are_not() {
    if !root_or_skip("xattrs_are_applied_and_overlay_ones_from_the_image_are_not") {
        return;
    }
    let s = Scratch::new();
    // VFS_CAP_REVISION_2 with the effective bit, permitting CAP_NET_BIND_SERVICE.
    let mut capability = Vec::new();
    for word in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
        capability.extend_from_slice(&word.to_le_bytes());
    }
    let tar = Layer::new()
        .pax(&[
            ("SCHILY.xattr.user.origin", b"layer-test"),
            ("SCHILY.xattr.security.capability", &capability),
            ("SCHILY.xattr.trusted.overlay.redirect", b"/elsewhere"),
        ])
        .file_owned("usr/bin/ping", b"ping", 0o755, 0, 0)
        .pax(&[
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
            ("SCHILY.xattr.user.dir", b"d"),
        ])
        .dir("data", 0o755)
        .finish();
    s.unpack(&tar).expect("unpack");
    let ping = s.dest().join("usr/bin/ping");
    assert_eq!(
        xattr(&ping, "user.origin").as_deref(),
        Some(&b"layer-test"[..])
    );
    assert_eq!(xattr(&ping, "security.capability"), Some(capability));
    assert_eq!(xattr(&ping, "trusted.overlay.redirect"), None);
    let data = s.dest().join("data");
    assert_eq!(xattr(&data, "user.dir").as_deref(), Some(&b"d"[..]));
    assert_eq!(xattr(&data, "trusted.overlay.opaque"), None);
}

#[test]
fn whiteout_file_becomes_a_0_0_char_device() {
    if !root_or_skip("whiteout_file_becomes_a_0_0_char_device") {
        return;
    }
    let s = Scratch::new();
    let tar = Layer::new()
        .file("etc/.wh.motd", b"")
        .file(".wh.top", b"")
        .file("etc/.wh..wh.plnk", b"")
        .finish();
    let result = s.unpack(&tar).expect("unpack");
    assert_eq!(result.entries, 3);
    assert_whiteout(&s.dest().join("etc/motd"));
    assert_whiteout(&s.dest().join("top"));
    assert!(!s.dest().join("etc/.wh.motd").exists());
    assert!(!s.dest().join(".wh.top").exists());
    // AUFS bookkeeping is ignored altogether.
    assert_eq!(fs::read_dir(s.dest().join("etc")).expect("ls").count(), 1);
}

#[test]
fn opaque_marker_sets_trusted_overlay_opaque() {
    if !root_or_skip("opaque_marker_sets_trusted_overlay_opaque") {
        return;
    }
    let s = Scratch::new();
    // The marker comes before its directory's own entry, and in a
    // directory that has no entry at all: both must work.
    let tar = Layer::new()
        .file("var/cache/.wh..wh..opq", b"")
        .dir("var/cache", 0o700)
        .file("opt/app/.wh..wh..opq", b"")
        .finish();
    s.unpack(&tar).expect("unpack");
    let cache = s.dest().join("var/cache");
    assert_eq!(
        xattr(&cache, "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        fs::metadata(&cache).expect("stat").permissions().mode() & 0o7777,
        0o700
    );
    assert!(!cache.join(".wh..wh..opq").exists());
    assert_eq!(
        xattr(&s.dest().join("opt/app"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
}

#[test]
fn dot_dot_entries_are_refused_and_nothing_is_written_outside() {
    if !root_or_skip("dot_dot_entries_are_refused_and_nothing_is_written_outside") {
        return;
    }
    for name in [
        &b"../escaped"[..],
        b"a/../../escaped",
        b"./../escaped",
        b"/../escaped",
    ] {
        let s = Scratch::new();
        let tar = Layer::new()
            .raw(EntryType::Regular, name, b"", b"pwned")
            .finish();
        let error = s.unpack(&tar).expect_err("must refuse");
        let shown = String::from_utf8_lossy(name);
        assert_eq!(
            error.to_string(),
            format!("layer entry {shown:?}: path escapes the layer")
        );
        s.assert_nothing_beside_layer(&[]);
        assert_eq!(fs::read_dir(s.dest()).expect("ls").count(), 0, "{shown}");
    }
    let s = Scratch::new();
    let tar = Layer::new()
        .raw(EntryType::Regular, b".wh...", b"", b"")
        .finish();
    assert!(matches!(s.unpack(&tar), Err(UnpackError::Escape { .. })));
}

#[test]
fn absolute_entry_path_lands_inside_the_layer() {
    if !root_or_skip("absolute_entry_path_lands_inside_the_layer") {
        return;
    }
    let s = Scratch::new();
    let name = format!("/tmp/{}", unique("berth-unpack-abs"));
    let tar = Layer::new()
        .raw(EntryType::Regular, name.as_bytes(), b"", b"inside")
        .finish();
    s.unpack(&tar).expect("unpack");
    assert_eq!(
        fs::read(s.dest().join(&name[1..])).expect("read"),
        b"inside"
    );
    assert!(!Path::new(&name).exists(), "{name} written on the host");
}

#[test]
fn symlinked_parents_cannot_lead_outside_the_layer() {
    if !root_or_skip("symlinked_parents_cannot_lead_outside_the_layer") {
        return;
    }
    let s = Scratch::new();
    let outside = s.tmp.path().join("outside");
    fs::create_dir(&outside).expect("mkdir outside");
    let host_name = unique("berth-unpack-pwned");
    let tar = Layer::new()
        .link(EntryType::Symlink, "evil", "/")
        .raw(
            EntryType::Regular,
            format!("evil/tmp/{host_name}").as_bytes(),
            b"",
            b"1",
        )
        .link(EntryType::Symlink, "up", "../../../../../../..")
        .raw(
            EntryType::Regular,
            format!("up/tmp/{host_name}-up").as_bytes(),
            b"",
            b"2",
        )
        .link(
            EntryType::Symlink,
            "abs",
            outside.to_str().expect("utf-8 temp path"),
        )
        .raw(EntryType::Regular, b"abs/planted", b"", b"3")
        .link(EntryType::Symlink, "loop", "loop")
        .finish();
    s.unpack(&tar)
        .expect("scoped resolution keeps these inside");
    // Nothing on the host...
    assert!(!Path::new("/tmp").join(&host_name).exists());
    assert!(!Path::new("/tmp").join(format!("{host_name}-up")).exists());
    assert_eq!(fs::read_dir(&outside).expect("ls outside").count(), 0);
    s.assert_nothing_beside_layer(&["outside"]);
    // ...and the files are where the layer root as `/` puts them.
    assert_eq!(
        fs::read(s.dest().join("tmp").join(&host_name)).expect("1"),
        b"1"
    );
    assert_eq!(
        fs::read(s.dest().join("tmp").join(format!("{host_name}-up"))).expect("2"),
        b"2"
    );
    let relocated = s
        .dest()
        .join(outside.strip_prefix("/").expect("absolute"))
        .join("planted");
    assert_eq!(fs::read(relocated).expect("3"), b"3");

    // A symlink loop in the parent is an error, not a hang.
    let s = Scratch::new();
    let tar = Layer::new()
        .link(EntryType::Symlink, "loop", "loop")
        .file("loop/x", b"")
        .finish();
    let error = s.unpack(&tar).expect_err("loop");
    assert!(
        error
            .to_string()
            .starts_with("layer entry \"loop/x\": open parent directory: ELOOP"),
        "{error}"
    );
}

#[test]
fn hardlinks_cannot_reach_outside_the_layer() {
    if !root_or_skip("hardlinks_cannot_reach_outside_the_layer") {
        return;
    }
    let host_passwd = fs::metadata("/etc/passwd")
        .ok()
        .map(|m| (m.ino(), m.nlink()));

    let s = Scratch::new();
    let tar = Layer::new()
        .raw(EntryType::Link, b"stolen", b"../../etc/passwd", b"")
        .finish();
    let error = s.unpack(&tar).expect_err("dot-dot target");
    assert_eq!(
        error.to_string(),
        "layer entry \"stolen\": hardlink target \"../../etc/passwd\" escapes the layer"
    );
    assert!(!s.dest().join("stolen").exists());

    // Absolute targets are scoped to the layer: /etc/shadow of the host is
    // not in it, so there is nothing to link to.
    for (layer, target) in [
        (Layer::new(), &b"/etc/shadow"[..]),
        (Layer::new(), b"/etc/passwd"),
        // Through a symlinked parent, too.
        (
            Layer::new().link(EntryType::Symlink, "hostetc", "/etc"),
            b"hostetc/passwd",
        ),
    ] {
        let s = Scratch::new();
        let tar = layer.raw(EntryType::Link, b"stolen", target, b"").finish();
        let error = s.unpack(&tar).expect_err("target not in the layer");
        assert!(
            error.to_string().contains("does not exist in the layer"),
            "{error}"
        );
        assert!(!s.dest().join("stolen").exists());
        s.assert_nothing_beside_layer(&[]);
    }
    // A hardlink to a symlink links the symlink, never what it points at.
    let s = Scratch::new();
    let tar = Layer::new()
        .link(EntryType::Symlink, "pw", "/etc/passwd")
        .link(EntryType::Link, "stolen", "pw")
        .finish();
    s.unpack(&tar).expect("link to a symlink");
    assert_eq!(
        fs::read_link(s.dest().join("stolen")).expect("readlink"),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        fs::metadata("/etc/passwd")
            .ok()
            .map(|m| (m.ino(), m.nlink())),
        host_passwd
    );
}

#[test]
fn later_entries_replace_earlier_ones_and_directories_merge() {
    if !root_or_skip("later_entries_replace_earlier_ones_and_directories_merge") {
        return;
    }
    let s = Scratch::new();
    let tar = Layer::new()
        .file("a", b"first")
        .file("a", b"second")
        .file("b", b"file")
        .dir("b", 0o755)
        .file("b/child", b"c")
        .dir("c", 0o755)
        .file("c/kept", b"k")
        .dir("c", 0o711)
        .dir("d", 0o755)
        .file("d/sub/deep", b"x")
        .link(EntryType::Symlink, "d", "/nowhere")
        .finish();
    s.unpack(&tar).expect("unpack");
    let dest = s.dest();
    assert_eq!(fs::read(dest.join("a")).expect("a"), b"second");
    assert_eq!(fs::read(dest.join("b/child")).expect("b/child"), b"c");
    assert_eq!(fs::read(dest.join("c/kept")).expect("c/kept"), b"k");
    assert_eq!(
        fs::metadata(dest.join("c"))
            .expect("c")
            .permissions()
            .mode()
            & 0o7777,
        0o711
    );
    assert_eq!(
        fs::read_link(dest.join("d")).expect("d"),
        Path::new("/nowhere")
    );
}

#[test]
fn directory_mtimes_are_set_after_their_children() {
    if !root_or_skip("directory_mtimes_are_set_after_their_children") {
        return;
    }
    let s = Scratch::new();
    let tar = Layer::new()
        .dir("./", 0o755)
        .dir("srv", 0o750)
        .file("srv/one", b"1")
        .dir("srv/sub", 0o755)
        .file("srv/sub/two", b"2")
        .finish();
    s.unpack(&tar).expect("unpack");
    for dir in ["", "srv", "srv/sub"] {
        let meta = fs::metadata(s.dest().join(dir)).expect(dir);
        assert_eq!(meta.mtime(), MTIME as i64, "{dir:?}");
    }
}

#[test]
fn long_names_and_pax_metadata_are_honoured() {
    if !root_or_skip("long_names_and_pax_metadata_are_honoured") {
        return;
    }
    let s = Scratch::new();
    let long_dir = "d".repeat(120);
    let long_file = format!("{long_dir}/{}", "f".repeat(150));
    let long_target = format!("/{}", "t".repeat(200));
    let tar = Layer::new()
        .file(&long_file, b"gnu long name")
        .link(EntryType::Symlink, "long-link", &long_target)
        .pax(&[
            ("path", b"pax/named/file"),
            ("mtime", b"1234567890.5"),
            ("uid", b"3000000"),
        ])
        .file("ignored-name", b"pax")
        .finish();
    s.unpack(&tar).expect("unpack");
    assert_eq!(
        fs::read(s.dest().join(&long_file)).expect("long"),
        b"gnu long name"
    );
    assert_eq!(
        fs::read_link(s.dest().join("long-link"))
            .expect("link")
            .to_str(),
        Some(&long_target[..])
    );
    let pax = fs::metadata(s.dest().join("pax/named/file")).expect("pax file");
    assert_eq!(
        (pax.mtime(), pax.mtime_nsec()),
        (1_234_567_890, 500_000_000)
    );
    assert_eq!(pax.uid(), 3_000_000);
    assert!(!s.dest().join("ignored-name").exists());
}

#[test]
fn compressed_and_plain_streams_give_the_diff_id_of_the_plain_tar() {
    if !root_or_skip("compressed_and_plain_streams_give_the_diff_id_of_the_plain_tar") {
        return;
    }
    let mut tar = Layer::new()
        .dir("etc", 0o755)
        .file("etc/hostname", b"berth\n")
        .file("big", &vec![0xa5; 300_000])
        .finish();
    // Bytes after the end-of-archive marker are part of the blob, and so of
    // its diffID, like the record padding other tars write.
    tar.extend_from_slice(&[0u8; 4096]);
    let expected = Digest::of(&tar);

    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&tar).expect("gzip");
    let gzip = gzip.finish().expect("gzip finish");
    let zstd = zstd::encode_all(&tar[..], 3).expect("zstd");

    for (compression, blob) in [
        (Compression::None, &tar),
        (Compression::Gzip, &gzip),
        (Compression::Zstd, &zstd),
    ] {
        let s = Scratch::new();
        let result = unpack_layer(&blob[..], compression, &s.dest(), &LIMITS).expect("unpack");
        assert_eq!(result.diff_id, expected, "{compression:?}");
        assert_eq!(result.size, tar.len() as u64, "{compression:?}");
        assert_eq!(result.entries, 3, "{compression:?}");
        assert_eq!(
            fs::read(s.dest().join("etc/hostname")).expect("read"),
            b"berth\n"
        );
    }
}

#[test]
fn gzip_bomb_is_stopped_at_the_limit() {
    if !root_or_skip("gzip_bomb_is_stopped_at_the_limit") {
        return;
    }
    let mut header = Layer::header(EntryType::Regular, 0o644, 0, 0);
    let size = 64u64 << 20;
    header.set_size(size);
    let mut gzip = Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::best(),
    ));
    gzip.append_data(&mut header, "zeros", std::io::repeat(0).take(size))
        .expect("append");
    let bomb = gzip.into_inner().expect("tar").finish().expect("gzip");
    assert!(
        bomb.len() < 1 << 20,
        "the bomb is small: {} bytes",
        bomb.len()
    );

    let s = Scratch::new();
    let limits = Limits {
        max_uncompressed_bytes: 1 << 20,
        max_entries: 10,
    };
    let error = unpack_layer(&bomb[..], Compression::Gzip, &s.dest(), &limits).expect_err("bomb");
    assert_eq!(error.to_string(), "layer exceeds 1 MiB uncompressed");
    // It stopped early rather than writing the whole file.
    let written = fs::metadata(s.dest().join("zeros"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(written <= 1 << 20, "{written} bytes written");
}

#[test]
fn entry_count_is_limited() {
    if !root_or_skip("entry_count_is_limited") {
        return;
    }
    let s = Scratch::new();
    let tar = Layer::new()
        .file("1", b"")
        .file("2", b"")
        .file("3", b"")
        .file("4", b"")
        .finish();
    let limits = Limits {
        max_uncompressed_bytes: 1 << 20,
        max_entries: 3,
    };
    let error =
        unpack_layer(&tar[..], Compression::None, &s.dest(), &limits).expect_err("too many");
    assert_eq!(error.to_string(), "layer has more than 3 entries");
}

#[test]
fn truncated_streams_are_errors() {
    if !root_or_skip("truncated_streams_are_errors") {
        return;
    }
    let tar = Layer::new()
        .file("one", &[1u8; 2000])
        .file("two", &[2u8; 2000])
        .finish();

    // Cut inside the contents of the last file.
    let s = Scratch::new();
    let cut = 512 + 2048 + 512 + 1000;
    let error = s.unpack(&tar[..cut]).expect_err("cut in contents");
    assert!(
        matches!(
            error,
            UnpackError::TruncatedEntry {
                actual: 1000,
                expected: 2000,
                ..
            }
        ),
        "{error}"
    );

    // Cut inside a header.
    let s = Scratch::new();
    let error = s
        .unpack(&tar[..512 + 2048 + 100])
        .expect_err("cut in header");
    assert!(matches!(error, UnpackError::Tar { .. }), "{error}");

    // Cut exactly between entries, or before the end-of-archive marker: the
    // tar parser alone would call this a complete archive.
    for cut in [512 + 2048, 2 * (512 + 2048)] {
        let s = Scratch::new();
        let error = s.unpack(&tar[..cut]).expect_err("cut at a boundary");
        assert!(matches!(error, UnpackError::Truncated), "{cut}: {error}");
    }
    let s = Scratch::new();
    assert!(matches!(s.unpack(&[]), Err(UnpackError::Truncated)));

    // Compressed streams cut short fail in the decoder.
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&tar).expect("gzip");
    let gzip = gzip.finish().expect("gzip finish");
    let zstd = zstd::encode_all(&tar[..], 3).expect("zstd");
    for (compression, blob) in [(Compression::Gzip, gzip), (Compression::Zstd, zstd)] {
        let s = Scratch::new();
        let cut = &blob[..blob.len() - 10];
        let error = unpack_layer(cut, compression, &s.dest(), &LIMITS).expect_err("cut compressed");
        assert!(
            matches!(error, UnpackError::Decompress { .. }),
            "{compression:?}: {error}"
        );
        assert!(
            error.to_string().starts_with("decompress layer: "),
            "{error}"
        );
    }
}

#[test]
fn corrupt_gzip_is_a_decompress_error() {
    let s = Scratch::new();
    let error = unpack_layer(
        &b"this is not gzip at all"[..],
        Compression::Gzip,
        &s.dest(),
        &LIMITS,
    )
    .expect_err("corrupt");
    assert!(
        error.to_string().starts_with("decompress layer: "),
        "{error}"
    );
}

#[test]
fn missing_destination_is_an_error_naming_it() {
    let error = unpack_layer(
        &[][..],
        Compression::None,
        Path::new("/nonexistent/berth-layer"),
        &LIMITS,
    )
    .expect_err("no dest");
    assert_eq!(
        error.to_string(),
        "open layer directory /nonexistent/berth-layer: ENOENT: No such file or directory"
    );
}

#[test]
fn odd_and_unsupported_entries_are_handled_or_refused() {
    if !root_or_skip("odd_and_unsupported_entries_are_handled_or_refused") {
        return;
    }
    // Old tars typed directories as NUL with a trailing slash.
    let s = Scratch::new();
    let mut tar = Layer::new()
        .raw(EntryType::Regular, b"olddir/", b"", b"")
        .finish();
    tar[156] = 0;
    let checksum: u32 = tar[..512]
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    tar[148..156].copy_from_slice(format!("{checksum:06o}\0 ").as_bytes());
    s.unpack(&tar).expect("unpack old directory");
    assert!(
        fs::symlink_metadata(s.dest().join("olddir"))
            .expect("olddir")
            .is_dir()
    );

    let refused: [(Layer, &str); 3] = [
        (
            Layer::new().raw(EntryType::Regular, b"./", b"", b"x"),
            "layer entry \"./\": names the layer root but is not a directory",
        ),
        (
            Layer::new().raw(EntryType::new(b'V'), b"volume", b"", b""),
            "layer entry \"volume\": unsupported entry type 'V'",
        ),
        (
            Layer::new()
                .pax(&[("GNU.sparse.major", b"1")])
                .file("sparse", b""),
            "layer entry \"sparse\": pax sparse files are not supported",
        ),
    ];
    for (layer, message) in refused {
        let s = Scratch::new();
        let error = s.unpack(&layer.finish()).expect_err(message);
        assert_eq!(error.to_string(), message);
    }
}

/// Unmounts on drop, so a failing assertion does not leave a mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(errno) = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH) {
            eprintln!("unmount {}: {errno}", self.0.display());
        }
    }
}

#[test]
fn overlay_of_two_unpacked_layers_hides_whiteouts_and_opaque_contents() {
    if !root_or_skip("overlay_of_two_unpacked_layers_hides_whiteouts_and_opaque_contents") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (lower, upper, merged) = (
        tmp.path().join("l1"),
        tmp.path().join("l2"),
        tmp.path().join("merged"),
    );
    for dir in [&lower, &upper, &merged] {
        fs::create_dir(dir).expect("mkdir");
    }
    let base = Layer::new()
        .dir("etc", 0o755)
        .file("etc/keep", b"keep")
        .file("etc/gone", b"gone")
        .dir("cache", 0o755)
        .file("cache/old", b"old")
        .dir("rmdir", 0o755)
        .file("rmdir/inside", b"x")
        .finish();
    let top = Layer::new()
        .file("etc/.wh.gone", b"")
        .file("cache/.wh..wh..opq", b"")
        .file("cache/new", b"new")
        .file(".wh.rmdir", b"")
        .finish();
    unpack_layer(&base[..], Compression::None, &lower, &LIMITS).expect("unpack base");
    unpack_layer(&top[..], Compression::None, &upper, &LIMITS).expect("unpack top");

    let options = format!("lowerdir={}:{}", upper.display(), lower.display());
    let options = std::ffi::CString::new(options).expect("no NUL");
    if let Err(errno) = rustix::mount::mount(
        "overlay",
        &merged,
        "overlay",
        rustix::mount::MountFlags::RDONLY,
        Some(options.as_c_str()),
    ) {
        eprintln!("skipping overlay_of_two_unpacked_layers...: mount overlay: {errno}");
        return;
    }
    let _mounted = Mounted(merged.clone());

    assert_eq!(fs::read(merged.join("etc/keep")).expect("keep"), b"keep");
    assert!(
        !merged.join("etc/gone").exists(),
        "whiteout did not hide etc/gone"
    );
    assert_eq!(fs::read(merged.join("cache/new")).expect("new"), b"new");
    assert!(
        !merged.join("cache/old").exists(),
        "opaque dir shows lower contents"
    );
    assert!(
        !merged.join("rmdir").exists(),
        "whiteout did not hide a directory"
    );
    let mut names: Vec<_> = fs::read_dir(&merged)
        .expect("ls merged")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    assert_eq!(names, ["cache", "etc"]);
}
