//! Compiles `proto/demo.proto` (the demo app's gRPC service) without a system `protoc`:
//! protox parses it in pure Rust, tonic generates client and server code, as in the
//! `hopwatch-proto` crate.

use std::path::PathBuf;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!(
        "cargo:rerun-if-changed={}",
        root.join("demo.proto").display()
    );
    let fds = protox::compile(["demo.proto"], [&root]).context("parsing proto/demo.proto")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .context("generating the demo service's tonic code")?;
    Ok(())
}
