//! Compiles the vendored Envoy Rate Limit Service protos (`proto/`) with
//! protox, so building needs no system `protoc`: Rust types, the tonic
//! server and client, and the descriptor set gRPC reflection serves.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["envoy/service/ratelimit/v3/rls.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("rls_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .include_file("protos.rs")
        .codec_path("crate::grpc::codec::SmallCodec")
        // Without the protos' comments: they hold examples rustdoc would run
        // as Rust doctests; the protos in `proto/` are the documentation.
        .compile_fds_with_config(fds, {
            let mut config = tonic_prost_build::Config::new();
            config.disable_comments(["."]);
            config
        })?;
    Ok(())
}
