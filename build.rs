//! Compiles the protobuf files berth owns (the monitor's control messages).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/monitor.proto");
    prost_build::Config::new().compile_protos(&["proto/monitor.proto"], &["proto"])?;
    Ok(())
}
