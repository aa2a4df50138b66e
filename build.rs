//! Compiles the protobuf files berth owns (the monitor's control messages),
//! and links the `berth` binary as a position-dependent executable.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/monitor.proto");
    prost_build::Config::new().compile_protos(&["proto/monitor.proto"], &["proto"])?;
    // Every `berth monitor` (one per container) is this binary re-executed.
    // As a PIE, the dynamic loader relocates its ~600 KiB of vtables and
    // pointer tables (.data.rel.ro) at every start, which makes them private
    // dirty pages of each monitor. Linked at a fixed address they need no
    // relocation and stay clean pages shared through the page cache. The
    // code is still compiled position-independent (proc macros and tests are
    // unaffected); only the binary's link changes. The price: the binary's
    // own image is not randomized (its heap, stack and libraries still are).
    // `BERTH_PIE=1` at build time keeps the PIE (docs/performance.md).
    println!("cargo:rerun-if-env-changed=BERTH_PIE");
    let keep_pie = std::env::var("BERTH_PIE").is_ok_and(|v| v == "1");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") && !keep_pie {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
    link_in_code_order();
    Ok(())
}

/// Release builds place the functions `link/code-order.txt` names first, in
/// its order: the monitors' code, then the idle daemon's, then the rest a
/// pod's life runs. On a kernel that maps a whole page-cache folio per fault
/// (6.18 with large folios), scattered hot functions make every process map
/// most of the binary; packed together they stay in a few folios. The list
/// is made by `hack/code-order.sh`; names it misses (new or renamed
/// functions) are only placed as the linker would anyway. lld is rustc's
/// linker for x86_64-unknown-linux-gnu; with another linker configured the
/// list is left out (rustc before 1.90 linked with the system's `ld`).
/// `BERTH_CODE_ORDER=off` leaves it out too; `BERTH_CODE_ORDER=PATH` uses
/// another list.
fn link_in_code_order() {
    println!("cargo:rerun-if-env-changed=BERTH_CODE_ORDER");
    let env = |key: &str| std::env::var(key).unwrap_or_default();
    let order = match env("BERTH_CODE_ORDER").as_str() {
        "off" => return,
        "" => format!("{}/link/code-order.txt", env("CARGO_MANIFEST_DIR")),
        path => path.to_string(),
    };
    println!("cargo:rerun-if-changed={order}");
    let rustflags = env("CARGO_ENCODED_RUSTFLAGS");
    let other_linker = std::env::var_os("RUSTC_LINKER").is_some()
        || rustflags.contains("linker")
        || rustflags.contains("link-self-contained");
    if env("TARGET") != "x86_64-unknown-linux-gnu"
        || !rustc_links_with_lld(&env("RUSTC"))
        || env("OPT_LEVEL") == "0"
        || other_linker
        || !std::path::Path::new(&order).is_file()
    {
        return;
    }
    println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={order}");
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// rustc 1.90 and later link x86_64-unknown-linux-gnu with its own lld.
fn rustc_links_with_lld(rustc: &str) -> bool {
    let Ok(output) = std::process::Command::new(rustc).arg("-V").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&output.stdout);
    let mut numbers = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
