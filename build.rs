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
    Ok(())
}
