//! Compiles `proto/hopwatch/v1/*.proto` without a system `protoc`: `protox` parses the
//! files into a descriptor set in pure Rust, then prost (messages) and, with the `grpc`
//! feature, tonic (services) generate code from it.

use std::path::PathBuf;

use anyhow::Context;

const PROTOS: &[&str] = &["hopwatch/v1/report.proto", "hopwatch/v1/query.proto"];

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let fds = protox::compile(PROTOS, [&root]).context("parsing proto/hopwatch/v1/*.proto")?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    if std::env::var_os("CARGO_FEATURE_GRPC").is_some() {
        // Reflection needs the encoded descriptor set.
        let descriptor_path = out.join("hopwatch_descriptor.bin");
        std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))
            .context("writing hopwatch_descriptor.bin")?;
        // The checked codec (src/codec.rs): decode errors are INVALID_ARGUMENT, counted.
        tonic_prost_build::configure()
            .codec_path("crate::codec::CheckedCodec")
            .build_client(true)
            .build_server(true)
            .compile_fds(fds)
            .context("generating tonic code")?;
    } else {
        prost_build::Config::new()
            .compile_fds(fds)
            .context("generating prost code")?;
    }
    Ok(())
}
